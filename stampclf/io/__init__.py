"""Readers (HDF5 stamps, image files, Avro alerts, FITS cut-outs) and writers (CSV, HDF5)."""

from __future__ import annotations

import os
from typing import Any

from .._errors import InputError
from ._alerts import AVRO_MAGIC, AlertReader
from ._base import InputBatch, Reader
from ._cutouts import classify_cutouts, cutouts_to_input, decode_fits
from ._fits import FITSReader, channel_of, is_fits
from ._hdf5 import LAYOUTS, HDF5Reader
from ._images import IMAGE_SUFFIXES, ImageReader
from ._writers import OUTPUT_FORMATS, ResultWriter, open_writer, run_attrs

__all__ = [
    "InputBatch",
    "Reader",
    "HDF5Reader",
    "ImageReader",
    "AlertReader",
    "FITSReader",
    "cutouts_to_input",
    "classify_cutouts",
    "decode_fits",
    "ResultWriter",
    "open_writer",
    "run_attrs",
    "open_inputs",
    "input_paths",
    "LAYOUTS",
    "OUTPUT_FORMATS",
]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


def _is_hdf5(path: str) -> bool:
    if path.lower().endswith(_HDF5_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _is_avro(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == AVRO_MAGIC
    except OSError:
        return path.lower().endswith(".avro")


def input_kind(path: str) -> str:
    """``"hdf5"``, ``"alerts"`` (Avro), ``"fits"``, ``"image"`` or ``"dir"`` for a path given on the command line."""
    if os.path.isdir(path):
        return "dir"
    if not os.path.exists(path):
        raise InputError(f"{path}: file does not exist")
    if _is_hdf5(path):
        return "hdf5"
    if _is_avro(path):
        return "alerts"
    if path.lower().endswith(".avro"):
        raise InputError(f"{path}: not an Avro container file (no 'Obj' header)")
    if is_fits(path):
        return "fits"
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return "image"
    raise InputError(
        f"{path}: unknown input type (expected HDF5 stamps, Avro alerts, FITS cut-outs or an image: "
        f"{', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def input_paths(inputs: Any) -> list[str]:
    """*inputs* (one path, or a list or other iterable of paths; ``str``, ``bytes`` or ``os.PathLike``) as str."""
    items = [inputs] if isinstance(inputs, (str, bytes, os.PathLike)) else inputs
    try:
        items = list(items)
    except TypeError:  # not iterable: refused below, by name
        items = [inputs]
    bad = [p for p in items if not isinstance(p, (str, bytes, os.PathLike))]
    if bad:
        raise InputError(f"input path {bad[0]!r}: expected a file name (str or os.PathLike), or a list of them")
    return [os.fsdecode(p) for p in items]


def open_inputs(
    paths: list[str], card: Any, layout: str = "auto", channels_last: bool = False, keep_going: bool = False
) -> list[tuple[list[str], Any]]:
    """Group *paths* into readers to open, in input order.

    Returns ``(paths, opener)`` pairs: HDF5 files one each, runs of consecutive
    image files and folders together. Openers are called lazily, by the caller:
    `classify_files` opens all of them once before classifying (or, with
    ``keep_going``, each in turn, so that one bad file does not stop the others).
    A path that is missing or of no known kind raises `InputError` here, or, with
    *keep_going*, gets an opener that raises it, so the caller reports it among the
    other bad files and goes on.
    """
    groups: list[tuple[list[str], Any]] = []
    seen: dict[str, str] = {}
    for path in paths:
        try:
            _refuse_repeat(path, seen)
            _add_input(groups, path, card, layout, channels_last)
        except InputError as exc:
            if not keep_going:
                raise
            groups.append(([path], _Failing(exc)))
    return groups


def _refuse_repeat(path: str, seen: dict[str, str]) -> None:
    """An input file given twice (e.g. overlapping globs) would be classified twice: refuse it.

    Images are rows, not files of rows: one given twice is flagged ``duplicate id`` instead.
    """
    if not os.path.isfile(path) or os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return
    real = os.path.realpath(path)
    if real in seen:
        raise InputError(f"{path}: given twice (also as {seen[real]}); each input is classified once")
    seen[real] = path


class _Failing:
    """The opener of an input that cannot be opened: raises its error when called."""

    def __init__(self, error: InputError) -> None:
        self.error = error

    def __call__(self) -> Any:
        raise self.error


def _add_input(groups: list[tuple[list[str], Any]], path: str, card: Any, layout: str, channels_last: bool) -> None:
    """Append *path* to *groups*: a new reader, or the previous one when it continues it."""
    kind = input_kind(path)
    if kind == "hdf5":
        if card.kind != "stamp":
            raise InputError(f"{path}: HDF5 stamps given but model {card.name!r} classifies images")
        groups.append(([path], lambda p=path: HDF5Reader(p, card.input, layout, channels_last)))
        return
    if kind in ("alerts", "fits"):
        if card.kind != "stamp":
            raise InputError(f"{path}: {kind} cut-outs given but model {card.name!r} classifies images")
        if kind == "alerts":
            alerts_opener: Any = lambda p=path: AlertReader(p, card)  # noqa: E731
            alerts_opener.extra_columns = AlertReader.extra_columns
            groups.append(([path], alerts_opener))
            return
        # per-channel files (<id>_<channel>.fits) in a row make one reader; other FITS files one each
        if channel_of(path) and groups and getattr(groups[-1][1], "fits_channels", False):
            groups[-1][0].append(path)
            return
        fits_group: list[str] = [path]
        fits_opener: Any = lambda g=fits_group: FITSReader(g, card)  # noqa: E731
        fits_opener.fits_channels = channel_of(path) is not None
        groups.append((fits_group, fits_opener))
        return
    if card.kind != "image" and kind == "dir":
        raise InputError(
            f"{path}: a folder; model {card.name!r} classifies stamps, and only image models read folders: "
            f"give the files (e.g. {os.path.join(path, '*.h5')})"
        )
    if card.kind != "image":
        raise InputError(
            f"{path}: model {card.name!r} classifies {card.shape[0]}-channel stamps from HDF5, not images"
        )
    if groups and groups[-1][0] and getattr(groups[-1][1], "images", False):
        groups[-1][0].append(path)
        return
    group: list[str] = [path]

    def opener(g: list[str] = group) -> ImageReader:
        return ImageReader(g, card.preprocessing, card.shape, classes=card.classes)

    opener.images = True  # type: ignore[attr-defined]
    groups.append((group, opener))
