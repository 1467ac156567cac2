"""4-channel stamps (template, science, difference, SNR-difference) of the 87 real HiTS SNe.

The shared file ``hits2015_sn_science_stamps.h5`` holds, for each of the 87 HiTS 2015
supernovae, 21x21 *science* stamps (ADU) at 24 epochs, before and after explosion, but no
template / difference / SNR channels. This module builds those channels the way a
difference-imaging pipeline would (procedure in ``docs/hits-real-data.md``):

1. per epoch: conditions (seeing, zero point, exposure time, sky) from the HiTS 2015
   conditions table, matched to the exposure by its MJD; local background = clipped
   median of the stamp border; photometric scaling to a common zero point;
2. light curve of the centre: PSF-weighted flux in difference images against a provisional
   template (the earliest epochs); explosion = first epoch of the run of significant
   detections that ends at the peak; iterate with the new template until stable;
3. template = inverse-variance weighted co-add of the good-seeing pre-explosion epochs,
   each convolved to their worst seeing; science = the epoch of peak flux;
4. difference = science - template after convolving the sharper of the two with a
   Gaussian of width sqrt(s_broad^2 - s_sharp^2); SNR = difference / sqrt(variance), with the
   per-pixel variance propagated from gain, read noise and counts through the scaling,
   co-adding and convolution.

Run ``python train/data/hits_real.py --out /tmp/hits_real_sn.h5`` to write the stamps in
HiTS layout (``labels`` all 1, ``id`` = SN names). Nothing here uses pickle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.data.hits_sim import CENTRE_HALF, DETECT_SNR, KINDS  # noqa: E402

_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "hits"
DEFAULT_STAMPS = _SHARED / "hits2015_sn_science_stamps.h5"
DEFAULT_CONDITIONS = _SHARED / "hits2015_camera_and_obs_conditions.json"
PIXEL_SCALE = 0.27
STAMP = 21
KHALF = 10  #: half-width of the matching kernel (pixels)
SIG2FWHM = 2.3548
TEMPLATE_SEEING_FACTOR = 1.25  #: pre-explosion epochs with FWHM <= 1.25 x the best go in the template
DETECT_NSIGMA = 3.0  #: light-curve detection threshold (sigma)
CP_PENALTY = 4.0  #: change-point cost per post-explosion epoch: a post epoch needs |z| > 2 to pay off
IMAGE_KEYS = ("temp_images", "sci_images", "diff_images", "SNR_images")
DIAGNOSTICS = (
    "peak_snr",
    "detected",
    "host_snr",
    "explosion_mjd",
    "peak_flux_mjd",
    "science_mjd",
    "n_template_epochs",
    "n_pre_epochs",
    "clean_template",
    "fwhm_sci",
    "fwhm_tmpl",
    "sky_sci",
)

_yy, _xx = np.mgrid[:STAMP, :STAMP] - STAMP // 2
_R = np.hypot(_xx, _yy)


# ----------------------------------------------------------------------------- helpers
def _taps(sigma: float, half: int = KHALF) -> np.ndarray:
    """Pixel-integrated normalised 1-D Gaussian (a delta for sigma -> 0)."""
    from math import erf, sqrt

    if sigma < 1e-3:
        t = np.zeros(2 * half + 1)
        t[half] = 1.0
        return t
    edges = np.arange(-half - 0.5, half + 1.0)
    cdf = np.array([0.5 * (1.0 + erf(e / (sqrt(2.0) * sigma))) for e in edges])
    t = np.diff(cdf)
    return t / t.sum()


def _convolve(img: np.ndarray, sigma: float, square: bool = False) -> np.ndarray:
    """Separable Gaussian convolution of a stamp (reflecting edges).

    ``square=True`` convolves with the squared kernel, which propagates a variance map.
    """
    t = _taps(sigma)
    if square:
        t = t * t
    pad = np.pad(img, KHALF, mode="reflect")
    n = img.shape[0]
    band = np.zeros((n, n + 2 * KHALF))
    for i in range(n):
        band[i, i : i + 2 * KHALF + 1] = t
    return band @ pad @ band.T


def _background(img: np.ndarray) -> float:
    """Clipped median of the stamp border (r >= 8 px): local sky (+ any smooth host light)."""
    v = img[_R >= 8]
    for _ in range(3):
        med = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - med))
        v = v[np.abs(v - med) <= 3.0 * max(mad, 1e-6)]
    return float(np.median(v))


def _psf(fwhm: float) -> np.ndarray:
    s = fwhm / SIG2FWHM
    p = np.exp(-0.5 * _R**2 / s**2)
    return p / p.sum()


def _match(sci: np.ndarray, vs: np.ndarray, fs: float, tmp: np.ndarray, vt: np.ndarray, ft: float, fit: bool = False):
    """PSF-match two sky-subtracted stamps and subtract; return D, var_D, FWHM of D, fit.

    The sharper image is convolved with a Gaussian of variance |s_sci^2 - s_tmpl^2| (from
    the tabulated seeing). With ``fit`` (off by default, see docs/hits-real-data.md), a
    pipeline-like kernel fit refines it on the stamp
    itself: the kernel variance (on a grid around the tabulated value, with a Gaussian prior
    of 1.5 px^2), the photometric scale ``a`` (prior 1 +/- 0.05) and a background offset
    ``b`` minimise chi^2 of D = S' - a T' - b over the annulus r >= 5.5 px, which excludes
    the supernova (its PSF is < 3 % of the peak there).
    """
    d0 = (fs / SIG2FWHM) ** 2 - (ft / SIG2FWHM) ** 2  # > 0: science broader
    grid = d0 + (np.linspace(-2.5, 2.5, 21) if fit else np.zeros(1))
    ann = _R >= 5.5
    best = None
    for dv in grid:
        if dv > 0:
            s2, v2, t2, w2 = sci, vs, _convolve(tmp, np.sqrt(dv)), _convolve(vt, np.sqrt(dv), square=True)
        else:
            s2, v2, t2, w2 = _convolve(sci, np.sqrt(-dv)), _convolve(vs, np.sqrt(-dv), square=True), tmp, vt
        if fit:
            w = 1.0 / (v2 + w2)[ann]
            A = np.stack([t2[ann], np.ones(ann.sum())], axis=1)
            # weighted normal equations with the priors as pseudo-observations
            M = (A * w[:, None]).T @ A + np.diag([1.0 / 0.05**2, 0.0])
            rhs = (A * w[:, None]).T @ s2[ann] + np.array([1.0 / 0.05**2, 0.0])
            a, b = np.linalg.solve(M, rhs)
            chi2 = float((w * (s2[ann] - a * t2[ann] - b) ** 2).sum()) + ((a - 1) / 0.05) ** 2 + ((dv - d0) / 1.5) ** 2
        else:
            a, b, chi2 = 1.0, 0.0, 0.0
        if best is None or chi2 < best[0]:
            best = (chi2, s2 - a * t2 - b, v2 + a * a * w2, dv, a, b)
    _, d, v, dv, a, b = best
    fwhm = SIG2FWHM * np.sqrt((fs / SIG2FWHM) ** 2 + max(-dv, 0.0))  # the unconvolved science, or broadened
    return d, v, fwhm, {"kernel_var": float(dv), "kernel_var_table": float(d0), "scale": float(a), "offset": float(b)}


def _psf_flux(d: np.ndarray, v: np.ndarray, fwhm: float) -> tuple[float, float]:
    """PSF-weighted flux at the stamp centre and its error (matched filter)."""
    p = _psf(fwhm)
    w = p / (p * p).sum()
    return float((w * d).sum()), float(np.sqrt((w * w * v).sum()))


def _conditions_by_mjd(path: Path) -> tuple[np.ndarray, list[dict]]:
    data = json.loads(Path(path).read_text())
    rows = [r for field in data["obs_conditions"].values() for r in field]
    return np.array([r["obs_days"] for r in rows]), rows


def _coadd(stack: np.ndarray, var: np.ndarray, fwhm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Inverse-variance weighted co-add after convolving every epoch to the worst seeing."""
    target = float(fwhm.max())
    imgs, vars_, w = [], [], []
    for img, v, f in zip(stack, var, fwhm, strict=True):
        k = np.sqrt(max((target / SIG2FWHM) ** 2 - (f / SIG2FWHM) ** 2, 0.0))
        imgs.append(_convolve(img, k))
        vars_.append(_convolve(v, k, square=True))
        w.append(1.0 / np.median(vars_[-1]))
    w = np.array(w) / np.sum(w)
    co = np.tensordot(w, np.array(imgs), axes=1)
    cv = np.tensordot(w**2, np.array(vars_), axes=1)
    return co, cv, target


