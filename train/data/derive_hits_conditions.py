"""Derive the compact HiTS observing-conditions summary used by the simulator.

Run once (needs the shared data folder, which a fresh clone does not have)::

    python train/data/derive_hits_conditions.py \
        --json ../shared/data/hits/hits2015_camera_and_obs_conditions.json

It reads the public HiTS 2015 camera / observing-conditions table (JSON, no pickle) and
writes ``train/data/_hits_conditions.py``: per-filter quantile tables of seeing, sky level,
zero point and 5-sigma limiting magnitude, the exposure-time mix, and the per-CCD
gain / read noise / saturation. The simulator samples from those tables by inverse-CDF
interpolation, so it needs neither the shared folder nor anything beyond numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pprint
from collections import Counter
from pathlib import Path

import numpy as np

# Probability levels of the stored quantiles: dense in the tails, where the rare bad-seeing
# and bright-sky (twilight / moon) exposures live that the simulator must still cover.
PROBS = [0.0, 0.01, 0.025] + [round(0.05 * i, 2) for i in range(1, 20)] + [0.975, 0.99, 1.0]

OUT = Path(__file__).with_name("_hits_conditions.py")


def derive(json_path: Path) -> dict:
    """Return the summary dict derived from the HiTS conditions JSON."""
    raw = json_path.read_bytes()
    data = json.loads(raw)
    rows = [r for field in data["obs_conditions"].values() for r in field]
    filters = Counter(r["filter"] for r in rows)
    per_filter = {}
    for filt in sorted(filters):
        sel = [r for r in rows if r["filter"] == filt]
        q = {}
        for key in ("seeing", "sky_brightness", "zero_point", "limmag5"):
            vals = np.array([r[key] for r in sel], dtype=float)
            vals = vals[np.isfinite(vals)]
            q[key] = [round(float(v), 4) for v in np.quantile(vals, PROBS)]
        exp = Counter(float(r["exp_time"]) for r in sel)
        per_filter[filt] = {
            "n_exposures": len(sel),
            "quantiles": q,
            "exp_time": {str(k): v for k, v in sorted(exp.items())},
        }
    cams = sorted(data["camera_params"], key=lambda c: c["ccd_num"])
    camera = {key: [round(float(c[key]), 4) for c in cams] for key in ("ccd_num", "gain", "read_noise", "saturation")}
    return {
        "source": "rodrigcd/HiTS_simulations real_obs/camera_and_obs_cond (HiTS 2015, DECam)",
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "pixel_scale_arcsec": 0.27,
        "units": {
            "seeing": "arcsec FWHM",
            "sky_brightness": "ADU per pixel (single exposure)",
            "zero_point": "mag for 1 ADU/s (flux_ADU = exp_time * 10**(-0.4*(m - zp)))",
            "limmag5": "5-sigma point-source limiting magnitude",
            "saturation": "ADU",
            "read_noise": "electrons",
            "gain": "electrons per ADU",
        },
        "probs": PROBS,
        "filter_counts": dict(sorted(filters.items())),
        "filters": per_filter,
        "camera": camera,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "shared/data/hits/hits2015_camera_and_obs_conditions.json",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    summary = derive(args.json)
    text = (
        '"""HiTS 2015 observing conditions, summarised (GENERATED, do not edit).\n\n'
        "Written by train/data/derive_hits_conditions.py from the public HiTS 2015\n"
        "camera/observing-conditions table; see that script for the meaning of each field.\n"
        '"""\n\n'
        "# fmt: off\n"
        "CONDITIONS = " + pprint.pformat(summary, width=100, compact=True, sort_dicts=False) + "\n"
        "# fmt: on\n"
    )
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
