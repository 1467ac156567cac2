"""FITS cut-outs to model input: decoding, channel mapping, derived SNR, recentring.

Shared by the Avro alert reader (`stampclf.io._alerts`) and the FITS file reader
(`stampclf.io._fits`). Needs ``astropy`` only for FITS files that the small
built-in parser does not handle (compressed or multi-extension images, integer
pixels with BLANK values).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import InputError
from ..preprocess import _robust_centre_scale, merge_status, prepare_stamps, text_column

__all__ = [
    "CHANNEL_ALIASES",
    "DERIVED_SNR",
    "canonical_channel",
    "decode_fits",
    "derive_snr",
    "derive_snr_rows",
    "cutouts_to_input",
    "classify_cutouts",
    "quiet_astropy",
]

#: Channel names a model card may use, and what they mean for survey cut-outs.
CHANNEL_ALIASES: dict[str, str] = {
    "science": "science",
    "sci": "science",
    "template": "template",
    "reference": "template",
    "ref": "template",
    "temp": "template",
    "tmpl": "template",
    "difference": "difference",
    "diff": "difference",
    "refmsci": "difference",  # ZTF: reference minus science... named after the subtraction
    "scimref": "difference",
    "snr_difference": "snr_difference",
    "snr": "snr_difference",
    "snr_diff": "snr_difference",
}

#: Flag of a row whose SNR-difference channel was computed from its difference cut-out.
DERIVED_SNR = "snr_difference derived from difference"

_GZIP_MAGIC = b"\x1f\x8b"
_FITS_MAGIC = b"SIMPLE  ="
_CARD, _BLOCK = 80, 2880
_FLOAT_BITPIX = {-32: ">f4", -64: ">f8"}


def canonical_channel(name: str) -> str | None:
    """The cut-out kind (science, template, difference, snr_difference) of a channel name."""
    return CHANNEL_ALIASES.get(name.strip().lower())


def _describe(data: bytes) -> str:
    """What a blob that is not FITS looks like, for error messages."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG image data"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG image data"
    if not data:
        return "empty"
    return f"starts with {data[:8]!r}"


