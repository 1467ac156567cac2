"""Realism check of the HiTS simulator against the real HiTS 2015 supernova stamps.

    python train/data/check_hits_realism.py            # needs ../shared/data/hits
    python train/data/check_hits_realism.py --n 20000 --seed 7 --figdir docs/figures

Compares real and simulated distributions of sky level, pixel noise, PSF width (FWHM) and
peak SNR, with the same estimators applied to both, and prints a Markdown table (median and
5/95 percentiles) for docs/hits-simulation.md. Writes ``hits_sim_realism.png`` (CDFs) and
``hits_sim_examples.png`` (example stamps of every kind) into ``--figdir``. Also times the
simulator (stamps per second, wall clock and CPU time, one process).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.data import hits_real  # noqa: E402
from train.data.hits_sim import CENTRE_HALF, KINDS, PIXEL_SCALE, simulate  # noqa: E402

_yy, _xx = np.mgrid[:21, :21] - 10
_R = np.hypot(_xx, _yy)
BORDER = _R >= 8


def sky_and_noise(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per stamp: sky = median of the border (r >= 8 px), noise = 1.4826 MAD there."""
    b = stamps[:, BORDER]
    med = np.nanmedian(b, axis=1)
    return med, 1.4826 * np.nanmedian(np.abs(b - med[:, None]), axis=1)


