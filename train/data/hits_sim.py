"""Fast, seeded simulator of HiTS real/bogus difference-imaging candidates.

Each candidate is a 21x21 stamp with 4 channels -- template, science, difference and
SNR-difference -- as in the HiTS / Deep-HiTS real/bogus set (Cabrera-Vives et al. 2017).
The simulator renders a template and a science image of the same static scene (sky,
stars, galaxies) with their own seeing, PSF shape and noise, drawn from the real HiTS 2015
observing conditions (``_hits_conditions.py``), PSF-matches them the way a
difference-imaging pipeline does (the sharper image is convolved with a Gaussian kernel to
the broader seeing, imperfectly), subtracts, and divides by the propagated noise.

Real class: new point sources (supernovae, alone or on host galaxies) and variable stars
(positive and negative differences). Bogus class: subtraction artefacts (dipoles from
misalignment, rings from PSF mismatch), cosmic rays, hot pixels, bad columns, saturated
stars with bleed trails, CCD edges, masked (NaN) regions and pure noise peaks. Every stamp is
a *candidate*: it has ``|SNR| >= 5`` near the centre (enforced by re-drawing failures).

Pipeline properties that differ between surveys are randomised on purpose (deep smooth
vs. shallow single-epoch templates, kernel errors, Moffat wings, elliptical PSFs,
correlated noise from resampling, crowding, bright neighbours, pixel units, sky
subtraction, orientation), independently of the label, so that a classifier has to use
the physics of the stamp rather than survey-specific cues.

Everything is vectorised over a batch with numpy; the only Python loops run over a fixed,
small number of kernel taps, filters or retry rounds, never over stamps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

try:  # normal case: imported as train.data.hits_sim
    from ._hits_conditions import CONDITIONS
except ImportError:  # pragma: no cover - imported as a top-level module
    from _hits_conditions import CONDITIONS

__all__ = [
    "SIM_VERSION",
    "KINDS",
    "REAL_KINDS",
    "BOGUS_KINDS",
    "NAN_KINDS",
    "STAMP",
    "DETECT_SNR",
    "CENTRE_HALF",
    "simulate",
    "simulate_chunk",
    "iter_simulate",
]

SIM_VERSION = "1.1.0"

STAMP = 21  #: stamp side (pixels)
PAD = 7  #: canvas margin: half-width of the PSF-matching kernel
CANVAS = STAMP + 2 * PAD  #: images are rendered on this larger canvas, then cropped
DETECT_SNR = 5.0  #: candidate threshold on |SNR-difference|
CENTRE_HALF = 4  #: candidates have |SNR| >= DETECT_SNR within the central 9x9 box
MAX_OFFSET = 3.0  #: largest offset (px, per axis) of the candidate from the stamp centre
CLEAR_PX = 3.0  #: static field stars and galaxies keep this far (px) from the candidate
MIN_VAR_AMP = 0.3  #: smallest variable-star amplitude (mag) in the real class
CHUNK = 1024  #: stamps per internal chunk (bounds memory, fits caches; fixes the random streams)
MAX_ROUNDS = 60  #: re-draw rounds for stamps that fail the candidate cut

PIXEL_SCALE = float(CONDITIONS["pixel_scale_arcsec"])

REAL_KINDS: tuple[str, ...] = ("sn", "sn_on_host", "variable_pos", "variable_neg")
BOGUS_KINDS: tuple[str, ...] = (
    "dipole",
    "ring",
    "cosmic_ray",
    "hot_pixel",
    "bad_column",
    "saturated_bleed",
    "ccd_edge",
    "masked",
    "noise_peak",
)
KINDS: tuple[str, ...] = REAL_KINDS + BOGUS_KINDS
NAN_KINDS: tuple[str, ...] = ("ccd_edge", "masked")  #: the only kinds that may hold NaN
REAL_WEIGHTS = np.array([0.35, 0.30, 0.20, 0.15])
BOGUS_WEIGHTS = np.array([0.15, 0.12, 0.14, 0.09, 0.09, 0.09, 0.09, 0.08, 0.15])
_K = {name: code for code, name in enumerate(KINDS)}


_PROBS = np.asarray(CONDITIONS["probs"], dtype=float)
_FILTERS = tuple(CONDITIONS["filters"])
_FILTER_P = np.array([CONDITIONS["filter_counts"][f] for f in _FILTERS], dtype=float)
_FILTER_P /= _FILTER_P.sum()
_CAM = {k: np.asarray(v, dtype=float) for k, v in CONDITIONS["camera"].items()}
_F32 = np.float32


# ----------------------------------------------------------------------------- helpers
def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): numpy has none."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


def _gauss_taps(sigma: np.ndarray, half: int = PAD) -> np.ndarray:
    """Pixel-integrated, normalised 1-D Gaussian kernels, shape (n, 2*half+1).

    Integrating over the pixel (rather than sampling) keeps tiny kernels well defined:
    sigma -> 0 gives a delta, as when template and science seeing are equal.
    """
    t = np.arange(-half, half + 1, dtype=float)
    s = np.maximum(sigma, 1e-3)[:, None] * np.sqrt(2.0)
    taps = 0.5 * (_erf((t + 0.5) / s) - _erf((t - 0.5) / s))
    return taps / taps.sum(axis=1, keepdims=True)


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _quantile_draw(rng: np.random.Generator, key: str, filt: np.ndarray, lo=0.0, hi=1.0) -> np.ndarray:
    """Inverse-CDF draw of a HiTS condition, per filter, from the stored quantile table."""
    u = rng.uniform(lo, hi, filt.size)
    out = np.empty(filt.size)
    for i, f in enumerate(_FILTERS):  # loop over 3 filters, not over stamps
        m = filt == i
        out[m] = np.interp(u[m], _PROBS, CONDITIONS["filters"][f]["quantiles"][key])
    return out


def _shape(size2: np.ndarray, ell: np.ndarray, theta: np.ndarray):
    """Symmetric 2x2 'shape matrix' (xx, xy, yy) of squared size ``size2``.

    Ellipticity keeps the determinant (area), so ``size2`` is the square of the geometric
    mean of the two axes. Shape matrices of a galaxy and a PSF add like covariances.
    """
    q = 1.0 - ell
    a2, b2 = size2 / q, size2 * q
    c, s = np.cos(theta), np.sin(theta)
    return a2 * c * c + b2 * s * s, (a2 - b2) * c * s, a2 * s * s + b2 * c * c


def _moffat_k(beta: np.ndarray) -> np.ndarray:
    """FWHM^2 = k(beta) * alpha^2 for a Moffat profile (1 + r^2/alpha^2)^-beta."""
    return 4.0 * (2.0 ** (1.0 / beta) - 1.0)


def _render(out: np.ndarray, obj: dict, sigma: np.ndarray) -> np.ndarray:
    """Add elliptical Moffat profiles of objects into ``out`` (n, size, size), in place.

    ``out`` may be a centred view of a larger canvas (pixel coordinates are measured from
    its centre), so an image that is only ever seen on the stamp is rendered only there.

    ``obj`` holds flat per-object arrays: stamp index ``i``, centre ``x``, ``y`` (pixels from
    the canvas centre), total ``flux``, size matrix ``sxx, sxy, syy`` (alpha^2 units) and
    ``beta``. Objects whose peak is below 5 % of their image's sky noise ``sigma[i]`` are
    invisible and skipped. Objects are added in rounds of 'k-th object of each stamp', so
    each round is one vectorised scatter without duplicate indices.
    """
    size = out.shape[1]
    det = obj["sxx"] * obj["syy"] - obj["sxy"] ** 2
    amp = obj["flux"] * (obj["beta"] - 1.0) / (np.pi * np.sqrt(det))
    keep = np.abs(amp) > 0.05 * sigma[obj["i"]]
    if not keep.any():
        return out
    o = {k: v[keep] for k, v in obj.items()}
    det, amp = det[keep], amp[keep]
    ixx, ixy, iyy = o["syy"] / det, -o["sxy"] / det, o["sxx"] / det
    order = np.argsort(o["i"], kind="stable")
    idx = o["i"][order]
    first = np.r_[True, idx[1:] != idx[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(idx.size), 0))
    rank = np.empty(idx.size, dtype=int)
    rank[order] = np.arange(idx.size) - group_start
    g = np.arange(size, dtype=_F32) - (size - 1) / 2.0
    for r in range(int(rank.max()) + 1):
        sel = np.flatnonzero(rank == r)

        def f(a, sel=sel):
            return a[sel].astype(_F32)[:, None, None]

        dx = g[None, None, :] - f(o["x"])
        dy = g[None, :, None] - f(o["y"])
        qf = f(ixx) * dx * dx + f(iyy) * dy * dy
        qf += (2.0 * f(ixy)) * dx * dy
        qf += 1.0
        np.power(qf, -f(o["beta"]), out=qf)
        qf *= f(amp)
        out[o["i"][sel]] += qf
    return out


def _band(taps: np.ndarray) -> np.ndarray:
    """Per-stamp band matrices (n, STAMP, CANVAS) so that ``B @ X`` is a 'valid' 1-D conv."""
    n, nt = taps.shape
    b = np.zeros((n, STAMP, STAMP + nt - 1), dtype=_F32)
    r = np.arange(STAMP)
    b[:, r[:, None], r[:, None] + np.arange(nt)[None, :]] = taps[:, None, :].astype(_F32)
    return b


def _conv(img: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution of canvas images to stamps with per-stamp kernels."""
    return _band(ty) @ img @ _band(tx).transpose(0, 2, 1)