def _explosion(flux: np.ndarray, err: np.ndarray, pre: np.ndarray, peak: int) -> tuple[int, bool]:
    """Explosion epoch index from a difference light curve (epochs in time order).

    Change point: epochs before ``j`` have zero flux, epochs from ``j`` on any positive flux;
    ``j`` (1..peak) minimises sum_{e<j} z_e^2 + sum_{e>=j} min(z_e, 0)^2 + CP_PENALTY (n - j),
    with z = flux / error, the errors first inflated by the robust scatter of the current
    pre-explosion epochs (host-subtraction systematics). Returns ``(j, clean)``; ``clean`` is
    False when every epoch up to the peak is a > 3 sigma detection (the SN was already there).
    """
    z = flux / err
    if len(pre) >= 3:
        zp = z[pre]
        z = z / max(1.0, 1.4826 * float(np.median(np.abs(zp - np.median(zp)))))
    n = len(z)
    if peak == 0 or np.all(z[: peak + 1] > DETECT_NSIGMA):
        return 0, False
    c_pre = np.cumsum(z**2)  # c_pre[j-1] = sum_{e<j} z^2
    neg2 = np.minimum(z, 0.0) ** 2
    c_post = np.cumsum(neg2[::-1])[::-1]  # c_post[j] = sum_{e>=j} min(z,0)^2
    js = np.arange(1, peak + 1)
    cost = c_pre[js - 1] + c_post[js] + CP_PENALTY * (n - js)
    return int(js[np.argmin(cost)]), True


