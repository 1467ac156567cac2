"""FITS cut-out files: one file per channel, or one multi-extension file per stamp.

* **One file per channel**: ``<id>_<channel>.fits`` (also ``.fits.gz``, ``.fz``),
  the channel token being one of ``science``/``sci``, ``template``/``ref``/
  ``reference``, ``difference``/``diff`` (ZTF's ``refmsci`` too) or
  ``snr_difference``/``snr``. Files with the same ``<id>`` make one stamp;
  ZTF's own names (``candid<N>_pid<P>_targ_sci.fits.gz``, ``candid<N>_ref.fits.gz``)
  group by ``candid`` and the id is ``<N>``.
* **Multi-extension file**: image extensions whose ``EXTNAME`` is a channel name
  (``SCIENCE``, ``TEMPLATE``, ``DIFFERENCE``, ...). 2-D images give one stamp
  (id: the file name), 3-D ``(N, H, W)`` images N stamps (id: ``<file>[i]``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import InputError, open_failure
from ._base import InputBatch
from ._cutouts import canonical_channel, card_channels, cutouts_to_input, quiet_astropy

__all__ = ["FITSReader", "FITS_SUFFIXES", "is_fits", "channel_of"]

#: File name endings read as FITS.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")
_FITS_MAGIC = b"SIMPLE  ="
_ZTF_NAME = re.compile(r"^candid(-?\d+)")


def is_fits(path: str) -> bool:
    """True for a FITS file name ending or a file starting with ``SIMPLE  =``."""
    if path.lower().endswith(FITS_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(9) == _FITS_MAGIC
    except OSError:
        return False


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def channel_of(path: str) -> tuple[str, str] | None:
    """``(stamp key, channel kind)`` from a per-channel file name, or None."""
    stem = _stem(path)
    parts = re.split(r"[_\-.]", stem)
    if len(parts) < 2:
        return None
    kind = canonical_channel(parts[-1])
    if kind is None and len(parts) >= 3:  # e.g. "..._snr_difference"
        kind = canonical_channel("_".join(parts[-2:]))
        key = stem[: -len("_".join(parts[-2:])) - 1] if kind else ""
    else:
        key = stem[: -len(parts[-1]) - 1]
    if kind is None:
        return None
    ztf = _ZTF_NAME.match(key)
    return (ztf.group(1) if ztf else key), kind


def _read_hdus(path: str) -> list[tuple[str, np.ndarray]]:
    """``(EXTNAME, pixels)`` of every image HDU with data; `InputError` naming the file."""
    try:
        from astropy.io import fits
    except ImportError:
        raise InputError(f"{path}: reading FITS files needs astropy (pip install 'stampclf[alerts]')") from None
    out: list[tuple[str, np.ndarray]] = []
    try:
        with quiet_astropy():
            with fits.open(path, memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.is_image and hdu.data is not None:
                        out.append((str(hdu.header.get("EXTNAME", hdu.name or "")), np.asarray(hdu.data, np.float32)))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise open_failure(path, exc) or InputError(f"{path}: cannot open") from None
    except Exception as exc:  # noqa: BLE001 - astropy raises many untyped errors on corrupt files
        raise InputError(f"{path}: corrupt FITS ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not out:
        raise InputError(f"{path}: FITS file holds no image")
    return out


class FITSReader:
    """Stamps from FITS cut-out files (see the module docstring for the layouts).

    A file that cannot be read stops the reader with an `InputError` naming it; a
    stamp missing a channel the model needs is a ``failed`` row.
    """

    has_labels = False

    def __init__(self, paths: list[str], card: Any) -> None:
        self.card = card
        self._kinds = card_channels(card)
        self.files = [str(p) for p in paths]
        self.path = self.files[0] if len(self.files) == 1 else f"{len(self.files)} FITS files"
        # items: (id, {kind: path}) for per-channel files, (None, path) for multi-extension files
        self._items: list[tuple[str | None, Any]] = []
        keyed: dict[str, dict[str, str]] = {}
        for p in self.files:
            found = channel_of(p)
            if found is None:
                self._items.append((None, p))
                continue
            key, kind = found
            if key not in keyed:
                keyed[key] = {}
                self._items.append((key, keyed[key]))
            if kind in keyed[key]:
                raise InputError(f"{p}: second {kind} file for stamp {key!r} (first: {keyed[key][kind]})")
            keyed[key][kind] = p
        self.n_rows: int | None = None if any(k is None for k, _ in self._items) else len(self._items)

    def _rows(self) -> Iterator[tuple[str, dict[str, Any], str]]:
        """``(id, {channel: plane}, file)``; *file* is the stamp's science file when it has one."""
        for key, item in self._items:
            if key is not None:
                planes: dict[str, Any] = {}
                for kind, p in item.items():
                    hdus = _read_hdus(p)
                    if hdus[0][1].ndim != 2:
                        raise InputError(f"{p}: image has shape {hdus[0][1].shape}; expected a 2-D cut-out")
                    planes[kind] = hdus[0][1]
                yield key, planes, item.get("science", next(iter(item.values())))
                continue
            named = {}
            for ext, arr in _read_hdus(item):
                kind = canonical_channel(ext)
                if kind is not None and kind not in named:
                    named[kind] = arr
            if not named:
                raise InputError(
                    f"{item}: cannot tell the channel: name the file <id>_<channel>.fits "
                    f"or name its extensions SCIENCE, TEMPLATE, DIFFERENCE"
                )
            shapes = {a.shape for a in named.values()}
            if len(shapes) > 1 and any(a.ndim == 3 for a in named.values()):
                raise InputError(f"{item}: channel cubes disagree in shape: {sorted(shapes)}")
            first = next(iter(named.values()))
            stem = _stem(item)
            if first.ndim == 2:
                yield stem, named, item
            elif first.ndim == 3:
                for i in range(first.shape[0]):
                    yield f"{stem}[{i}]", {k: a[i] for k, a in named.items()}, item
            else:
                raise InputError(f"{item}: images have shape {first.shape}; expected (H, W) or (N, H, W)")

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of preprocessed rows (``x`` and ``status`` set)."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        rows: list[tuple[str, dict[str, Any], str]] = []
        for row in self._rows():
            rows.append(row)
            if len(rows) == batch_size:
                yield self._batch(rows)
                rows = []
        if rows:
            yield self._batch(rows)

    def _batch(self, rows: list[tuple[str, dict[str, Any], str]]) -> InputBatch:
        kinds = set(self._kinds) | {"difference"}
        cutouts = {k: [planes.get(k) for _, planes, _ in rows] for k in kinds}
        files = np.array([f for _, _, f in rows], dtype=object)  # each row names its own file
        what = files[0] if len(set(files.tolist())) == 1 else f"{files[0]} and {len(set(files.tolist())) - 1} more"
        x, status = cutouts_to_input(cutouts, self.card, what)
        ids = np.array([key for key, _, _ in rows], dtype=object)
        return InputBatch(ids=ids, x=x, status=status, files=files)

    def close(self) -> None:
        """Nothing stays open between batches."""