def fit_fwhm(diff: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """FWHM (px) of the point source nearest the centre of difference stamps.

    Circular Gaussian + constant, centred on the SNR-weighted centroid of the central
    5x5 around the SNR peak; the width by grid search (0.8..6 px sigma), amplitude and
    constant by linear least squares over r <= 6 px. Same estimator for real and simulated.
    """
    n = len(diff)
    c = 10
    box = np.abs(np.nan_to_num(snr[:, c - CENTRE_HALF : c + CENTRE_HALF + 1, c - CENTRE_HALF : c + CENTRE_HALF + 1]))
    k = box.reshape(n, -1).argmax(1)
    py, px = k // (2 * CENTRE_HALF + 1) - CENTRE_HALF, k % (2 * CENTRE_HALF + 1) - CENTRE_HALF
    d = np.nan_to_num(diff) * np.sign(np.nan_to_num(snr)[np.arange(n), py + c, px + c])[:, None, None]
    near = (np.abs(_xx[None] - px[:, None, None]) <= 2) & (np.abs(_yy[None] - py[:, None, None]) <= 2)
    wgt = np.clip(d, 0, None) * near
    tot = wgt.sum((1, 2)) + 1e-12
    x0, y0 = (wgt * _xx).sum((1, 2)) / tot, (wgt * _yy).sum((1, 2)) / tot
    r2 = (_xx[None] - x0[:, None, None]) ** 2 + (_yy[None] - y0[:, None, None]) ** 2
    use = r2 <= 36.0
    best = np.full(n, np.inf)
    fw = np.full(n, np.nan)
    for s in np.arange(0.8, 6.0, 0.05):
        g = np.exp(-0.5 * r2 / s**2)
        # per-stamp 2-parameter least squares (amplitude, constant) on the used pixels
        m = use.sum((1, 2))
        sg, sgg = (g * use).sum((1, 2)), (g * g * use).sum((1, 2))
        sd, sgd = (d * use).sum((1, 2)), (g * d * use).sum((1, 2))
        det = sgg * m - sg * sg
        a = (sgd * m - sg * sd) / det
        b = (sd - a * sg) / m
        chi = (((d - a[:, None, None] * g - b[:, None, None]) ** 2) * use).sum((1, 2))
        better = (chi < best) & (a > 0)
        best[better], fw[better] = chi[better], 2.3548 * s
    return fw


def peak_snr(snr: np.ndarray) -> np.ndarray:
    c = 10
    box = snr[:, c - CENTRE_HALF : c + CENTRE_HALF + 1, c - CENTRE_HALF : c + CENTRE_HALF + 1]
    return np.nanmax(np.abs(box).reshape(len(snr), -1), axis=1)


def _pixnoise(a: np.ndarray) -> np.ndarray:
    """Per-stamp pixel-to-pixel noise: 1.4826 MAD of horizontal differences / sqrt(2)."""
    d = np.diff(a, axis=2).reshape(len(a), -1)
    return 1.4826 * np.nanmedian(np.abs(d - np.nanmedian(d, 1, keepdims=True)), 1) / np.sqrt(2)


def _medfilt5(a: np.ndarray) -> np.ndarray:
    """5x5 median filter (edge-replicated), numpy only."""
    from numpy.lib.stride_tricks import sliding_window_view

    p = np.pad(a, ((0, 0), (2, 2), (2, 2)), mode="edge")
    return np.median(sliding_window_view(p, (5, 5), axis=(1, 2)).reshape(*a.shape, 25), axis=-1)


def _lag1(a: np.ndarray) -> np.ndarray:
    """Per-stamp lag-1 (horizontal) autocorrelation of the noise in the border (r >= 8 px):
    residual from a 5x5 median filter, so that sources and gradients count less."""
    x = a - _medfilt5(a)
    m = BORDER[:, 1:] & BORDER[:, :-1]  # away from the candidate
    num = np.nanmean((x[:, :, 1:] * x[:, :, :-1])[:, m], axis=1)
    return num / np.nanmean((x * x)[:, BORDER], axis=1)


def _scale_fit(sci: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per stamp a in sci ~ a * ref + b (least squares): template-to-science flux units."""
    out = np.empty(len(sci))
    for i, (s_, r_) in enumerate(zip(sci, ref, strict=True)):
        ok = np.isfinite(s_) & np.isfinite(r_)
        A = np.stack([r_[ok], np.ones(ok.sum())], 1)
        out[i] = np.linalg.lstsq(A, s_[ok], rcond=None)[0][0]
    return out


def stamp_stats(tmpl: np.ndarray, sci: np.ndarray, diff: np.ndarray, meta: dict | None = None) -> dict[str, np.ndarray]:
    """Pipeline-property statistics of (template, science, difference) stamps.

    Measured on the stamps; for simulated stamps (``meta`` given) the template depth and
    units are the simulator's parameters (a fit needs structure in the template) and the
    absolute science levels use only stamps left in raw ADU.
    """
    sky, noise = sky_and_noise(sci)
    tsky, _ = sky_and_noise(tmpl)
    sub_t = np.abs(tsky) < 3.0 * np.maximum(_pixnoise(tmpl), 1e-30)
    if meta is None:
        units = 1.0 / _scale_fit(sci, tmpl)
        ratio = _pixnoise(tmpl) / units / _pixnoise(sci)
    else:
        units, ratio = meta["template_scale"], meta["template_noise_ratio"]
        raw = (meta["unit_scale"] == 1.0) & ~meta["sky_subtracted"]
        sky, noise = sky[raw], noise[raw]
    return {
        "science sky level (ADU)": sky,
        "science pixel noise (ADU)": noise,
        "science noise lag-1 autocorrelation": _lag1(sci),
        "template / science noise (same units)": ratio,
        "template flux units / science flux units": units,
        "template sky-subtracted (border median < 3 noise)": sub_t.astype(float),
        "difference noise lag-1 autocorrelation": _lag1(diff),
        "difference peak / its pixel noise (central 9x9)": peak_snr(diff / _pixnoise(diff)[:, None, None]),
    }


def decam_alert_stamps(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central 21x21 of template / science / difference of the DECam alert trigger sources."""
    import gzip
    import io

    import fastavro
    from astropy.io import fits

    def load(b: bytes) -> np.ndarray:
        if b[:2] == b"\x1f\x8b":
            b = gzip.decompress(b)
        a = fits.open(io.BytesIO(b))[0].data.astype(float)
        c0, c1 = a.shape[0] // 2, a.shape[1] // 2
        return a[c0 - 10 : c0 + 11, c1 - 10 : c1 + 11]

    out = []
    for path in sorted(folder.glob("*.avro")):
        with open(path, "rb") as fh:
            for rec in fastavro.reader(fh):
                ts = rec["triggersource"]
                out.append([load(ts[k]) for k in ("refcutout", "scicutout", "diffcutout")])
    a = np.array(out)
    return a[:, 0], a[:, 1], a[:, 2]


def _q(a: np.ndarray) -> str:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    p5, p50, p95 = np.percentile(a, [5, 50, 95])
    fmt = (lambda v: f"{v:.2f}") if p95 < 20 else (lambda v: f"{v:.0f}")
    return f"{fmt(p50)} ({fmt(p5)}–{fmt(p95)})"


def _save(fig, path: Path, dpi: int) -> None:
    """Save a figure as a small palette PNG (the docs keep several of them in git)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--figdir", type=Path, default=Path("docs/figures"))
    ap.add_argument("--stamps", type=Path, default=hits_real.DEFAULT_STAMPS)
    ap.add_argument("--conditions", type=Path, default=hits_real.DEFAULT_CONDITIONS)
    ap.add_argument(
        "--alerts",
        type=Path,
        default=hits_real.DEFAULT_STAMPS.parents[1] / "alerts" / "decam",
        help="DECam alert packets (Avro) to compare pipeline properties with; skipped if absent",
    )
    args = ap.parse_args(argv)

    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # --- real: all science stamps (87 SNe x 24 epochs) and the built 4-channel stamps
    with h5py.File(args.stamps, "r") as f:
        allsci = f["images"][:].reshape(-1, 21, 21).astype(float)
        ep_seeing_h5 = f["epochs/seeing"][:]
        obs = f["epochs/obs_days"][:].ravel()
    allsci = allsci[np.any(allsci.reshape(len(allsci), -1) != 0, axis=1)]
    mjd, rows = hits_real._conditions_by_mjd(args.conditions)
    seeing_all = np.array([rows[np.argmin(np.abs(mjd - m))]["seeing"] for m in obs]) / PIXEL_SCALE
    real = hits_real.build_real_sn_stamps(args.stamps, args.conditions)
    det = real["detected"]
    r_sky_all, r_noise_all = sky_and_noise(allsci)
    r_sky, r_noise = sky_and_noise(real["sci_images"].astype(float))
    r_fw = fit_fwhm(real["diff_images"], real["SNR_images"])
    r_peak = real["peak_snr"]

    # --- simulated, timed
    simulate(2048, args.seed + 1)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    sim = simulate(args.n, args.seed, meta=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rl = sim["labels"] == 1
    raw = rl & (sim["unit_scale"] == 1.0) & ~sim["sky_subtracted"]  # physical ADU, sky kept
    s_sky, s_noise = sky_and_noise(sim["sci_images"][raw].astype(float))
    s_fw = fit_fwhm(sim["diff_images"][rl], sim["SNR_images"][rl])
    s_peak = peak_snr(sim["SNR_images"][rl])

    rows_md = [
        ("science sky level (ADU), border median", _q(r_sky_all), _q(r_sky), _q(s_sky)),
        ("science pixel noise (ADU), border 1.4826 MAD", _q(r_noise_all), _q(r_noise), _q(s_noise)),
        (
            "seeing FWHM of the science image (px), tabulated",
            _q(seeing_all),
            _q(real["fwhm_sci"]),
            _q(sim["fwhm_sci"][rl]),
        ),
        ("FWHM of the source in the difference (px), Gaussian fit", "–", _q(r_fw[det]) + " (detected)", _q(s_fw)),
        ("peak abs SNR in the central 9x9 px", "–", _q(r_peak) + f"; detected {_q(r_peak[det])}", _q(s_peak)),
    ]
    print(
        f"simulator: {args.n} stamps in {wall:.2f} s wall ({args.n / wall:.0f} stamps/s), "
        f"{cpu:.2f} s CPU ({args.n / cpu:.0f} stamps per CPU-second)"
    )
    print(f"real SNe detected (|SNR| >= 5 within the central 9x9): {int(det.sum())}/{len(det)}")
    print(f"h5 'seeing' field (constant per SN; not the tabulated seeing): {_q(ep_seeing_h5[:, 0])}")
    print()
    print("| quantity | real, all 87x24 science stamps | real, built stamps (87 SNe) | simulated, real class |")
    print("| --- | --- | --- | --- |")
    for r in rows_md:
        print("| " + " | ".join(r) + " |")
    print(f"\nsimulated real-class stamps used: {rl.sum()} (sky/noise: {raw.sum()} in raw ADU with sky)")
    print(
        f"fraction of simulated real class with peak SNR < 10: {np.mean(s_peak < 10):.2f}; real detected: "
        f"{np.mean(r_peak[det] < 10):.2f}"
    )

    # --- pipeline properties: DECam alert stamps vs simulated real class
    if args.alerts.is_dir():
        at, asci, ad = decam_alert_stamps(args.alerts)
        a_stats = stamp_stats(at, asci, ad)
        sub = np.flatnonzero(rl)[:3000]
        s_stats = stamp_stats(
            sim["temp_images"][sub].astype(float),
            sim["sci_images"][sub].astype(float),
            sim["diff_images"][sub].astype(float),
            {k: v[sub] for k, v in sim.items()},
        )
        print(f"\n| property | DECam alerts ({len(at)} trigger stamps) | simulated real class: median (5–95 %) |")
        print("| --- | --- | --- |")
        for k in a_stats:
            vals = ", ".join(f"{v:.3g}" for v in a_stats[k])
            sv = s_stats[k]
            simtxt = f"{100 * sv.mean():.0f} % of stamps" if "sky-subtracted" in k else _q(sv)
            if "lag-1" in k:
                simtxt += f"; {100 * np.mean(sv < 0.1):.0f} % below 0.1"
            print(f"| {k} | {vals} | {simtxt} |")

    # --- figure 1: CDFs
    args.figdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))

    def cdf(ax, a, label, **kw):
        a = np.sort(np.asarray(a, float)[np.isfinite(a)])
        ax.plot(a, np.arange(1, a.size + 1) / a.size, label=f"{label} (n={a.size})", **kw)

    ax = axes[0]
    cdf(ax, r_sky_all, "real, all epochs")
    cdf(ax, r_sky, "real, science epochs")
    cdf(ax, s_sky, "simulated")
    ax.set_xscale("log"), ax.set_xlabel("science sky level (ADU)"), ax.set_ylabel("CDF")
    ax = axes[1]
    cdf(ax, r_noise_all, "real, all epochs")
    cdf(ax, r_noise, "real, science epochs")
    cdf(ax, s_noise, "simulated")
    ax.set_xscale("log"), ax.set_xlabel("science pixel noise (ADU)")
    ax = axes[2]
    cdf(ax, seeing_all, "real, tabulated seeing")
    cdf(ax, r_fw[det], "real detected, fit to difference")
    cdf(ax, sim["fwhm_sci"][rl], "simulated, science seeing")
    cdf(ax, s_fw, "simulated, fit to difference")
    ax.set_xlabel("FWHM (px)"), ax.set_xlim(2, 14)
    ax = axes[3]
    cdf(ax, r_peak, "real, all 87")
    cdf(ax, r_peak[det], "real, detected")
    cdf(ax, s_peak, "simulated real class")
    ax.axvline(5, color="k", lw=0.5)
    ax.set_xscale("log"), ax.set_xlabel("peak |SNR| in central 9x9")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("HiTS simulator vs the 87 real HiTS 2015 supernovae", fontsize=10)
    fig.tight_layout()
    _save(fig, args.figdir / "hits_sim_realism.png", 90)
    plt.close(fig)

    # --- figure 2: examples per kind (first 3 of each kind in the simulated set)
    nper = 3
    chans = ("temp_images", "sci_images", "diff_images", "SNR_images")
    fig, axes = plt.subplots(len(KINDS), 4 * nper, figsize=(4 * nper * 0.95, len(KINDS) * 1.05))
    for r, name in enumerate(KINDS):
        idx = np.flatnonzero(sim["kind"] == r)[:nper]
        for j, i in enumerate(idx):
            for c, key in enumerate(chans):
                a = sim[key][i]
                ax = axes[r, 4 * j + c]
                fin = a[np.isfinite(a)]
                if c == 3:
                    ax.imshow(a, cmap="RdBu_r", vmin=-8, vmax=8, origin="lower")
                elif c == 2:
                    v = np.percentile(np.abs(fin), 99.5) if fin.size else 1.0
                    ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v, origin="lower")
                else:
                    lo, hi = np.percentile(fin, [0.5, 99.5]) if fin.size else (0.0, 1.0)
                    ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, origin="lower")
                ax.set_xticks([]), ax.set_yticks([])
            axes[r, 4 * j].set_title(f"{name}  SNR {sim['peak_snr'][i]:.0f}", fontsize=7, loc="left")
    fig.text(
        0.5,
        0.002,
        "each group: template | science | difference | SNR-difference (NaN = white)",
        ha="center",
        fontsize=8,
    )
    fig.subplots_adjust(wspace=0.04, hspace=0.35, left=0.01, right=0.99, top=0.98, bottom=0.015)
    _save(fig, args.figdir / "hits_sim_examples.png", 72)
    plt.close(fig)
    print(f"\nwrote {args.figdir / 'hits_sim_realism.png'} and {args.figdir / 'hits_sim_examples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
