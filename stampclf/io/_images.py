"""Image files and folders of images (JPEG, PNG, ...), read in batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .._errors import InputError
from ..preprocess import OK, load_image
from ._base import InputBatch

__all__ = ["ImageReader", "IMAGE_SUFFIXES", "expand_image_paths"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def expand_image_paths(paths: list[str]) -> list[str]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                str(f) for f in Path(p).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(f"{p}: folder contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        elif not os.path.exists(p):
            raise InputError(f"{p}: file does not exist")
        else:
            out.append(str(p))
    return out


class ImageReader:
    """Classify-ready batches from image files; an unreadable image becomes a failed row."""

    has_labels = False

    def __init__(self, paths: list[str], spec: dict[str, Any], shape: tuple[int, int, int]) -> None:
        self.files = expand_image_paths(paths)
        self.path = self.files[0] if len(self.files) == 1 else f"{len(self.files)} images"
        self.n_rows: int | None = len(self.files)
        self._spec = spec
        self._shape = shape

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of decoded, preprocessed images."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(self.files), batch_size):
            names = self.files[start : start + batch_size]
            x = np.zeros((len(names),) + self._shape, dtype=np.float32)
            status = np.full(len(names), OK, dtype=object)
            for i, name in enumerate(names):
                try:
                    arr = load_image(name, self._spec)
                    if arr.shape != self._shape:
                        raise InputError(f"{name}: image gives shape {arr.shape}, model needs {self._shape}")
                    x[i] = arr
                except InputError as exc:
                    status[i] = f"failed: {exc}"
            yield InputBatch(ids=np.array(names, dtype=object), x=x, status=status)

    def close(self) -> None:
        """Nothing to release."""
