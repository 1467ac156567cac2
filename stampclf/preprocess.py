"""Preprocessing shared by training and runtime (pure numpy and Pillow).

Training code in ``train/`` imports these functions, so a model sees exactly the
same numbers in training and in deployment. Every parameter comes from the
``preprocessing`` section of the model card.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import InputError, open_failure

__all__ = [
    "OK",
    "fit_size",
    "normalise",
    "prepare_stamps",
    "fit_stamps",
    "channel_major",
    "stamp_status",
    "merge_status",
    "text_column",
    "load_image",
    "load_image_and_size",
    "image_upscale",
    "open_image",
    "image_to_array",
    "image_to_uint8",
    "scale_pixels",
]

#: Status of a row that needed no intervention.
OK = "ok"
#: Version of what `image_to_uint8` returns for a given file and spec; training's decoded-image
#: cache is keyed by it, so a change here (bump it) never reuses pixels decoded the old way.
IMAGE_DECODE_VERSION = 4

_MAD_TO_SIGMA = 1.4826  # sigma of a Gaussian from its median absolute deviation


def _check_numeric(x: np.ndarray, what: str) -> None:
    if x.dtype.kind not in "fiu":
        raise InputError(f"{what}: dtype {x.dtype} is not numeric (expected float or integer pixels)")


def text_column(n: int, text: str = OK) -> np.ndarray:
    """An object array of *n* times *text* (a status or text column).

    ``np.full`` with ``dtype=object`` takes ~30 ns a row (a conversion per element);
    this takes ~2, which counts on the GPU path, where the main thread makes one a batch.
    """
    out = np.empty(n, dtype=object)
    out.fill(text)
    return out


def merge_status(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Combine two per-row statuses: a failure wins, flag reasons are joined.

    Used to add what a reader noticed (e.g. a duplicate id) to what preprocessing found.
    """
    if len(first) != len(second):
        raise ValueError(f"merge_status: {len(first)} vs {len(second)} rows")
    out = np.array(first, dtype=object, copy=True)
    for i in np.flatnonzero(np.asarray(second, dtype=object) != OK).tolist():  # only rows with news: fast
        a, b = first[i], second[i]
        if a.startswith("failed"):
            continue
        if a == OK or b.startswith("failed"):
            out[i] = b
        else:
            out[i] = f"{a}; {b.removeprefix('flagged: ')}"
    return out


def fit_size(stamps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop or NaN-pad the last two axes to ``(height, width)``.

    Padding is NaN so that the NaN policy treats it like any masked pixel.
    """
    h, w = stamps.shape[-2:]
    out = stamps
    if h > height or w > width:
        top, left = max((h - height) // 2, 0), max((w - width) // 2, 0)
        out = out[..., top : top + min(h, height), left : left + min(w, width)]
    h, w = out.shape[-2:]
    if h < height or w < width:
        top, left = (height - h) // 2, (width - w) // 2
        padded = np.full(out.shape[:-2] + (height, width), np.nan, dtype=np.float32)
        padded[..., top : top + h, left : left + w] = out
        out = padded
    return out


def _median_rows_inplace(rows: np.ndarray) -> np.ndarray:
    """Median of each row of a finite 2-D array, partitioning *rows* in place.

    Bitwise equal to ``np.median(rows, axis=1)`` for finite input: the middle
    element, or the float mean of the two middle elements for an even count.
    """
    m = rows.shape[1]
    k = m // 2
    if m % 2:
        rows.partition(k, axis=1)
        return rows[:, k].copy()
    rows.partition((k - 1, k), axis=1)
    return (rows[:, k - 1] + rows[:, k]) / 2


def _robust_centre_scale(flat: np.ndarray, finite_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust sigma of each row of ``flat`` (rows, pixels), NaN-aware."""
    centre = np.empty(flat.shape[0], dtype=np.float32)
    sigma = np.empty(flat.shape[0], dtype=np.float32)
    clean = finite_rows
    if clean.any():
        # One scratch copy, partitioned in place twice (median, then MAD): the same
        # numbers as np.median, several times faster (no NaN check, no extra copies).
        work = flat.copy() if clean.all() else flat[clean]
        med = _median_rows_inplace(work)
        np.subtract(work, med[:, None], out=work)
        np.abs(work, out=work)
        mad = _median_rows_inplace(work)
        centre[clean], sigma[clean] = med, mad * _MAD_TO_SIGMA
        # a stamp with many identical pixels (zero-filled mask) has MAD 0: fall back to std
        zero = clean.copy()
        zero[clean] = sigma[clean] <= 0
        if zero.any():
            sigma[zero] = flat[zero].std(axis=1)
    dirty = ~finite_rows
    if dirty.any():
        rows = np.where(np.isfinite(flat[dirty]), flat[dirty], np.nan)
        # rows without a finite pixel keep centre 0 and sigma 1: left out of the nan-functions,
        # which would warn (and warnings filters are process-wide, not safe to toggle per thread)
        some = np.isfinite(rows).any(axis=1)
        med, sig = np.zeros(len(rows), np.float32), np.ones(len(rows), np.float32)
        if some.any():
            r = rows[some]
            m = np.nanmedian(r, axis=1)
            mad = np.nanmedian(np.abs(r - m[:, None]), axis=1) * _MAD_TO_SIGMA
            med[some], sig[some] = m, np.where(mad > 0, mad, np.nanstd(r, axis=1))
        centre[dirty], sigma[dirty] = med, sig
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, 1.0).astype(np.float32)
    return centre, sigma


