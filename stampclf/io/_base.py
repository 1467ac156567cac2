"""Types shared by the readers and writers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["InputBatch", "Reader", "DUPLICATE_ID", "duplicate_rows"]

#: Status note of a row whose id already appeared earlier in the same file.
DUPLICATE_ID = "flagged: duplicate id"


def duplicate_rows(ids: np.ndarray) -> np.ndarray:
    """True for every row whose id appeared in an earlier row (the first one stays unflagged)."""
    dup = np.zeros(len(ids), dtype=bool)
    if len(ids) > 1:
        try:
            _, first = np.unique(ids, return_index=True)
        except TypeError:  # unorderable mixed objects: compare as text
            _, first = np.unique(np.array([str(i) for i in ids]), return_index=True)
        dup[:] = True
        dup[first] = False
    return dup


@dataclass
class InputBatch:
    """A batch of rows read from one input, in input order.

    Exactly one of ``stamps`` (raw pixels, ``(n, C, H, W)``, the card's channel
    order) and ``x`` (already preprocessed model input) is set. ``status`` holds
    a per-row status from reading (e.g. an unreadable image) or is None.
    ``extra`` holds extra output columns of the reader (e.g. alerts' ``object_id``).
    ``files`` names each row's own source file where a reader mixes files (images);
    otherwise None and the reader's ``path`` is every row's file.
    """

    ids: np.ndarray
    stamps: np.ndarray | None = None
    x: np.ndarray | None = None
    labels: np.ndarray | None = None
    status: np.ndarray | None = None
    extra: dict[str, np.ndarray] | None = None
    files: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


class Reader(Protocol):
    """An input file or set of files that yields batches."""

    path: str
    n_rows: int | None
    has_labels: bool

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of at most *batch_size* rows in input order."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...
