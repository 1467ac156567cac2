"""Types shared by the readers and writers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

__all__ = ["InputBatch", "Reader"]


@dataclass
class InputBatch:
    """A batch of rows read from one input, in input order.

    Exactly one of ``stamps`` (raw pixels, ``(n, C, H, W)``, the card's channel
    order) and ``x`` (already preprocessed model input) is set. ``status`` holds
    a per-row status from reading (e.g. an unreadable image) or is None.
    """

    ids: np.ndarray
    stamps: np.ndarray | None = None
    x: np.ndarray | None = None
    labels: np.ndarray | None = None
    status: np.ndarray | None = None

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