def normalise(stamps: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Scale each stamp and channel as the card's ``normalisation`` says.

    Methods
    -------
    ``robust_asinh``
        ``asinh((x - median) / (softening * sigma))`` with sigma from the median
        absolute deviation: in units of the stamp's own noise, so a bright
        neighbour cannot squash the candidate the way min-max scaling does.
    ``minmax``
        ``(x - min) / (max - min)`` per stamp and channel (Deep-HiTS).
    ``none``
        unchanged.

    Non-finite pixels stay non-finite; `prepare_stamps` applies the NaN policy.
    """
    method = spec.get("method", "none")
    x = stamps.astype(np.float32, copy=False)
    if method == "none":
        return x
    if method not in ("robust_asinh", "minmax"):
        raise InputError(f"unknown normalisation method {method!r} in model card")
    out = np.empty(x.shape, dtype=np.float32)
    # rows in the order they lie in memory (a channel-major block as the HDF5 reader gives
    # it is not copied into (N, C) order first); the output is (N, C) order all the same
    rows, out_rows = (x.transpose(1, 0, 2, 3), out.transpose(1, 0, 2, 3)) if channel_major(x) else (x, out)
    flat = rows.reshape(rows.shape[0] * rows.shape[1], -1)
    dest = out_rows.reshape(*rows.shape[:2], -1)  # a view of `out`, rows as in `flat`
    src = flat.reshape(dest.shape)
    finite = np.isfinite(flat)
    if method == "robust_asinh":
        centre, sigma = _robust_centre_scale(flat, finite.all(axis=1))
        soft = float(spec.get("softening", 1.0))
        # in place on one buffer: the same arithmetic as asinh((flat - c) / (s * soft))
        np.subtract(src, centre.reshape(*dest.shape[:2], 1), out=dest)
        np.divide(dest, (sigma * soft).reshape(*dest.shape[:2], 1), out=dest)
        np.arcsinh(dest, out=dest)
    else:
        # min and max of the finite pixels (rows with none: 0 and 0), without the nan-functions'
        # warnings (process-wide filters are not safe to toggle with several threads)
        if flat.size:
            lo = np.where(finite, flat, np.inf).min(axis=1)
            hi = np.where(finite, flat, -np.inf).max(axis=1)
            lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
        else:
            lo = hi = flat[:, 0]
        span = np.where(hi > lo, hi - lo, 1.0)
        np.subtract(src, lo.reshape(*dest.shape[:2], 1), out=dest)
        np.divide(dest, span.reshape(*dest.shape[:2], 1), out=dest)
    return out


def channel_major(x: np.ndarray) -> bool:
    """Whether ``(N, C, H, W)`` *x* views channel-major memory (each channel's rows contiguous).

    The HDF5 reader gives batches so (one dataset per channel, read without a copy);
    normalisation and the device graphs take them as they are.
    """
    return bool(
        x.ndim == 4 and x.shape[0] > 1 and x.shape[1] > 1 and x.strides[1] > x.strides[0] and x[:, 0].flags.c_contiguous
    )


def fit_stamps(
    stamps: np.ndarray, card_input: dict[str, Any], spec: dict[str, Any], what: str = "stamps"
) -> tuple[np.ndarray, str, str]:
    """Check raw stamps and bring them to the model's size: the first half of `prepare_stamps`.

    Returns
    -------
    x
        ``(N, C, height, width)`` float32 raw pixels (NaN where padded).
    note
        What every row needed (``"resized 25x25->21x21"``) or ``""``.
    padded
        Prefix for a row that fails because of the padding, or ``""``.
    """
    try:
        stamps = np.asarray(stamps)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise InputError(f"{what}: not an array of stamps ({exc})") from None
    _check_numeric(stamps, what)
    if stamps.ndim != 4:
        hint = "; one stamp needs the batch axis: stamp[None]" if stamps.ndim == 3 else ""
        raise InputError(f"{what}: expected 4 axes (N, C, H, W), got shape {stamps.shape}{hint}")
    n_ch = len(card_input["channels"])
    if stamps.shape[1] != n_ch:
        raise InputError(
            f"{what}: {stamps.shape[1]} channel(s) but the model needs {n_ch}: {card_input['channels']}"
        )
    height, width = int(card_input["height"]), int(card_input["width"])
    # float64 values beyond float32 range become inf here and are then handled by the NaN policy
    with np.errstate(over="ignore", invalid="ignore"):
        x = stamps.astype(np.float32, copy=False)
    note = padded = ""  # a small stamp's padding counts as not finite: a row that fails for it says so
    if x.shape[2:] != (height, width):
        if spec.get("size_policy", "strict") != "crop_or_pad":
            raise InputError(
                f"{what}: stamps are {x.shape[2]}x{x.shape[3]} but the model needs {height}x{width}"
            )
        if len(x) and x.shape[2] * x.shape[3] == 0:
            raise InputError(f"{what}: stamps are empty ({x.shape[2]}x{x.shape[3]} pixels)")
        note = f"resized {x.shape[2]}x{x.shape[3]}->{height}x{width}"
        if x.shape[2] < height or x.shape[3] < width:
            padded = f"{note} (padding is not finite): "
        x = fit_size(x, height, width)
    return x, note, padded


def stamp_status(
    bad: np.ndarray, constant: np.ndarray, note: str, padded: str, card_input: dict[str, Any], spec: dict[str, Any]
) -> np.ndarray:
    """Per-row status from what normalisation found: the second half of `prepare_stamps`.

    Parameters
    ----------
    bad
        ``(N, C)`` count of non-finite values per stamp channel after normalisation.
    constant
        ``(N, C)`` whether a channel holds one value after the NaN fill.
    note, padded
        From `fit_stamps`.
    card_input, spec
        The card's ``input`` and ``preprocessing`` sections.
    """
    n, n_ch = bad.shape
    full = int(card_input["height"]) * int(card_input["width"])  # pixels of one channel
    pixels = n_ch * full
    policy = spec.get("nan_policy", {})
    max_frac = float(policy.get("max_bad_fraction", 1.0))
    per_row = bad.sum(axis=1)
    # every row gets the batch's note; only rows with something of their own are looked at one by one
    status = text_column(n, f"flagged: {note}" if note else OK)
    for i in np.flatnonzero((per_row > 0) | constant.any(axis=1)).tolist():
        reasons = [note] if note else []
        if per_row[i]:
            if per_row[i] / float(pixels) > max_frac:
                status[i] = f"failed: {padded}{int(per_row[i])} of {pixels} pixels not finite"
                continue
            empty = np.flatnonzero(bad[i] == full)  # a channel with no finite pixel carries no information
            if empty.size:
                names = ", ".join(repr(card_input["channels"][c]) for c in empty)
                status[i] = f"failed: no finite pixel in channel {names}"
                continue
            if policy.get("flag", True):
                reasons.append(f"{int(per_row[i])} non-finite pixels replaced")
        if constant[i].any():
            # a channel of one value (e.g. a missing template stored as zeros) tells the model
            # nothing it was trained on: scored, but flagged so that the row can be found
            names = ", ".join(repr(card_input["channels"][c]) for c in np.flatnonzero(constant[i]))
            reasons.append(f"constant channel {names}")
        status[i] = "flagged: " + "; ".join(reasons) if reasons else OK
    return status


def prepare_stamps(
    stamps: np.ndarray, card_input: dict[str, Any], spec: dict[str, Any], what: str = "stamps"
) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw stamps into model input and a status per row.

    `fit_stamps`, then `normalise`, the NaN fill and `stamp_status`. The runtime's
    device graphs (``stampclf/_graphs``, built by ``train/prep_graph.py``) compute the
    same numbers on a GPU.

    Parameters
    ----------
    stamps
        ``(N, C, H, W)`` pixels in the card's channel order.
    card_input, spec
        The card's ``input`` and ``preprocessing`` sections.
    what
        Name of the data in error messages (file and dataset).

    Returns
    -------
    x
        ``(N, C, height, width)`` float32, finite.
    status
        Object array of ``"ok"``, ``"flagged: <reason>"`` or ``"failed: <reason>"``.
    """
    x, note, padded = fit_stamps(stamps, card_input, spec, what)
    n, n_ch = x.shape[:2]
    if n == 0:
        return np.zeros((0, *x.shape[1:]), dtype=np.float32), text_column(0)
    with np.errstate(over="ignore", invalid="ignore"):  # extreme values overflow to inf: NaN policy below
        x = normalise(x, spec.get("normalisation", {"method": "none"}))
    bad = ~np.isfinite(x)
    counts = bad.reshape(n, n_ch, -1).sum(axis=2)
    if counts.any():
        x = np.where(bad, np.float32(float(spec.get("nan_policy", {}).get("fill", 0.0))), x)
    flat = x.reshape(n, n_ch, -1)
    constant = flat.max(axis=2) == flat.min(axis=2)
    return np.ascontiguousarray(x, dtype=np.float32), stamp_status(counts, constant, note, padded, card_input, spec)


# --- images ------------------------------------------------------------------------
_RESAMPLE = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS", "nearest": "NEAREST", "box": "BOX"}


def image_to_uint8(img: Any, spec: dict[str, Any]) -> np.ndarray:
    """The geometric half of `image_to_array`: ``(C, H, W)`` uint8 pixels.

    ``spec`` keys (the card's ``preprocessing``):

    ``mode``
        Pillow mode to convert to first (default ``"RGB"``).
    ``fit``
        ``"crop"`` (default): scale the *shorter* side to ``resize`` pixels, then
        centre-crop a ``crop`` x ``crop`` square (areas outside the image are 0).
        ``"pad"``: scale the *longer* side to ``resize`` and centre the image on a
        ``resize`` x ``resize`` canvas of colour ``pad_color`` (keeps the whole
        picture, e.g. artwork on a white background).
    ``resize``, ``crop``
        Pixels; either may be omitted (no resize / no crop).
    ``resample``
        ``bilinear`` (default), ``bicubic``, ``lanczos``, ``box`` or ``nearest``;
        Pillow's filters antialias when shrinking.

    Training caches these uint8 arrays and applies `scale_pixels` to them, which
    gives bitwise the same numbers as `image_to_array` on each image.
    """
    from PIL import Image

    # a PNG is 8 or 16 bits deep: in mode 'I' (older Pillow opens 16-bit PNGs so) it holds 16-bit pixels
    if img.mode.startswith("I;16") or (img.mode == "I" and getattr(img, "format", None) == "PNG"):
        # 16-bit pixels: Pillow's convert() would clip everything above 255 to white
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(wide * 255 // 65535, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":  # float pixels: 0..1 scaled to 0..255 (convert() would truncate them to 0 and 1)
        f = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(f * 255.0 if f.max(initial=0.0) <= 1.0 else f, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        # (P, L and RGB carry transparency as a palette entry or a key colour: tRNS)
        # transparent pixels show the card's background colour (the artwork's own white for the
        # Pokemon models), not whatever colour they happen to store (convert() drops alpha)
        colour = spec.get("pad_color", 0)
        if isinstance(colour, (list, tuple)):
            rgb = (int(colour[0]),) * 3 if len(colour) == 1 else tuple(int(c) for c in colour[:3])
        else:
            rgb = (int(colour),) * 3
        back = Image.new("RGBA", img.size, (*rgb, 255))
        img = Image.alpha_composite(back, img.convert("RGBA"))
    img = img.convert(spec.get("mode", "RGB"))
    resample = str(spec.get("resample", "bilinear"))
    if resample not in _RESAMPLE:
        raise InputError(f"image preprocessing: unknown resample {resample!r} (expected one of {', '.join(_RESAMPLE)})")
    method = getattr(Image.Resampling, _RESAMPLE[resample])
    fit = spec.get("fit", "crop")
    resize = spec.get("resize")
    if fit == "pad":
        if not resize:
            raise InputError("image preprocessing: fit 'pad' needs 'resize'")
        size = int(resize)
        w, h = img.size
        s = size / max(w, h)
        new = (max(1, round(w * s)), max(1, round(h * s)))
        if new != img.size:
            img = img.resize(new, method)
        colour = spec.get("pad_color", 0)
        canvas = Image.new(img.mode, (size, size), tuple(colour) if isinstance(colour, list) else colour)
        canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
        img = canvas
    elif fit == "crop":
        if resize:
            w, h = img.size
            s = float(resize) / min(w, h)
            new = (max(1, round(w * s)), max(1, round(h * s)))
            if new != img.size:
                img = img.resize(new, method)
    else:
        raise InputError(f"image preprocessing: unknown fit {fit!r} (expected 'crop' or 'pad')")
    crop = spec.get("crop")
    if crop:
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def scale_pixels(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """The arithmetic half of `image_to_array`: ``(pixels * scale - mean) / std`` per channel.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)``; elementwise
    float32 arithmetic, so a batch gives the same bits as its images one by one.
    """
    arr = np.asarray(pixels).astype(np.float32) * np.float32(spec.get("scale", 1.0 / 255.0))
    c = arr.shape[-3]
    mean = np.asarray(spec.get("mean", [0.0] * c), dtype=np.float32)[:, None, None]
    std = np.asarray(spec.get("std", [1.0] * c), dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def image_to_array(img: Any, spec: dict[str, Any]) -> np.ndarray:
    """Resize, crop or pad and normalise a Pillow image to ``(C, H, W)`` float32.

    ``scale_pixels(image_to_uint8(img, spec), spec)``; see those two for the
    ``spec`` keys: ``mode``, ``fit``, ``resize``, ``crop``, ``pad_color``,
    ``resample``, ``scale`` (e.g. 1/255), ``mean`` and ``std`` (per channel,
    after scaling).
    """
    return scale_pixels(image_to_uint8(img, spec), spec)


def open_image(path: Any) -> Any:
    """Open and fully decode an image file; raise `InputError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now, while the file is open; pixels stay in memory after close
            return img
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise open_failure(path, exc, "image") from None  # type: ignore[misc]
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


def load_image(path: Any, spec: dict[str, Any]) -> np.ndarray:
    """Read an image file and apply `image_to_array`; raise `InputError` naming the file."""
    return load_image_and_size(path, spec)[0]


def load_image_and_size(path: Any, spec: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image`, and the image's own ``(width, height)``."""
    img = open_image(path)
    try:
        return image_to_array(img, spec), img.size
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot convert image ({exc.__class__.__name__}: {exc})") from None


def image_upscale(size: tuple[int, int], spec: dict[str, Any]) -> float:
    """How many times `image_to_uint8` enlarges an image of *size* ``(width, height)`` (1 or less: no upscale)."""
    resize = spec.get("resize")
    if not resize:
        return 1.0
    side = max(size) if spec.get("fit", "crop") == "pad" else min(size)
    return float(resize) / max(side, 1)
