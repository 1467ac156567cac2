"""Output writers: rows/s and bytes/row of the CSV and HDF5 outputs of ``stampclf classify``.

Writes ``--n`` rows shaped like a ``hits`` run (integer ids, two classes, "ok"
statuses with a few failed and flagged rows, one input file name) in batches of
``--batch-size`` through the same writer the CLI uses; each format is the median of
``--repeat`` runs. A writer that keeps pace hides behind inference: compare the
rows/s with the model's stamps/s (``stampclf bench``).

    python benchmarks/output_writers.py [--n 100000] [--repeat 3]
"""

from __future__ import annotations

import os
import tempfile
import time

import _common
import numpy as np


def _rows(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.arange(1_000_000_000, 1_000_000_000 + n)
    proba = rng.random((n, 1)).astype("f4")
    proba = np.hstack([proba, 1 - proba])
    labels = np.where(proba[:, 0] >= 0.5, "real", "bogus").astype(object)
    status = np.full(n, "ok", object)
    status[::9973] = "failed: 441 of 441 pixels not finite"
    status[5::20011] = "flagged: 3 pixels saturated (>= 60000 ADU)"
    return ids, labels, proba, status


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    from stampclf.io._writers import ResultWriter

    ids, labels, proba, status = _rows(args.n)
    b = args.batch_size
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir if os.path.isdir(args.workdir) else None) as tmp:
        for fmt in ("csv", "h5"):
            path = os.path.join(tmp, f"out.{fmt}")
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                w = ResultWriter(path, ["real", "bogus"], "hits", "1.1.0")
                for s in range(0, args.n, b):
                    sl = slice(s, s + b)
                    w.write(ids[sl], labels[sl], proba[sl], status[sl], "/data/2026-11-22/night_N4.h5")
                w.commit()
                times.append(time.perf_counter() - t0)
            figures[f"{fmt} rows/s"] = args.n / _common.median(times)
            figures[f"{fmt} bytes/row"] = os.path.getsize(path) / args.n
    _common.report("output writers", figures, args)


if __name__ == "__main__":
    main()