def _fast_image(data: bytes) -> np.ndarray | None:
    """Parse a primary-HDU 2-D float image without astropy; None when unusual.

    Covers what alert streams send (ZTF, DECam, Rubin: BITPIX -32, NAXIS 2, no
    scaling); anything else goes to astropy.
    """
    header: dict[str, str] = {}
    pos = 0
    while True:
        if pos + _CARD > len(data):
            return None
        card = data[pos : pos + _CARD].decode("ascii", "replace")
        pos += _CARD
        key = card[:8].strip()
        if key == "END":
            break
        if card[8:10] == "= ":
            header[key] = card[10:].split("/", 1)[0].strip()
    try:
        bitpix, naxis = int(header["BITPIX"]), int(header["NAXIS"])
        if naxis != 2 or bitpix not in _FLOAT_BITPIX:
            return None
        if float(header.get("BSCALE", "1")) != 1.0 or float(header.get("BZERO", "0")) != 0.0:
            return None
        w, h = int(header["NAXIS1"]), int(header["NAXIS2"])
    except (KeyError, ValueError):
        return None
    start = -(-pos // _BLOCK) * _BLOCK
    size = w * h * abs(bitpix) // 8
    if w < 1 or h < 1 or start + size > len(data):
        return None
    arr = np.frombuffer(data, dtype=_FLOAT_BITPIX[bitpix], count=w * h, offset=start)
    return arr.reshape(h, w).astype(np.float32)


_ASTROPY_WARNINGS = threading.Lock()


@contextlib.contextmanager
def quiet_astropy() -> Iterator[None]:
    """Keep astropy's warnings about non-standard headers off stderr while it parses a file.

    ``warnings.catch_warnings`` swaps the process-wide filter list and restores it on
    exit: two threads inside it at once restore each other's lists and let a warning
    through (an error under ``-W error``). The lock keeps stampclf's own uses (reader
    threads, Dask worker threads) from overlapping.
    """
    from astropy.utils.exceptions import AstropyWarning

    with _ASTROPY_WARNINGS, warnings.catch_warnings():
        # e.g. ZTF's "Found a SIMPLE card but its format doesn't respect the FITS Standard"
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def _astropy_image(data: bytes, what: str) -> np.ndarray:
    try:
        from astropy.io import fits
    except ImportError:
        raise InputError(f"{what}: reading this FITS file needs astropy (pip install 'stampclf[alerts]')") from None
    try:
        with quiet_astropy():
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.is_image and hdu.data is not None and hdu.data.ndim >= 2:
                        arr = np.asarray(hdu.data, dtype=np.float32)
                        break
                else:
                    raise InputError(f"{what}: FITS file holds no image")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - astropy raises many untyped errors on corrupt files
        raise InputError(f"{what}: corrupt FITS ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if arr.ndim > 2:
        squeezed = arr.reshape((-1,) + arr.shape[-2:])
        if squeezed.shape[0] != 1:
            raise InputError(f"{what}: FITS image has shape {arr.shape}; expected one 2-D cut-out")
        arr = squeezed[0]
    return arr


def decode_fits(data: bytes | bytearray | memoryview, what: str = "cut-out") -> np.ndarray:
    """Pixels of a FITS cut-out (plain or gzipped bytes) as a 2-D float32 array.

    Raises
    ------
    InputError
        Naming *what* when the bytes are not a readable FITS image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{what}: expected FITS bytes, got {type(data).__name__} (a file? read its bytes first)")
    data = bytes(data)
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{what}: corrupt gzip data ({exc})") from None
    if not data.startswith(_FITS_MAGIC):
        raise InputError(f"{what}: not FITS ({_describe(data)})")
    arr = _fast_image(data)
    return arr if arr is not None else _astropy_image(data, what)


def derive_snr(difference: np.ndarray) -> np.ndarray:
    """Difference divided by a robust estimate of its noise (1.4826 x MAD, NaN-aware).

    The noise is one number per cut-out (the median absolute deviation of all
    finite pixels, falling back to the standard deviation when the MAD is 0):
    surveys do not ship a per-pixel noise map with their cut-outs.
    """
    return derive_snr_rows(np.asarray(difference)[None])[0]


def derive_snr_rows(difference: np.ndarray) -> np.ndarray:
    """`derive_snr` of each of ``(N, H, W)`` difference cut-outs (one noise figure per cut-out)."""
    diff = np.asarray(difference, dtype=np.float32)
    flat = diff.reshape(len(diff), -1)
    _, sigma = _robust_centre_scale(flat, np.isfinite(flat).all(axis=1))
    return (diff / sigma[:, None, None]).astype(np.float32)  # sigma > 0 always (1 where undefined)


def _pad_to(arr: np.ndarray, height: int, width: int, before: tuple[int, int] | None = None) -> np.ndarray:
    """NaN-pad a 2-D array to ``(height, width)``, centred or with *before* rows/columns first."""
    h, w = arr.shape
    top, left = before if before is not None else ((height - h) // 2, (width - w) // 2)
    out = np.full((height, width), np.nan, dtype=np.float32)
    out[top : top + h, left : left + w] = arr
    return out


def _edge_offsets(shape: tuple[int, int], nominal: int, pos: tuple[float, float]) -> tuple[int, int]:
    """Rows/columns missing before a cut-out that was truncated at an image edge.

    *pos* is the source's 1-based pixel ``(x, y)`` on the survey image: a source
    closer to the low edge than half a cut-out lost pixels at the start (low
    index), otherwise at the end.
    """
    h, w = shape
    x, y = pos
    half = (nominal - 1) / 2.0
    top = nominal - h if h < nominal and (y - 1) < half else 0
    left = nominal - w if w < nominal and (x - 1) < half else 0
    return top, left


def _is_edge_cutout(shape: tuple[int, int], nominal: int, pos: tuple[float, float]) -> bool:
    """A cut-out smaller than *nominal* because the survey image ended there.

    One axis full and the other short, or both short with the source near the
    image's low corner; small stamps of another survey are not mistaken for one.
    """
    h, w = shape
    if h > nominal or w > nominal or (h == nominal and w == nominal):
        return False
    if (h == nominal) != (w == nominal):
        return True
    half = (nominal - 1) / 2.0
    return (pos[0] - 1) < half and (pos[1] - 1) < half


def _row_stamp(
    row: Mapping[str, Any],
    channels: list[str],
    what: str,
    nominal: int | None,
    pos: tuple[float, float] | None,
) -> tuple[np.ndarray, list[str]]:
    """Decode one row's cut-outs into ``(C, H, W)`` in the card's order, plus flag notes."""
    notes: list[str] = []
    planes: dict[str, np.ndarray] = {}
    for kind in dict.fromkeys(channels):
        if kind == "snr_difference" and row.get("snr_difference") is None:
            continue
        blob = row.get(kind)
        if blob is None:
            raise InputError(f"no {kind} cut-out")
        planes[kind] = blob if isinstance(blob, np.ndarray) else decode_fits(blob, kind)
        if planes[kind].ndim != 2 or planes[kind].size == 0:
            raise InputError(f"{kind} cut-out has shape {planes[kind].shape}")
    if "snr_difference" in channels and "snr_difference" not in planes:
        diff = planes.get("difference")
        if diff is None:
            blob = row.get("difference")
            if blob is None:
                raise InputError("no difference cut-out to derive snr_difference from")
            diff = decode_fits(blob, "difference")
        planes["snr_difference"] = derive_snr(diff)
        notes.append(DERIVED_SNR)
    shapes = {k: p.shape for k, p in planes.items()}
    height = max(s[0] for s in shapes.values())
    width = max(s[1] for s in shapes.values())
    if len(set(shapes.values())) > 1:
        notes.append("cut-out sizes differ (" + ", ".join(f"{k} {s[0]}x{s[1]}" for k, s in shapes.items()) + ")")
    if nominal is not None and pos is not None and _is_edge_cutout((height, width), nominal, pos):
        # Edge cut-out: restore the missing side so the source stays at the centre
        # (a plain centre crop would move it off-centre by up to half the missing size).
        before = _edge_offsets((height, width), nominal, pos)
        notes.append(f"edge cut-out {height}x{width} padded to {nominal}x{nominal} around the source")
        height = width = nominal
        planes = {k: _pad_to(p, height, width, before) for k, p in planes.items()}
    else:
        planes = {k: p if p.shape == (height, width) else _pad_to(p, height, width) for k, p in planes.items()}
    return np.stack([planes[k] for k in channels]), notes


def cutouts_to_input(
    cutouts: Mapping[str, Sequence[Any]],
    card: Any,
    what: str = "cut-outs",
    nominal: int | None = None,
    positions: Sequence[tuple[float, float] | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Model input and per-row status from cut-outs, one row per alert.

    Parameters
    ----------
    cutouts
        ``{kind: [blob per row]}`` with kind ``science``, ``template``,
        ``difference`` (and optionally ``snr_difference``); a blob is FITS bytes
        (plain or gzipped), a 2-D array, or None when the alert has no such cut-out.
    card
        The model card: ``input.channels`` name the cut-outs needed, in order
        (aliases such as ``reference`` for ``template`` are understood).
    what
        Name of the input in messages.
    nominal, positions
        Nominal cut-out side and each row's source position ``(x, y)`` (1-based
        pixels on the survey image): cut-outs truncated at an image edge are
        padded on the missing side so the source stays centred.

    Returns
    -------
    x, status
        As `stampclf.preprocess.prepare_stamps`; a row whose cut-out cannot be
        decoded is ``failed: <channel>: <reason>`` (its pixels are zeros), a row
        whose SNR-difference was derived is flagged ``snr_difference derived from
        difference``.
    """
    channels = card_channels(card)
    n = len(next(iter(cutouts.values()))) if cutouts else 0
    c, height, width = len(channels), int(card.input["height"]), int(card.input["width"])
    x = np.zeros((n, c, height, width), dtype=np.float32)
    status = text_column(n)
    notes = text_column(n)
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for i in range(n):
        row = {k: v[i] for k, v in cutouts.items()}
        pos = positions[i] if positions is not None else None
        try:
            stamp, row_notes = _row_stamp(row, channels, what, nominal, pos)
        except InputError as exc:
            status[i] = f"failed: {exc}"
            continue
        if row_notes:
            notes[i] = "flagged: " + "; ".join(row_notes)
        groups.setdefault(stamp.shape[1:], []).append((i, stamp))
    for shape, members in groups.items():
        idx = np.array([i for i, _ in members])
        try:
            gx, gs = prepare_stamps(
                np.stack([s for _, s in members]), card.input, card.preprocessing, f"{what} ({shape[0]}x{shape[1]})"
            )
        except InputError as exc:  # e.g. a strict size policy: these rows fail, the others go on
            status[idx] = f"failed: {str(exc).split(': ', 1)[-1]}"
            continue
        x[idx] = gx
        status[idx] = merge_status(gs, notes[idx])
    return x, status


def card_channels(card: Any) -> list[str]:
    """The card's channels as cut-out kinds; `InputError` for a channel no cut-out provides."""
    out: list[str] = []
    for name in card.input["channels"]:
        kind = canonical_channel(name)
        if kind is None:
            raise InputError(
                f"model {card.name!r} needs channel {name!r}, which alert/FITS cut-outs do not provide "
                f"(they provide science, template, difference; snr_difference is derived)"
            )
        out.append(kind)
    return out


def _canonical_cutouts(cutouts: Mapping[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """A caller's ``{kind: [blob per row]}`` with its keys as cut-out kinds (aliases understood), checked."""
    if not isinstance(cutouts, Mapping):
        raise InputError(f"cut-outs: expected a mapping {{kind: [blob per row]}}, got {type(cutouts).__name__}")
    out: dict[str, Sequence[Any]] = {}
    for key, blobs in cutouts.items():
        kind = canonical_channel(str(key))
        if kind is None:
            raise InputError(f"cut-outs: unknown kind {key!r}; use {', '.join(sorted(set(CHANNEL_ALIASES.values())))} "
                             f"or an alias ({', '.join(k for k in CHANNEL_ALIASES if k not in CHANNEL_ALIASES.values())})")
        if kind in out:
            raise InputError(f"cut-outs: two keys for the {kind} cut-outs (one is {key!r})")
        single_array = isinstance(blobs, np.ndarray) and (blobs.ndim in (0, 2) or (blobs.ndim == 1 and blobs.dtype != object))
        if isinstance(blobs, (bytes, bytearray, memoryview, str)) or single_array:
            raise InputError(f"cut-outs: {key!r} must hold one cut-out per row (a list), got one {type(blobs).__name__}")
        out[kind] = blobs
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"cut-outs: the kinds have different numbers of rows: {lengths}")
    return out


def classify_cutouts(
    clf: Any,
    cutouts: Mapping[str, Sequence[Any]],
    ids: Sequence[Any] | None = None,
    nominal: int | None = None,
    positions: Sequence[tuple[float, float] | None] | None = None,
) -> Any:
    """Classify rows of cut-outs (FITS bytes, gzipped or not, or 2-D arrays) with a `Classifier`.

    The building block for broker integrations (e.g. a Spark pandas UDF over a
    column of ZTF ``cutoutScience.stampData``): ``cutouts`` maps ``science``,
    ``template``, ``difference`` to one blob per row; *nominal* and *positions*
    as in `cutouts_to_input` (ZTF: 63 and ``candidate.xpos/ypos``). Returns
    `Predictions` in row order; rows that cannot be decoded are ``failed`` with
    NaN probabilities.
    """
    from ..classifier import Predictions, _check_ids, _flag_duplicate_ids

    x, status = cutouts_to_input(_canonical_cutouts(cutouts), clf.card, "cut-outs", nominal, positions)
    ids, status = _flag_duplicate_ids(None if ids is None else _check_ids(ids, len(status)), status)
    proba, labels, status = clf._predict_prepared(x, status)
    return clf._provenance(Predictions(ids, labels, proba, status))