# ----------------------------------------------------------------------------- per SN
def build_one(
    images: np.ndarray,
    ep: dict[str, np.ndarray],
    mjd_table: np.ndarray,
    rows: list[dict],
    science: str = "peak_flux",
    fit_kernel: bool = False,
) -> dict:
    """Build the 4 channels for one supernova; returns stamps and diagnostics.

    ``science`` picks the science epoch among those from the explosion on: ``"peak_flux"``
    (largest difference flux) or ``"best_snr"`` (largest light-curve S/N, i.e. the epoch at
    which a survey most likely detects it). ``fit_kernel`` refines the matching kernel,
    flux scale and background offset on the stamp (see :func:`_match`).
    """
    order = np.argsort(ep["obs_days"])
    valid = [i for i in order if np.isfinite(images[i]).all() and np.any(images[i] != 0)]
    t = ep["obs_days"][valid]
    raw = images[valid].astype(float)
    gain, rn = float(ep["gain"][valid[0]]), float(ep["read_noise"][valid[0]])
    match = np.array([np.argmin(np.abs(mjd_table - m)) for m in t])
    if np.max(np.abs(mjd_table[match] - t)) > 1e-4:
        raise ValueError("an epoch has no exposure in the conditions table")
    cond = [rows[j] for j in match]
    fwhm = np.array([c["seeing"] for c in cond]) / PIXEL_SCALE
    # flux scale of every epoch relative to the peak epoch is applied later; first to zp 25
    scale = np.array([10.0 ** (0.4 * (25.0 - c["zero_point"])) / c["exp_time"] for c in cond])
    bkg = np.array([_background(im) for im in raw])
    var_raw = np.maximum(raw, 0.0) / gain + (rn / gain) ** 2
    img = (raw - bkg[:, None, None]) * scale[:, None, None]
    var = var_raw * (scale**2)[:, None, None]

    pre = np.arange(min(3, len(t)))  # provisional template: the earliest epochs
    for _ in range(5):
        good = pre[fwhm[pre] <= TEMPLATE_SEEING_FACTOR * fwhm[pre].min()]
        tmp, vt, ft = _coadd(img[good], var[good], fwhm[good])
        flux = np.empty(len(t))
        err = np.empty(len(t))
        for e in range(len(t)):
            d, v, fb, _ = _match(img[e], var[e], fwhm[e], tmp, vt, ft, fit_kernel)
            flux[e], err[e] = _psf_flux(d, v, fb)
        peak = int(np.argmax(flux))
        j, clean = _explosion(flux, err, pre, peak)
        new_pre = np.arange(j) if clean else np.array([int(np.argmin(flux))])
        if np.array_equal(new_pre, pre):
            break
        pre = new_pre
    explosion = j

    # science epoch; everything in the science epoch's own ADU
    if science == "peak_flux":
        s = peak
    elif science == "best_snr":
        s = explosion + int(np.argmax((flux / err)[explosion:])) if clean else int(np.argmax(flux / err))
    else:
        raise ValueError(f"science must be 'peak_flux' or 'best_snr', not {science!r}")
    to_sci = 1.0 / scale[s]
    good = pre[fwhm[pre] <= TEMPLATE_SEEING_FACTOR * fwhm[pre].min()]
    tmp, vt, ft = _coadd(img[good], var[good], fwhm[good])
    tmp, vt = tmp * to_sci, vt * to_sci**2
    sci_sub, vs = img[s] * to_sci, var[s] * to_sci**2
    diff, vd, fb, fitp = _match(sci_sub, vs, fwhm[s], tmp, vt, ft, fit_kernel)
    snr = diff / np.sqrt(vd)
    c = STAMP // 2
    box = snr[c - CENTRE_HALF : c + CENTRE_HALF + 1, c - CENTRE_HALF : c + CENTRE_HALF + 1]
    # host: the template has significant light (PSF-weighted, > 5 sigma) at the SN position
    host_f, host_e = _psf_flux(tmp, vt, ft)
    # the template channel carries the (co-added, rescaled) sky of the template epochs
    sky_t = float(np.average(bkg[good] * scale[good], weights=1.0 / np.median(var[good], axis=(1, 2)))) * to_sci
    return {
        "temp_images": (tmp + sky_t).astype(np.float32),
        "sci_images": raw[s].astype(np.float32),
        "diff_images": diff.astype(np.float32),
        "SNR_images": snr.astype(np.float32),
        "kind": KINDS.index("sn_on_host" if host_f > 5.0 * host_e else "sn"),
        "host_snr": float(host_f / host_e),
        "peak_snr": float(np.max(np.abs(box))),
        "detected": bool(np.max(np.abs(box)) >= DETECT_SNR),
        "explosion_mjd": float(t[explosion]),
        "science_mjd": float(t[s]),
        "n_template_epochs": int(len(good)),
        "n_pre_epochs": int(len(pre)) if clean else 0,
        "clean_template": clean,
        "fwhm_sci": float(fwhm[s]),
        "fwhm_tmpl": float(ft),
        "sky_sci": float(bkg[s]),
        "light_curve_snr": (flux / err).astype(np.float32),
        "light_curve_mjd": t,
        "peak_flux_mjd": float(t[peak]),
        "kernel_fit": fitp,
    }


