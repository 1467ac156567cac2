"""What the CPU side of a GPU run sustains: ``classify_files`` with an instant device.

On a GPU with the normalisation on the device (``prep="device"``), the CPU reads the
HDF5 file, stacks the channels, builds the statuses and writes the output; the GPU does
the rest. This script replaces the device call with one that returns at once (a trained
model's probabilities, no non-finite pixels; ``--device-rate``: after a GPU's time, on a
device thread), so the rate it prints is the ceiling the host side puts on end-to-end
throughput, on any machine, no GPU needed. Next to it, the rate at which h5py alone reads
the same file (the page-cache floor) and the ratio. ``--cold``: every run and floor from
the disk (the file evicted from the page cache first), with the rate of reading the file
in order: "limited only by the disk" is a ratio near 1 against that.

    python benchmarks/host_side.py --model hits --n 1000000 [--output csv|h5] [-b 16384] [--device-rate R] [--cold]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import _common
import numpy as np


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=int, default=1_000_000, help="rows in the file (default 1,000,000)")
    p.add_argument("--block", type=int, default=16_384, help="distinct stamps, cycled (default 16384)")
    p.add_argument("--output", choices=("csv", "h5"), default="csv")
    p.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    p.add_argument("--device-rate", type=float, default=0.0,
                   help="stamps/s of a pretend GPU, run on the runner's device thread (0: instant, in line)")  # fmt: skip
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s) for the runs")
    p.add_argument("--cold", action="store_true",
                   help="each run from the disk: the file evicted from the page cache first (and the floors measured so)")  # fmt: skip
    p.set_defaults(batch_size=16_384)  # a GPU's batch (gpu_bench.py's best on the H100)
    args = p.parse_args()


    from stampclf import Classifier, classify_files
    from stampclf._bench import synthetic_stamps
    from stampclf._session import BatchRunner

    clf = Classifier(args.model, device="cpu", prep="device", batch_size=args.batch_size)
    block = synthetic_stamps(args.block, clf.card.shape)
    path = _common.stamp_file(args.workdir, clf, args.n, block)

    # probabilities as a trained model gives them (most near 0 or 1, all digits shown): their text costs
    # what a real run's does; a constant 0.5 would cost less
    logits = np.random.default_rng(0).normal(0, 8, (args.block, len(clf.card.classes))).astype(np.float32)
    realistic = np.exp(logits - logits.max(axis=1, keepdims=True))
    realistic /= realistic.sum(axis=1, keepdims=True)

    def instant(self: BatchRunner, x: Any) -> Any:
        def run(x: Any) -> Any:
            n, c = len(x), self.row_shape[0]
            if args.device_rate:  # a GPU's time, the GIL let go (as ONNX Runtime does)
                time.sleep(n / args.device_rate)
            proba = np.resize(realistic, (n, self.n_out))
            return proba, np.zeros((n, c), np.int64), np.zeros((n, c), bool)

        self.background = bool(args.device_rate)  # as on CUDA: a device thread of its own
        return self._later(run, x)

    BatchRunner.submit_raw = instant  # type: ignore[method-assign]
    rates = []
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = os.path.join(tmp, f"out.{args.output}")
        for _ in range(args.rounds):
            if args.cold:
                _common.evict(path)
            t0 = time.perf_counter()
            s = classify_files(clf, [path], out, progress=False)
            rates.append(s.rows / (time.perf_counter() - t0))
    read, own = _common.read_rates(path, clf.card.input, args.n, clf.batch_size, cold=args.cold)
    disk = {"the disk, reading the file in order: stamps/s": _common.disk_rate(path, args.n)} if args.cold else {}
    _common.report("host side of a GPU run (instant device)", {
        "rows in file": args.n,
        "batch": clf.batch_size,
        "output": args.output,
        "page cache": "cold (evicted before each run)" if args.cold else "warm",
        **disk,
        f"host side, instant device, best of {args.rounds}: stamps/s": max(rates),
        "host side runs: stamps/s": [round(r) for r in rates],
        "h5py reading the file alone: stamps/s": read,
        "stampclf's reader alone: stamps/s": own,
        "host side / h5py read rate (ratio)": max(rates) / read,
        **({"host side / the disk (ratio)": max(rates) / disk[next(iter(disk))]} if disk else {}),
    }, args)  # fmt: skip


if __name__ == "__main__":
    main()
