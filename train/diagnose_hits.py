"""Where a HiTS model errs on simulated data: accuracy per kind and per simulation parameter.

    python train/diagnose_hits.py --model exported/hits.onnx [--n 40000] [--seed 4242]

Simulates ``--n`` stamps with ``meta=True`` (`train.data.hits_sim.simulate`), classifies
them through the runtime at the card's threshold (rows it refuses count as bogus) and
prints, for every kind, the fraction right overall and in bins of peak SNR, PSF-matching
kernel width, which image was convolved, astrometric failure, template depth, and the
kind's own parameter (variables: template star / flux change; dipoles and cosmic rays:
offset or track length; rings: kernel-width error; noise peaks: in the science image).
Parameters a simulator version does not return are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `stampclf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from stampclf import Classifier
from train.data import hits_sim

__all__ = ["main"]

_COMMON = (
    ("peak_snr", "peak_snr", (6, 8, 12, 20, 50, 200)),
    ("kernel_sigma", "kernel_sigma", (0.5, 1, 1.5, 2, 2.5)),
    ("template convolved", "template_sharper", (0.5,)),
    ("bad WCS", "bad_wcs", (0.5,)),
    ("template depth", "template_depth", (1.5, 30, 1000)),
)
_OWN = {
    "variable_pos": ("star/change", "star_to_change", (0.3, 1, 3, 10, 30)),
    "variable_neg": ("star/change", "star_to_change", (0.3, 1, 3, 10, 30)),
    "dipole": ("offset px", "artefact_size", (0.3, 0.6, 1.0)),
    "cosmic_ray": ("length px", "artefact_size", (1, 3)),
    "ring": ("|kernel error|", "kernel_error", (0.12, 0.2, 0.3)),
    "noise_peak": ("in science", "noise_in_science", (0.5,)),
}


def _bins(ok: np.ndarray, values: np.ndarray, edges: tuple[float, ...], min_n: int = 30) -> str:
    b = np.digitize(values, edges)
    cells = []
    for i in range(len(edges) + 1):
        sel = b == i
        if sel.sum() >= min_n:
            lo = f"{edges[i - 1]:g}" if i else "-inf"
            cells.append(f"[{lo}..) {ok[sel].mean():.3f} ({sel.sum()})")
    return "  ".join(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hits", help="shipped model name or .onnx path")
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=4242)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    d = hits_sim.simulate(args.n, args.seed, meta=True)
    clf = Classifier(args.model)
    x = np.stack([d["temp_images"], d["sci_images"], d["diff_images"], d["SNR_images"]], 1)
    p_real = np.nan_to_num(clf.predict_proba(x)[:, clf.classes.index("real")], nan=0.0)
    ok = (p_real >= clf.threshold) == (d["labels"] == 1)
    print(f"{clf.name} v{clf.version} on simulator {hits_sim.SIM_VERSION}, n={args.n}, seed={args.seed}: "
          f"accuracy {ok.mean():.4f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    for code, kind in enumerate(hits_sim.KINDS):
        sel = d["kind"] == code
        print(f"{kind} {ok[sel].mean():.4f} ({sel.sum()})")
        for label, key, edges in (*_COMMON, *([_OWN[kind]] if kind in _OWN else [])):
            if key in d:
                values = np.abs(d[key][sel]) if key == "kernel_error" else d[key][sel].astype(float)
                print(f"  {label}: {_bins(ok[sel], values, edges)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
