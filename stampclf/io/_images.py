"""Image files and folders of images (JPEG, PNG, ...), read in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputError
from ..preprocess import OK, image_upscale, load_image_and_size, merge_status, text_column
from ._base import DUPLICATE_ID, InputBatch, duplicate_rows

__all__ = ["ImageReader", "IMAGE_SUFFIXES", "expand_image_paths", "image_files"]

#: An image enlarged more than this many times to the model's size is flagged (a thumbnail, an icon).
MAX_UPSCALE = 4

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def image_files(folder: str | Path) -> list[Path]:
    """The image files under *folder*, recursively (symbolic links followed), sorted by path.

    Hidden files and folders (a name that starts with a dot: ``.ipynb_checkpoints/``, macOS
    ``._x.jpg``) are skipped without being walked. Training (``train/data/images.py``)
    lists class folders with the same function.
    """
    out: list[str] = []
    seen: set[str] = set()  # real paths of the folders walked: a link back up is no loop
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(os.path.join(here, f) for f in files
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
    return [Path(f) for f in sorted(out)]


def _expand(paths: list[str]) -> list[tuple[str, str | None]]:
    """``(file, folder it was found in, or None for a file given as such)``, in input order."""
    out: list[tuple[str, str | None]] = []
    for p in paths:
        if os.path.isdir(p):
            found = image_files(p)
            if not found:
                raise InputError(f"{p}: folder contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend((str(f), p) for f in found)
        elif not os.path.exists(p):
            raise InputError(f"{p}: file does not exist")
        else:
            out.append((str(p), None))
    return out


def expand_image_paths(paths: list[str]) -> list[str]:
    """Files as given, folders expanded recursively to their image files (sorted; hidden ones skipped)."""
    return [f for f, _ in _expand(paths)]


def _classes_of(found: list[tuple[str, str | None]], classes: set[str]) -> list[str]:
    """The class folder of each image: under a folder given, the outermost folder below it that is
    named after a class (``root/dog/sub/x.jpg`` is a dog, as in training), else the folder given
    itself (``root/dog`` given alone); a file given alone: its own folder. Worked out once per folder."""
    memo: dict[tuple[str, str | None], str] = {}
    out = []
    for file, folder in found:
        parent = os.path.dirname(file)
        key = (parent, folder)
        if key not in memo:
            if folder is None:
                memo[key] = os.path.basename(os.path.abspath(parent))
            else:
                below = [n for n in Path(os.path.relpath(parent, folder)).parts if n in classes]
                memo[key] = below[0] if below else os.path.basename(os.path.abspath(folder))
        out.append(memo[key])
    return out


def _decode_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ImageReader:
    """Classify-ready batches from image files; an unreadable image becomes a failed row.

    Images are decoded by a small thread pool (Pillow releases the GIL while
    decoding and resizing); rows stay in input order.
    """

    def __init__(
        self, paths: list[str], spec: dict[str, Any], shape: tuple[int, int, int], threads: int | None = None,
        classes: list[str] | tuple[str, ...] | None = None, duplicates: np.ndarray | None = None,
    ) -> None:
        found = _expand(paths)
        self.files = [f for f, _ in found]
        self.path = self.files[0] if len(self.files) == 1 else f"{len(self.files)} images"
        self.n_rows: int | None = len(self.files)
        # the training layout, a folder per class: the folder names are the true labels, but
        # only when every image has one (a partial set of labels would bias the metrics)
        parents = _classes_of(found, set(classes or ()))
        self._labels = np.array(parents, dtype=object) if classes and set(parents) <= set(classes) else None
        self.has_labels = self._labels is not None
        self.why_no_labels: str | None = None
        if classes and not self.has_labels:
            strays = [f for f, d in zip(self.files, parents, strict=True) if d not in classes]
            self.why_no_labels = (
                f"{len(strays)} of {len(self.files)} images are not in a folder named after one of the model's "
                f"classes ({', '.join(classes)}), e.g. {strays[0]}; give the class folders alone to evaluate those"
            )
        # the same image twice (e.g. given alone and inside a folder): kept, flagged; a caller
        # that found them already (Dask: over all the files, not one task's) passes the rows
        if duplicates is not None:
            self._dup = np.zeros(len(self.files), dtype=bool)
            self._dup[np.asarray(duplicates, dtype=np.int64)] = True
        else:
            self._dup = duplicate_rows(np.array([os.path.realpath(f) for f in self.files], dtype=object))
        self._spec = spec
        self._shape = shape
        self._threads = threads or _decode_threads()
        self._pool: ThreadPoolExecutor | None = None

    def duplicate_rows(self) -> np.ndarray:
        """Row numbers of images that appeared in an earlier row (flagged ``duplicate id``)."""
        return np.flatnonzero(self._dup)

    def _load(self, name: str) -> tuple[np.ndarray | None, str]:
        try:
            arr, size = load_image_and_size(name, self._spec)
        except InputError as exc:
            return None, f"failed: {exc}"
        if arr.shape != self._shape:
            return None, f"failed: {name}: image gives shape {arr.shape}, model needs {self._shape}"
        if image_upscale(size, self._spec) > MAX_UPSCALE:
            # a thumbnail blown up to the model's size (a 1x1 GIF was a confident 'airplane'): scored,
            # flagged so that it can be found, as a resized stamp is
            return arr, f"flagged: image {size[0]}x{size[1]} upscaled more than {MAX_UPSCALE}x"
        return arr, OK

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of decoded, preprocessed images, in input order."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if self._threads > 1 and self._pool is None and len(self.files) > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="stampclf-decode")
        load = self._pool.map if self._pool is not None else map
        for start in range(0, len(self.files), batch_size):
            names = self.files[start : start + batch_size]
            x = np.zeros((len(names),) + self._shape, dtype=np.float32)
            status = text_column(len(names))
            for i, (arr, st) in enumerate(load(self._load, names)):  # map keeps input order
                status[i] = st
                if arr is not None:
                    x[i] = arr
            dup = self._dup[start : start + batch_size]
            status = merge_status(status, np.where(dup, DUPLICATE_ID, OK).astype(object))
            paths = np.array(names, dtype=object)
            labels = self._labels[start : start + batch_size] if self._labels is not None else None
            yield InputBatch(ids=paths, x=x, status=status, files=paths, labels=labels)

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