def _col(a: np.ndarray) -> np.ndarray:
    """Per-stamp values as float32 (n, 1, 1), so images never get promoted to float64."""
    return np.asarray(a, dtype=_F32)[:, None, None]


def _resample3(w: np.ndarray, ry: np.ndarray, rx: np.ndarray, full: np.ndarray) -> np.ndarray:
    """3-tap separable resampling kernel (bilinear shift or smoothing), 'valid' mode.

    Warping an image onto another pixel grid correlates its noise; this is the cheapest
    model of that (what interpolation does to white noise). Identity kernels are skipped,
    and images that are not ``full`` (not convolved later) are resampled on the stamp only.
    """
    m = w.shape[1] - 2
    out = w[:, 1 : m + 1, 1 : m + 1].copy()
    act = (ry[:, 1] != 1.0) | (rx[:, 1] != 1.0)
    lo, hi = PAD - 1, PAD + STAMP + 1  # the stamp plus a 1-px margin, in output coordinates
    for sel, a, b in ((act & full, 0, m), (act & ~full, lo, hi)):
        if not sel.any():
            continue
        wa = w[sel, a : b + 2, a : b + 2]
        k = b - a
        ya, xa = ry[sel].astype(_F32), rx[sel].astype(_F32)
        y = ya[:, 0, None, None] * wa[:, 0:k, :]
        for t in (1, 2):
            y += ya[:, t, None, None] * wa[:, t : t + k, :]
        z = xa[:, 0, None, None] * y[:, :, 0:k]
        for t in (1, 2):
            z += xa[:, t, None, None] * y[:, :, t : t + k]
        out[sel, a:b, a:b] = z
    return out


def _resample_taps(rng: np.random.Generator, n: int, p_warp: float, p_smooth: float) -> np.ndarray:
    """Per-stamp 3-tap kernels: identity, bilinear shift (warped image) or mild smoothing."""
    taps = np.zeros((n, 3))
    taps[:, 1] = 1.0
    u = rng.random(n)
    f = rng.uniform(0.0, 1.0, n)
    warp = u < p_warp
    taps[warp, 1], taps[warp, 2] = 1.0 - f[warp], f[warp]
    smooth = (u >= p_warp) & (u < p_warp + p_smooth)
    s = rng.uniform(0.05, 0.3, n)
    taps[smooth, 0] = taps[smooth, 2] = s[smooth]
    taps[smooth, 1] = 1.0 - 2.0 * s[smooth]
    return taps