def build_real_sn_stamps(
    path: str | Path = DEFAULT_STAMPS,
    conditions: str | Path | None = None,
    science: str = "peak_flux",
    fit_kernel: bool = False,
) -> dict:
    """Build template / science / difference / SNR stamps of the 87 real HiTS supernovae.

    Returns a dict with the simulator's keys (``temp_images``, ``sci_images``,
    ``diff_images``, ``SNR_images`` float32 (87, 21, 21), ``labels`` int64 all 1, ``kind``
    int16: ``sn_on_host`` where the template shows > 5 sigma of host light under the SN,
    else ``sn``) plus ``id``
    (SN names, bytes) and per-SN diagnostics (``peak_snr``, ``detected``, ``explosion_mjd``,
    ``science_mjd``, ``n_template_epochs``, ``clean_template``, ``fwhm_sci``, ``fwhm_tmpl``,
    ``sky_sci``). ``science`` chooses the science epoch (see :func:`build_one`).
    ``conditions`` defaults to the conditions JSON next to ``path`` (else the shared one).
    """
    import h5py

    if conditions is None:
        beside = Path(path).with_name(DEFAULT_CONDITIONS.name)
        conditions = beside if beside.exists() else DEFAULT_CONDITIONS
    mjd_table, rows = _conditions_by_mjd(Path(conditions))
    with h5py.File(path, "r") as f:
        images = f["images"][:]
        names = f["id"][:]
        ep = {k: f["epochs"][k][:] for k in f["epochs"]}
    per = [
        build_one(images[i], {k: v[i] for k, v in ep.items()}, mjd_table, rows, science, fit_kernel)
        for i in range(len(images))
    ]
    out: dict[str, np.ndarray] = {k: np.stack([p[k] for p in per]) for k in IMAGE_KEYS}
    out["labels"] = np.ones(len(per), dtype=np.int64)
    out["kind"] = np.array([p["kind"] for p in per], dtype=np.int16)
    out["science"], out["fit_kernel"] = science, fit_kernel
    out["id"] = np.asarray(names)
    for k in DIAGNOSTICS:
        out[k] = np.array([p[k] for p in per])
    return out