def _centre_window(x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """Boolean (n, STAMP, STAMP) mask: within `half` px of the object's pixel, inside the
    central (2*CENTRE_HALF+1)^2 box."""
    c = STAMP // 2
    r = np.arange(STAMP) - c
    ox, oy = np.rint(x).astype(int), np.rint(y).astype(int)
    wx = np.abs(r[None, :] - ox[:, None]) <= half
    wy = np.abs(r[None, :] - oy[:, None]) <= half
    box = np.abs(r) <= CENTRE_HALF
    return (wy & box)[:, :, None] & (wx & box)[:, None, :]


def _keep_clear(
    rng: np.random.Generator, idx: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: float
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform canvas positions for objects of stamps ``idx``, moved out of `CLEAR_PX` of the candidate."""
    m = idx.size
    x, y = rng.uniform(-half, half, m), rng.uniform(-half, half, m)
    r, a = rng.uniform(CLEAR_PX, 2.0 * CLEAR_PX, m), rng.uniform(0.0, 2.0 * np.pi, m)
    near = np.hypot(x - cx[idx], y - cy[idx]) < CLEAR_PX
    return np.where(near, cx[idx] + r * np.cos(a), x), np.where(near, cy[idx] + r * np.sin(a), y)


def _dilate(m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Dilate boolean masks (n, H, W) by per-stamp k pixels (k in 0..2), 4-connected."""
    out = m.copy()
    for step in (1, 2):
        grow = k >= step
        if not grow.any():
            break
        a = out[grow]
        b = a.copy()
        b[:, 1:, :] |= a[:, :-1, :]
        b[:, :-1, :] |= a[:, 1:, :]
        b[:, :, 1:] |= a[:, :, :-1]
        b[:, :, :-1] |= a[:, :, 1:]
        out[grow] = b
    return out


def _saturate(img: np.ndarray, sat: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """Clip at saturation and bleed the excess charge along columns (in place, returned).

    A column's excess charge fills (sat - sky) per pixel, so the saturated run grows to
    n_sat + excess / (sat - sky) pixels around its centre: the classic DECam bleed trail.
    """
    over = img >= _col(sat)
    hit = over.reshape(over.shape[0], -1).any(axis=1)
    if not hit.any():
        return img
    sub = img[hit]
    s = _col(sat[hit])
    ov = sub >= s
    exc = np.clip(sub - s, 0.0, None).sum(axis=1)  # (m, W) excess per column
    nsat = ov.sum(axis=1)
    ys = np.arange(sub.shape[1], dtype=_F32)
    yc = (ov * ys[None, :, None]).sum(axis=1) / np.maximum(nsat, 1)
    length = nsat + exc / np.maximum(sat[hit] - sky[hit], 1.0)[:, None]
    inside = (nsat > 0)[:, None, :] & (np.abs(ys[None, :, None] - yc[:, None, :]) <= length[:, None, :] / 2.0)
    img[hit] = np.where(inside, s, np.minimum(sub, s))
    return img


# ----------------------------------------------------------------------------- batch
def _batch(
    rng: np.random.Generator, kind: np.ndarray, with_meta: bool, detect_snr: float = DETECT_SNR
) -> tuple[dict, np.ndarray]:
    """Simulate one batch of the given kinds; return stamps and the candidate-cut mask."""
    n = kind.size
    K = {name: kind == code for name, code in _K.items()}
    C = CANVAS

    # --- observing conditions, from the real HiTS 2015 distributions -------------------
    filt = rng.choice(len(_FILTERS), n, p=_FILTER_P)
    single = rng.random(n) < 0.3  # shallow single-epoch template (else a stack)
    # The stack is built from the better-seeing, darker epochs. The PSF measured in the real
    # HiTS SN stamps is 10-20 % narrower than the tabulated seeing (docs/hits-simulation.md),
    # so the tabulated FWHM is scaled by a log-uniform 0.68..1.0 (geometric mean 0.82, the
    # measured ratio; also widens the range).
    fwhm_s = _quantile_draw(rng, "seeing", filt) / PIXEL_SCALE * _loguniform(rng, 0.68, 1.0, n)
    fwhm_t = (
        _quantile_draw(rng, "seeing", filt, 0.0, np.where(single, 1.0, 0.6))
        / PIXEL_SCALE
        * _loguniform(rng, 0.68, 1.0, n)
    )
    fwhm_s = np.clip(fwhm_s, 2.2, 16.0)
    # Keep the matching kernel inside its PAD-pixel half-width (sigma_k <= PAD / 2.5), as
    # a pipeline does by picking a template whose seeing it can match.
    lim = (2.3548 * PAD / 2.5) ** 2
    fwhm_t = np.clip(fwhm_t, np.sqrt(np.maximum(fwhm_s**2 - lim, 2.2**2)), np.sqrt(fwhm_s**2 + lim))
    sky_s = _quantile_draw(rng, "sky_brightness", filt)
    sky_t = _quantile_draw(rng, "sky_brightness", filt, 0.0, np.where(single, 1.0, 0.5))
    odd = rng.random(n) < 0.2  # other exposure times / filters: scale the sky level
    sky_s = np.where(odd, sky_s * _loguniform(rng, 0.3, 3.0, n), sky_s)
    ccd = rng.integers(0, _CAM["gain"].size, n)
    gain, rn, sat = _CAM["gain"][ccd], _CAM["read_noise"][ccd], _CAM["saturation"][ccd]
    zp = _quantile_draw(rng, "zero_point", filt)
    exptime = np.where(rng.random(n) < 0.9, 86.0, _loguniform(rng, 30.0, 300.0, n))
    # Effective number of co-added epochs of the template: 1 (shallow) .. ~1e5 (a smooth,
    # practically noiseless deep template, as in the DECam alert stamps).
    depth_t = np.where(single, 1.0, _loguniform(rng, 3.0, 1e5, n))
    sat_t = np.where(single, sat, sat * _loguniform(rng, 0.7, 3.0, n))

    # --- PSFs: Moffat with random wings (beta ~ 25 is practically Gaussian), slightly
    # elliptical; template and science drawn independently, so shapes never match exactly.
    def psf(fwhm):
        beta = np.where(rng.random(n) < 0.25, 25.0, rng.uniform(2.2, 5.0, n))
        ell = np.minimum(np.abs(rng.normal(0.0, 0.05, n)), 0.3)
        return beta, ell, rng.uniform(0.0, np.pi, n)

    beta_s, ell_s, th_s = psf(fwhm_s)
    beta_t, ell_t, th_t = psf(fwhm_t)
    # rings: exaggerated science ellipticity for a third of them (quadrupole residuals)
    quad = K["ring"] & (rng.random(n) < 0.35)
    ell_s = np.where(quad, rng.uniform(0.1, 0.3, n), ell_s)
    # shape matrices in FWHM^2 units (px^2); galaxies add their own before conversion to
    # the Moffat alpha^2 of their profile
    F_s = _shape(fwhm_s**2, ell_s, th_s)
    F_t = _shape(fwhm_t**2, ell_t, th_t)

    # --- PSF matching as a pipeline does it: Gaussian kernel from *measured* FWHMs,
    # convolving the sharper image; the error in kernel variance leaves residuals.
    meas_s = fwhm_s * np.exp(rng.normal(0, 0.03, n)) / 2.3548
    meas_t = fwhm_t * np.exp(rng.normal(0, 0.03, n)) / 2.3548
    t_sharp = meas_t < meas_s
    sig_b2 = np.maximum(meas_s, meas_t) ** 2
    dvar = np.abs(meas_s**2 - meas_t**2)
    eta = rng.normal(0.0, 0.03, n)
    big = K["ring"] | K["masked"] | (K["saturated_bleed"] & (rng.random(n) < 0.5))
    eta = np.where(big, rng.choice([-1.0, 1.0], n) * rng.uniform(0.08, 0.4, n), eta)
    kvar = dvar + eta * sig_b2
    ell_k = rng.normal(0.0, 0.04, n)  # kernel slightly elliptical / axis-dependent errors
    sk_x = np.sqrt(np.clip(kvar * (1 + ell_k), 0.0, None))
    sk_y = np.sqrt(np.clip(kvar * (1 - ell_k), 0.0, None))
    ktx, kty = _gauss_taps(sk_x), _gauss_taps(sk_y)
    k2 = (ktx**2).sum(1) * (kty**2).sum(1)  # noise-variance reduction of the convolution
    # photometric scaling of the template to the science image, with a small error
    fscale = 1.0 + rng.normal(0.0, 0.01, n)
    # ... but small for dipoles / rings: a flux-scale error on a bright star leaves a
    # PSF-shaped residual, indistinguishable from real variability (label noise)
    fscale = np.where(K["dipole"] | K["ring"], 1.0 + rng.normal(0.0, 0.003, n), fscale)

    # background-only noise of each image and of the difference (for amplitude targeting)
    var_sky_s = sky_s / gain + (rn / gain) ** 2
    var_sky_t = (sky_t / gain + (rn / gain) ** 2) / depth_t
    sig_d = np.sqrt(np.where(t_sharp, var_sky_s + fscale**2 * var_sky_t * k2, var_sky_s * k2 + fscale**2 * var_sky_t))
    # peak pixel value per unit flux of the broader PSF (what the difference shows)
    beta_b = np.where(t_sharp, beta_s, beta_t)
    p0 = (beta_b - 1.0) * _moffat_k(beta_b) / (np.pi * np.maximum(fwhm_s, fwhm_t) ** 2)
    sig_b = np.maximum(meas_s, meas_t)

    # --- candidate position: sub-pixel offset, sometimes a few pixels off-centre ----------
    far = rng.random(n) < 0.5
    px = rng.uniform(-0.5, 0.5, n) + np.where(far, rng.uniform(-2.5, 2.5, n), 0.0)
    py = rng.uniform(-0.5, 0.5, n) + np.where(far, rng.uniform(-2.5, 2.5, n), 0.0)
    px, py = np.clip(px, -MAX_OFFSET, MAX_OFFSET), np.clip(py, -MAX_OFFSET, MAX_OFFSET)

    # --- astrometric misregistration of the template (global, per stamp) ------------------
    dxt = rng.normal(0.0, 0.05, n)
    dyt = rng.normal(0.0, 0.05, n)
    bad_wcs = rng.random(n) < 0.05
    dxt = np.where(bad_wcs, rng.normal(0, 0.3, n), dxt)
    dyt = np.where(bad_wcs, rng.normal(0, 0.3, n), dyt)

    # --- objects ------------------------------------------------------------------------
    objs: list[dict] = []

    def add(idx, x, y, f_t, f_s, gal=None, beta_g=None, sx=0.0, sy=0.0):
        """Queue objects of stamps ``idx`` (template flux f_t, science flux f_s)."""
        m = idx.size
        if m == 0 and objs:
            return
        if gal is None:
            gal = (np.zeros(m), np.zeros(m), np.zeros(m))
        objs.append(
            dict(
                i=idx,
                x=x,
                y=y,
                ft=f_t,
                fs=f_s,
                gxx=gal[0],
                gxy=gal[1],
                gyy=gal[2],
                bg=np.full(m, np.nan) if beta_g is None else beta_g,
                sx=np.broadcast_to(sx, (m,)).astype(float),
                sy=np.broadcast_to(sy, (m,)).astype(float),
            )
        )

    def galaxy_shape(m, lo=1.0, hi=10.0):
        """Intrinsic galaxy FWHM lo..hi px (log-uniform), axis ratio 0.3..1."""
        return _shape(_loguniform(rng, lo, hi, m) ** 2, rng.uniform(0.0, 0.7, m), rng.uniform(0, np.pi, m))

    all_i = np.arange(n)
    half = C / 2.0
    # per-stamp diagnostics of the labelled phenomenon (meta only; NaN where not applicable)
    nuis = np.full(n, np.nan)  # variables: template star flux / flux change
    art = np.full(n, np.nan)  # dipoles: offset (px); cosmic rays: track length (px)
    # static scene: stars (crowded fields for 15 %) and galaxies, anywhere on the canvas but
    # on the candidate itself (whatever its label): a field star under the candidate turns
    # any kind into "a flux change on a star", which is what the variable kinds stand for
    lam_star = np.where(rng.random(n) < 0.15, rng.uniform(3.0, 12.0, n), 0.3)
    ns = rng.poisson(lam_star)
    si = np.repeat(all_i, ns)
    m = si.size
    u = rng.random(m)
    mag = np.log10(u * (10 ** (0.25 * 25) - 10 ** (0.25 * 14)) + 10 ** (0.25 * 14)) / 0.25
    f = exptime[si] * 10.0 ** (-0.4 * (mag - zp[si]))
    add(si, *_keep_clear(rng, si, px, py, half), f, f)
    ng = rng.poisson(_loguniform(rng, 0.2, 1.5, n))
    gi = np.repeat(all_i, ng)
    m = gi.size
    u = rng.random(m)
    mag = np.log10(u * (10 ** (0.35 * 25) - 10 ** (0.35 * 18)) + 10 ** (0.35 * 18)) / 0.35
    f = exptime[gi] * 10.0 ** (-0.4 * (mag - zp[gi]))
    add(gi, *_keep_clear(rng, gi, px, py, half), f, f, galaxy_shape(m), rng.uniform(1.6, 3.5, m))
    # a bright neighbour inside the stamp for 15 %, 5-14 px from the candidate
    bi = all_i[rng.random(n) < 0.15]
    m = bi.size
    r, a = rng.uniform(5.0, 14.0, m), rng.uniform(0, 2 * np.pi, m)
    f = exptime[bi] * 10.0 ** (-0.4 * (rng.uniform(13.0, 18.0, m) - zp[bi]))
    add(bi, px[bi] + r * np.cos(a), py[bi] + r * np.sin(a), f, f)

    # flux change / artefact amplitudes are drawn relative to the 5-sigma-peak flux, from
    # below the threshold (rejected later: real sources reach the detection limit) up to
    # ~600x it; 80 % concentrate within 1 mag of the threshold, where the real HiTS
    # detections are (half of them have peak SNR < 10).
    f5 = detect_snr * sig_d / p0
    u = np.where(rng.random(n) < 0.8, rng.uniform(-0.25, 1.0, n), rng.uniform(1.0, 7.0, n))
    dflux = f5 * 10.0 ** (0.4 * u)

    # real: supernovae (alone) --------------------------------------------------------
    idx = all_i[K["sn"]]
    add(idx, px[idx], py[idx], np.zeros(idx.size), dflux[idx])
    # real: supernovae on hosts; the host centre is a few px from the SN
    idx = all_i[K["sn_on_host"]]
    m = idx.size
    add(idx, px[idx], py[idx], np.zeros(m), dflux[idx])
    d, a = rng.uniform(0.0, 4.0, m), rng.uniform(0, 2 * np.pi, m)
    fh = exptime[idx] * 10.0 ** (-0.4 * (rng.uniform(16.5, 23.5, m) - zp[idx]))
    add(
        idx,
        px[idx] + d * np.cos(a),
        py[idx] + d * np.sin(a),
        fh,
        fh,
        galaxy_shape(m, 1.5, 12.0),
        rng.uniform(1.6, 3.5, m),
    )
    # real: variable stars; the template star may be fainter or brighter than the change,
    # but the change is at least MIN_VAR_AMP mag. A smaller change on a brighter star leaves
    # a difference that a flux-scaling or PSF-matching error of a constant star leaves too
    # (bogus); one stamp cannot tell them apart (v1.0 had down to 0.03 mag: 60-80 % recall
    # there, with the rings and noise peaks it was confused with paying the rest).
    top = 1.0 / (10.0 ** (0.4 * MIN_VAR_AMP) - 1.0)  # template star / change at that amplitude
    for name, sign, lo, hi in (
        ("variable_pos", 1.0, -3.0, 2.5 * np.log10(top)),
        ("variable_neg", -1.0, 0.05, top),
    ):
        idx = all_i[K[name]]
        m = idx.size
        f0 = dflux[idx] * (10.0 ** (0.4 * rng.uniform(lo, hi, m)) if sign > 0 else 1.0 + _loguniform(rng, lo, hi, m))
        add(idx, px[idx], py[idx], f0, f0 + sign * dflux[idx])
        nuis[idx] = f0 / dflux[idx]

    # bogus: dipoles -- a star (or compact galaxy core) with its own extra misregistration
    idx = all_i[K["dipole"]]
    m = idx.size
    dmag, a = rng.uniform(0.15, 1.5, m), rng.uniform(0, 2 * np.pi, m)
    t = detect_snr * 10.0 ** (0.4 * rng.uniform(-0.3, 4.0, m))
    fd = t * sig_d[idx] / (p0[idx] * 0.6 * dmag / sig_b[idx])
    art[idx] = dmag
    gal = rng.random(m) < 0.2
    shape = galaxy_shape(m, 0.5, 2.0)
    shape = tuple(np.where(gal, s, 0.0) for s in shape)
    add(
        idx,
        px[idx],
        py[idx],
        fd,
        fd,
        shape,
        np.where(gal, rng.uniform(2.0, 4.0, m), np.nan),
        dmag * np.cos(a),
        dmag * np.sin(a),
    )
    # bogus: rings -- bright star under a wrong kernel width / mismatched shape
    idx = all_i[K["ring"]]
    m = idx.size
    t = detect_snr * 10.0 ** (0.4 * rng.uniform(-0.3, 4.0, m))
    fr = t * sig_d[idx] / (p0[idx] * np.maximum(0.4 * np.abs(eta[idx]), 0.02))
    add(idx, px[idx], py[idx], fr, fr)
    # bogus: saturated stars with bleed trails; masked = the same, with the core masked
    idx = all_i[K["saturated_bleed"] | K["masked"]]
    m = idx.size
    over = np.where(K["masked"][idx], _loguniform(rng, 1.2, 10.0, m), _loguniform(rng, 1.5, 60.0, m))
    fsat = over * (sat[idx] - sky_s[idx]) / p0[idx]
    add(idx, px[idx], py[idx], fsat, fsat)

    add(np.zeros(0, dtype=int), *(np.zeros(0),) * 4)  # keeps the concatenation defined
    ob = {k: np.concatenate([o[k] for o in objs]) for k in objs[0]}
    isgal = np.isfinite(ob["bg"])
    oi = ob["i"]

    def render(F, beta, flux, shift_x, shift_y, sigma, conv_img):
        """Image of all objects for one PSF (F: FWHM^2 shape matrix, beta: Moffat index)."""
        b = np.where(isgal, ob["bg"], beta[oi])
        k = _moffat_k(b)
        obj = dict(
            i=oi,
            x=ob["x"] + shift_x,
            y=ob["y"] + shift_y,
            flux=flux,
            beta=b,
            sxx=(F[0][oi] + ob["gxx"]) / k,
            sxy=(F[1][oi] + ob["gxy"]) / k,
            syy=(F[2][oi] + ob["gyy"]) / k,
        )
        out = np.zeros((n, C, C), dtype=_F32)
        # the convolved (sharper) image on the whole canvas, the other only on the stamp
        # plus a 1-px resampling margin: that is all of it that is ever seen
        full = conv_img[oi]
        _render(out, {key: v[full] for key, v in obj.items()}, sigma)
        _render(
            out[:, PAD - 1 : PAD + STAMP + 1, PAD - 1 : PAD + STAMP + 1],
            {key: v[~full] for key, v in obj.items()},
            sigma,
        )
        return out

    M_s = render(F_s, beta_s, ob["fs"], 0.0, 0.0, np.sqrt(var_sky_s), ~t_sharp)
    M_t = render(F_t, beta_t, ob["ft"], dxt[oi] + ob["sx"], dyt[oi] + ob["sy"], np.sqrt(var_sky_t), t_sharp)

    # --- noise: Poisson (sky + sources, gain) + read noise; template averaged over depth ---
    V_s = np.maximum(M_s, 0.0)
    V_s += _col(sky_s + (rn**2 / gain))
    V_s *= _col(1.0 / gain)
    V_t = np.maximum(M_t, 0.0)
    V_t += _col(sky_t + (rn**2 / gain))
    V_t *= _col(1.0 / (gain * depth_t))
    # the template is warped onto the science grid (usually); some pipelines warp the science
    rs_t = _resample_taps(rng, n, 0.7, 0.15)
    rs_s = _resample_taps(rng, n, 0.25, 0.15)
    # White noise on the whole canvas only for the image that gets convolved; the other
    # one is only ever seen on the stamp (plus the resampling margin), which saves a third
    # of the random numbers.
    w_full = rng.standard_normal((n, C + 2, C + 2), dtype=_F32)
    w_small = rng.standard_normal((n, STAMP + 2, STAMP + 2), dtype=_F32)
    w_s = np.where(_col(~t_sharp), w_full, np.float32(0.0))
    w_t = np.where(_col(t_sharp), w_full, np.float32(0.0))
    inner = (slice(None), slice(PAD, PAD + STAMP + 2), slice(PAD, PAD + STAMP + 2))
    w_s[inner][t_sharp] = w_small[t_sharp]
    w_t[inner][~t_sharp] = w_small[~t_sharp]
    del w_full, w_small

    # kernels of each image in the difference (delta for the broader one)
    delta = np.zeros_like(ktx)
    delta[:, PAD] = 1.0
    kx_s, ky_s = np.where(t_sharp[:, None], delta, ktx), np.where(t_sharp[:, None], delta, kty)
    kx_t, ky_t = np.where(t_sharp[:, None], ktx, delta), np.where(t_sharp[:, None], kty, delta)

    # Model variance of the difference at the stamp pixels (noise-peak amplitudes need it).
    def crop(a):
        return a[:, PAD : PAD + STAMP, PAD : PAD + STAMP]

    def matched(img, is_conv, ty, tx):
        out = crop(img).copy()
        if is_conv.any():
            out[is_conv] = _conv(img[is_conv], ty[is_conv], tx[is_conv])
        return out

    Vm_s = matched(V_s, ~t_sharp, ky_s**2, kx_s**2)
    Vm_t = matched(V_t, t_sharp, ky_t**2, kx_t**2)
    V_d = Vm_s + _col(fscale**2) * Vm_t

    # bogus: noise peaks -- condition the white noise on an excursion at one pixel. The
    # minimal white-noise perturbation that raises output pixel p is L^T e_p (L = kernel *
    # resampling), i.e. kriging: the peak gets exactly the shape of the noise correlation.
    idx = all_i[K["noise_peak"]]
    np_sci = np.zeros(n, dtype=bool)
    if idx.size:
        m = idx.size
        oxp, oyp = np.rint(px[idx]).astype(int), np.rint(py[idx]).astype(int)
        px[idx], py[idx] = oxp, oyp
        ci, cj = oyp + STAMP // 2, oxp + STAMP // 2
        vd = V_d[idx, ci, cj]
        share_s = Vm_s[idx, ci, cj] / vd
        use_s = rng.random(m) < share_s
        np_sci[idx] = use_s
        sgn = np.where(rng.random(m) < 0.7, 1.0, -1.0)  # sign of the peak in the difference
        target = detect_snr + rng.exponential(0.8, m) - 0.1

        def pattern(kx, ky, rx, ry):
            cy = np.zeros((m, 2 * PAD + 3))
            cx = np.zeros((m, 2 * PAD + 3))
            for a in range(3):
                cy[:, a : a + 2 * PAD + 1] += ry[:, a : a + 1] * ky
                cx[:, a : a + 2 * PAD + 1] += rx[:, a : a + 1] * kx
            return cy, cx

        cy_s, cx_s = pattern(kx_s[idx], ky_s[idx], rs_s[idx], rs_s[idx])
        cy_t, cx_t = pattern(kx_t[idx], ky_t[idx], rs_t[idx], rs_t[idx])
        cy = np.where(use_s[:, None], cy_s, cy_t)
        cx = np.where(use_s[:, None], cx_s, cx_t)
        sig_x = np.sqrt(np.where(use_s, V_s[idx, ci + PAD, cj + PAD], V_t[idx, ci + PAD, cj + PAD]))
        gainx = np.where(use_s, 1.0, fscale[idx])
        norm2 = (cy**2).sum(1) * (cx**2).sum(1)
        amp = target * np.sqrt(vd) / (sig_x * gainx * norm2)
        amp *= np.where(use_s, sgn, -sgn)  # a template excursion shows inverted
        pat = (amp[:, None, None] * cy[:, :, None] * cx[:, None, :]).astype(_F32)
        rows = ci[:, None] + np.arange(2 * PAD + 3)[None, :]
        cols = cj[:, None] + np.arange(2 * PAD + 3)[None, :]
        ps, pt = pat.copy(), pat.copy()
        ps[~use_s] = 0.0
        pt[use_s] = 0.0
        w_s[idx[:, None, None], rows[:, :, None], cols[:, None, :]] += ps
        w_t[idx[:, None, None], rows[:, :, None], cols[:, None, :]] += pt

    I_s = _resample3(w_s, rs_s, rs_s, ~t_sharp)
    I_s *= np.sqrt(V_s)
    I_s += M_s
    I_s += _col(sky_s)
    I_t = _resample3(w_t, rs_t, rs_t, t_sharp)
    I_t *= np.sqrt(V_t)
    I_t += M_t
    I_t += _col(sky_t)
    del w_s, w_t
    g = np.arange(C) - (C - 1) / 2.0

    # bogus: cosmic rays -- sharp, sub-PSF tracks deposited in the science image only
    idx = all_i[K["cosmic_ray"]]
    if idx.size:
        m = idx.size
        length = np.where(
            rng.random(m) < 0.5, 0.0, np.where(rng.random(m) < 0.7, rng.uniform(1, 3, m), rng.uniform(3, 9, m))
        )
        art[idx] = length
        ang = rng.uniform(0, np.pi, m)
        npt = 12
        tpos = (np.arange(npt) / (npt - 1) - 0.5)[None, :] * length[:, None]
        jit = rng.normal(0.0, 0.15, (m, npt)) * (length[:, None] > 0)  # slightly wiggly worms
        xs = px[idx, None] + tpos * np.cos(ang)[:, None] - jit * np.sin(ang)[:, None]
        ys = py[idx, None] + tpos * np.sin(ang)[:, None] + jit * np.cos(ang)[:, None]
        epix = np.sqrt(var_sky_s[idx]) * 10.0 ** (0.4 * rng.uniform(1.6, 8.0, m))
        e = (epix * np.maximum(length, 1.0) / npt)[:, None] * np.ones((1, npt))
        xs, ys = xs + (C - 1) / 2.0, ys + (C - 1) / 2.0
        x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
        fx, fy = xs - x0, ys - y0
        ii = np.broadcast_to(idx[:, None], xs.shape)
        flat = np.zeros(n * C * C)
        for ddy, ddx, wgt in (
            (0, 0, (1 - fx) * (1 - fy)),
            (0, 1, fx * (1 - fy)),
            (1, 0, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            lin = (ii * C + (y0 + ddy)) * C + (x0 + ddx)
            flat += np.bincount(lin.ravel(), weights=(e * wgt).ravel(), minlength=n * C * C)
        I_s += flat.reshape(n, C, C).astype(_F32)

    # bogus: hot pixels (positive in the difference if in the science image, negative in
    # the template), 1 px, 2 px or 2x2 clusters; a fraction are cold pixels
    idx = all_i[K["hot_pixel"]]
    if idx.size:
        m = idx.size
        ci = np.rint(py[idx]).astype(int) + C // 2
        cj = np.rint(px[idx]).astype(int) + C // 2
        px[idx], py[idx] = np.rint(px[idx]), np.rint(py[idx])
        in_s = rng.random(m) < 0.7
        val = np.sqrt(var_sky_s[idx]) * 10.0 ** (0.4 * rng.uniform(1.7, 8.0, m))
        val *= np.where(rng.random(m) < 0.15, -0.3, 1.0)
        shape = rng.choice(3, m, p=[0.7, 0.2, 0.1])
        for dy, dx, use in ((0, 0, shape >= 0), (1, 0, shape >= 1), (0, 1, shape == 2), (1, 1, shape == 2)):
            sel = use
            tgt_s = sel & in_s
            tgt_t = sel & ~in_s
            I_s[idx[tgt_s], ci[tgt_s] + dy, cj[tgt_s] + dx] += val[tgt_s] * rng.uniform(0.5, 1.0, tgt_s.sum())
            I_t[idx[tgt_t], ci[tgt_t] + dy, cj[tgt_t] + dx] += val[tgt_t] * rng.uniform(0.5, 1.0, tgt_t.sum())

    # bogus: bad columns (full, partial or short segments), 1-2 px wide, +/- offsets
    idx = all_i[K["bad_column"]]
    if idx.size:
        m = idx.size
        col = np.rint(px[idx]).astype(int)
        px[idx] = col
        width = np.where(rng.random(m) < 0.2, 2, 1)
        mode = rng.choice(3, m, p=[0.45, 0.35, 0.2])
        ylo = np.where(
            mode == 0, -half, np.where(mode == 1, py[idx] - rng.uniform(0, 8, m), py[idx] - rng.uniform(1.5, 6, m))
        )
        yhi = np.where(mode == 2, py[idx] + rng.uniform(1.5, 6, m), half)
        flip = rng.random(m) < 0.5  # partial columns run up or down
        ylo, yhi = (
            np.where(flip & (mode == 1), -half, ylo),
            np.where(flip & (mode == 1), py[idx] + rng.uniform(0, 8, m), yhi),
        )
        val = np.sqrt(var_sky_s[idx]) * rng.uniform(0.8, 3.0, m) * 10.0 ** (0.4 * rng.uniform(0.5, 4.0, m))
        val *= np.where(rng.random(m) < 0.7, 1.0, -1.0)
        inx = (g[None, :] >= col[:, None] - 0.1) & (g[None, :] <= col[:, None] + width[:, None] - 0.9)
        iny = (g[None, :] >= ylo[:, None]) & (g[None, :] <= yhi[:, None])
        add_img = (inx[:, None, :] & iny[:, :, None]) * val[:, None, None].astype(_F32)
        in_s = rng.random(m) < 0.7
        I_s[idx[in_s]] += add_img[in_s]
        I_t[idx[~in_s]] += add_img[~in_s]  # a template column shows inverted in the difference

    # saturation and bleed trails (any stamp with a saturated star, not only that kind)
    I_s = _saturate(I_s, sat, sky_s)
    sat_tmpl = single | (rng.random(n) < 0.4)
    if sat_tmpl.any():
        I_t[sat_tmpl] = _saturate(I_t[sat_tmpl], sat_t[sat_tmpl], sky_t[sat_tmpl])

    # bogus: CCD edges -- data missing beyond a line near the centre in one or both images
    # (zero-filled or NaN), with an optional glow / roll-off along the edge
    idx = all_i[K["ccd_edge"]]
    miss_s = np.zeros((n, C, C), dtype=bool)
    miss_t = np.zeros((n, C, C), dtype=bool)
    edge_nan = np.zeros(n, dtype=bool)
    if idx.size:
        m = idx.size
        side = rng.integers(0, 4, m)  # 0:+x 1:-x 2:+y 3:-y
        e = rng.uniform(0.0, 4.5, m)  # at most ~half of the stamp is missing
        which = rng.choice(3, m, p=[0.4, 0.35, 0.25])  # science, template, both
        e_t = np.where(which == 2, e + rng.uniform(-3.0, 3.0, m), e)
        coord_x = np.broadcast_to(g[None, None, :], (m, C, C))
        coord_y = np.broadcast_to(g[None, :, None], (m, C, C))
        sgn = np.where(side % 2 == 0, 1.0, -1.0)[:, None, None]
        crd = np.where((side < 2)[:, None, None], coord_x, coord_y) * sgn
        ms = (crd > e[:, None, None]) & (which != 1)[:, None, None]
        mt = (crd > e_t[:, None, None]) & (which != 0)[:, None, None]
        miss_s[idx], miss_t[idx] = ms, mt
        glow = (
            (rng.random(m) < 0.6)[:, None, None]
            * (np.sqrt(var_sky_s[idx]) * rng.uniform(0.0, 30.0, m))[:, None, None]
            * np.exp(-np.clip(e[:, None, None] - crd, 0, None) / rng.uniform(0.5, 2.5, m)[:, None, None])
        )
        glow_in_s = (which != 1)[:, None, None]
        I_s[idx] += np.where(glow_in_s & ~ms, glow, 0.0).astype(_F32)
        I_t[idx] += np.where(~glow_in_s & ~mt, glow, 0.0).astype(_F32)
        edge_nan[idx] = rng.random(m) < 0.6
        # the candidate position is the point of the (science or template) edge near centre
        ee = np.where(which == 1, e_t, e) - 0.5
        ax = np.where(side < 2, ee * np.where(side % 2 == 0, 1, -1), px[idx])
        ay = np.where(side >= 2, ee * np.where(side % 2 == 0, 1, -1), py[idx])
        px[idx], py[idx] = np.clip(ax, -MAX_OFFSET, MAX_OFFSET), np.clip(ay, -MAX_OFFSET, MAX_OFFSET)
        I_s[miss_s] = 0.0
        I_t[miss_t] = 0.0

    # masked: the pipeline's bad-pixel mask covers the saturated core / bleed (NaN)
    mask_sci = np.zeros((n, STAMP, STAMP), dtype=bool)
    mask_tmp = np.zeros((n, STAMP, STAMP), dtype=bool)
    idx = all_i[K["masked"]]
    if idx.size:
        dil = rng.integers(0, 3, idx.size)
        mask_sci[idx] = _dilate(crop(I_s[idx] >= sat[idx, None, None]), dil)
        mask_tmp[idx] = (
            _dilate(crop(I_t[idx] >= sat_t[idx, None, None]), dil) & (rng.random(idx.size) < 0.5)[:, None, None]
        )

    # --- PSF matching, subtraction, SNR -----------------------------------------------------
    Sm = matched(I_s, ~t_sharp, ky_s, kx_s)
    Tm = matched(I_t, t_sharp, ky_t, kx_t)
    bkg_err = rng.normal(0.0, 0.05, n) * sig_d
    D = Sm - _col(fscale) * Tm - _col(sky_s - fscale * sky_t + bkg_err)
    # the pipeline's variance: propagated Poisson model (70 %) or background-only (30 %),
    # mis-estimated by a few per cent to ~25 %
    skyonly = rng.random(n) < 0.3
    var_est = np.where(skyonly[:, None, None], _col(sig_d**2), V_d)
    snr = D / (np.sqrt(var_est) * _col(np.exp(rng.normal(0.0, 0.08, n))))

    tmpl, sci = crop(I_t).copy(), crop(I_s).copy()
    # NaN where data are missing or masked (only the kinds that mean it)
    nan_edge = edge_nan[:, None, None] & (crop(miss_s) | crop(miss_t))
    nan_d = nan_edge | mask_sci | mask_tmp
    sci[(edge_nan[:, None, None] & crop(miss_s)) | mask_sci] = np.nan
    tmpl[(edge_nan[:, None, None] & crop(miss_t)) | mask_tmp] = np.nan
    D[nan_d] = np.nan
    snr[nan_d] = np.nan

    # --- candidate cut: |SNR| >= 5 at the object (real: right sign, at the source itself)
    real = kind < len(REAL_KINDS)
    # masked cores cover the object itself: the detection is on the unmasked rim
    win = _centre_window(px, py, 2) | (K["masked"][:, None, None] & _centre_window(px, py, CENTRE_HALF))
    win_real = _centre_window(px, py, 1)
    s = np.where(np.isnan(snr), 0.0, snr)
    pos = np.where(win_real, s, -np.inf).reshape(n, -1).max(1)
    neg = np.where(win_real, s, np.inf).reshape(n, -1).min(1)
    absmax = np.where(win, np.abs(s), 0.0).reshape(n, -1).max(1)
    ok = np.where(
        real,
        np.where(K["variable_neg"], neg <= -detect_snr, pos >= detect_snr),
        absmax >= detect_snr,
    )
    peak = np.where(real, np.where(K["variable_neg"], -neg, pos), absmax)

    # --- pixel-unit randomisation (label-independent): global scale, an independently
    # scaled template (other zero point), sky-subtracted or raw images, pedestals
    scale = np.where(rng.random(n) < 0.5, 1.0, _loguniform(rng, 0.01, 100.0, n))
    t_scale = np.where(rng.random(n) < 0.4, _loguniform(rng, 1e-4, 100.0, n), 1.0)  # DECam alerts: 1e-3..1.5e-2
    sub_s = rng.random(n) < 0.3
    sub_t = rng.random(n) < 0.5
    ped_d = np.where(rng.random(n) < 0.2, rng.normal(0.0, 0.3, n) * sig_d, 0.0)
    sci = (sci - _col(np.where(sub_s, sky_s, 0.0))) * _col(scale)
    tmpl = (tmpl - _col(np.where(sub_t, sky_t, 0.0))) * _col(scale * t_scale)
    D = (D + _col(ped_d)) * _col(scale)
    # zero-filled missing data stays exactly zero whatever the units
    sci[crop(miss_s) & ~np.isnan(sci)] = 0.0
    tmpl[crop(miss_t) & ~np.isnan(tmpl)] = 0.0

    # --- random orientation (8 dihedral transforms) ---------------------------------------
    stack = np.stack([tmpl, sci, D, snr], axis=1)
    o = rng.integers(0, 8, n)
    oriented = np.empty_like(stack)
    for code in range(8):  # one gather + scatter per orientation group
        idx = np.flatnonzero(o == code)
        a = stack[idx]
        a = a[:, :, ::-1, :] if code & 1 else a
        a = a[:, :, :, ::-1] if code & 2 else a
        oriented[idx] = a.transpose(0, 1, 3, 2) if code & 4 else a
    stack = oriented

    out = {
        "temp_images": stack[:, 0],
        "sci_images": stack[:, 1],
        "diff_images": stack[:, 2],
        "SNR_images": stack[:, 3],
        "labels": real.astype(np.int64),
        "kind": kind.astype(np.int16),
    }
    if with_meta:
        out.update(
            fwhm_sci=fwhm_s.astype(_F32),
            fwhm_tmpl=fwhm_t.astype(_F32),
            sky_sci=sky_s.astype(_F32),
            sky_tmpl=sky_t.astype(_F32),
            sigma_diff=sig_d.astype(_F32),
            peak_snr=peak.astype(_F32),
            flux=dflux.astype(_F32),
            mag=(zp - 2.5 * np.log10(np.maximum(dflux, 1e-9) / exptime)).astype(_F32),
            template_depth=depth_t.astype(_F32),
            unit_scale=scale.astype(_F32),
            template_scale=t_scale.astype(_F32),
            template_noise_ratio=np.sqrt(var_sky_t / var_sky_s).astype(_F32),
            sky_subtracted=sub_s,
            filter=filt.astype(np.int16),
            kernel_error=eta.astype(_F32),
            bad_wcs=bad_wcs,
            template_sharper=t_sharp,
            kernel_sigma=np.sqrt(np.maximum(kvar, 0.0)).astype(_F32),
            star_to_change=nuis.astype(_F32),
            artefact_size=art.astype(_F32),
            noise_in_science=np_sci,
        )
    return out, ok


# ----------------------------------------------------------------------------- public API
def _chunk_kinds(rng: np.random.Generator, n: int, n_real: int) -> np.ndarray:
    kinds = np.concatenate(
        [
            rng.choice(len(REAL_KINDS), n_real, p=REAL_WEIGHTS / REAL_WEIGHTS.sum()),
            len(REAL_KINDS) + rng.choice(len(BOGUS_KINDS), n - n_real, p=BOGUS_WEIGHTS / BOGUS_WEIGHTS.sum()),
        ]
    )
    return rng.permutation(kinds)


def _simulate_chunk(
    rng: np.random.Generator, n: int, n_real: int, with_meta: bool, detect_snr: float = DETECT_SNR
) -> dict:
    kind = _chunk_kinds(rng, n, n_real)
    result: dict[str, np.ndarray] | None = None
    todo = np.arange(n)
    for _ in range(MAX_ROUNDS):
        out, ok = _batch(rng, kind[todo], with_meta, detect_snr)
        if result is None:
            result = {k: np.empty((n,) + v.shape[1:], dtype=v.dtype) for k, v in out.items()}
        for k, v in out.items():
            result[k][todo[ok]] = v[ok]
        todo = todo[~ok]
        if todo.size == 0:
            return result
    raise RuntimeError(f"{todo.size} stamps failed the candidate cut {MAX_ROUNDS} times")


def _check_size(n: int, real_fraction: float) -> None:
    if n < 0 or not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= real_fraction <= 1, got n={n}, real_fraction={real_fraction}")


def simulate_chunk(
    index: int,
    n: int,
    seed: int,
    real_fraction: float = 0.5,
    chunk: int | None = None,
    meta: bool = False,
    detect_snr: float = DETECT_SNR,
) -> dict:
    """Chunk ``index`` of ``simulate(n, seed, real_fraction)`` (stamps ``index*chunk`` on).

    Chunk ``i`` draws from its own stream ``SeedSequence(seed, spawn_key=(i,))`` and holds
    exactly ``round(stop*f) - round(start*f)`` real stamps, so chunks can be simulated in
    any order or in parallel processes and still give the same data as one call.
    """
    _check_size(n, real_fraction)
    chunk = chunk or CHUNK
    start = index * chunk
    stop = min(start + chunk, n)
    if start >= stop:
        raise ValueError(f"chunk {index} is past the end of {n} stamps")
    n_real = int(round(stop * real_fraction)) - int(round(start * real_fraction))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    return _simulate_chunk(rng, stop - start, n_real, meta, detect_snr)


def iter_simulate(
    n: int,
    seed: int,
    real_fraction: float = 0.5,
    chunk: int | None = None,
    meta: bool = False,
    detect_snr: float = DETECT_SNR,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(start, stamps)`` chunk by chunk: the stamps of :func:`simulate` in bounded memory."""
    _check_size(n, real_fraction)
    chunk = chunk or CHUNK
    for i, start in enumerate(range(0, n, chunk)):
        yield start, simulate_chunk(i, n, seed, real_fraction, chunk, meta, detect_snr)


def simulate(
    n: int, seed: int, real_fraction: float = 0.5, meta: bool = False, detect_snr: float = DETECT_SNR
) -> dict[str, np.ndarray]:
    """Simulate ``n`` HiTS-like real/bogus candidates.

    Parameters
    ----------
    n : int
        Number of stamps.
    seed : int
        Seed; the output is a deterministic function of ``(n, seed, real_fraction)``.
    real_fraction : float
        Fraction of real (label 1) stamps; exact up to rounding.
    meta : bool
        Also return per-stamp simulation parameters (seeing, sky, peak SNR, ...).
    detect_snr : float
        Candidate threshold on |SNR| near the centre (HiTS: 5). Alert streams that detect
        with a PSF-matched filter also send fainter per-pixel peaks (DECam examples: 3.6-5.7).

    Returns
    -------
    dict
        ``temp_images``, ``sci_images``, ``diff_images``, ``SNR_images``: float32
        (n, 21, 21); ``labels``: int64 (1 real, 0 bogus); ``kind``: int16 codes into
        :data:`KINDS`. NaN occurs only in kinds listed in :data:`NAN_KINDS`.
    """
    parts = [c for _, c in iter_simulate(n, seed, real_fraction, meta=meta, detect_snr=detect_snr)]
    if not parts:
        empty = {
            k: np.zeros((0, STAMP, STAMP), _F32) for k in ("temp_images", "sci_images", "diff_images", "SNR_images")
        }
        return {**empty, "labels": np.zeros(0, np.int64), "kind": np.zeros(0, np.int16)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