def write_h5(d: dict, out: Path, command: str = "") -> None:
    """Write HiTS layout: the 4 image datasets, ``labels`` (all 1), ``id`` (names), diagnostics."""
    import h5py

    with h5py.File(out, "w") as f:
        for k in IMAGE_KEYS:
            f.create_dataset(k, data=d[k])
        f.create_dataset("labels", data=d["labels"])
        kind = f.create_dataset("kind", data=d["kind"])
        kind.attrs["names"] = json.dumps({str(i): name for i, name in enumerate(KINDS)})
        f.create_dataset("id", data=d["id"])
        g = f.create_group("diagnostics")
        for k in DIAGNOSTICS:
            g.create_dataset(k, data=d[k])
        f.attrs.update(
            description="87 real HiTS 2015 supernovae: template = co-added pre-explosion epochs, science = peak "
            "epoch, difference and SNR-difference built by train/data/hits_real.py (docs/hits-real-data.md)",
            command=command,
            detect_snr=DETECT_SNR,
            centre_half=CENTRE_HALF,
            science_epoch=str(d.get("science", "")),
            fit_kernel=bool(d.get("fit_kernel", False)),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build 4-channel stamps of the 87 real HiTS supernovae.")
    ap.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS)
    ap.add_argument("--conditions", type=Path, default=None, help="default: the JSON next to --stamps")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--science",
        choices=["peak_flux", "best_snr"],
        default="peak_flux",
        help="science epoch: largest difference flux (default) or largest light-curve S/N",
    )
    ap.add_argument("--fit-kernel", action="store_true", help="refine kernel width, flux scale and offset on the stamp")
    args = ap.parse_args(argv)
    if not args.stamps.is_file():  # the default is the checkout's ../shared/data: absent in a fresh clone elsewhere
        ap.error(f"--stamps {args.stamps}: no such file (the real HiTS science stamps: ../shared/data/hits/)")
    d = build_real_sn_stamps(args.stamps, args.conditions, args.science, args.fit_kernel)
    write_h5(d, args.out, " ".join(sys.argv))
    n = len(d["labels"])
    print(
        f"wrote {args.out}: {n} SNe; detected (|SNR| >= {DETECT_SNR:g} within the central "
        f"{2 * CENTRE_HALF + 1}x{2 * CENTRE_HALF + 1} px): {int(d['detected'].sum())}/{n}; "
        f"clean pre-explosion template: {int(d['clean_template'].sum())}/{n}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
