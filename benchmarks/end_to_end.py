"""End-to-end ``stampclf classify`` of a HiTS-layout file vs in-memory classification of the same stamps.

The file holds ``--n`` rows cycling through one block of synthetic stamps (made
once, kept in ``--workdir``), chunked like a pipeline would write it. In memory:
`Classifier.classify` (preprocessing + model, no I/O) batch by batch on that same
block, in this process, before and after the end-to-end run (the mean of the two
rates cancels drift in machine load). End to end: ``stampclf classify FILE -o
OUT.csv`` in a child process, wall time including start-up. The figure is the
ratio of the rates. Target: >= 0.9 (reading and writing hidden behind compute).

    python benchmarks/end_to_end.py --model hits --n 1000000 [--output csv|h5]
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import _common


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=int, default=1_000_000, help="rows in the file (default 1,000,000)")
    p.add_argument("--n-memory", type=int, default=65_536, help="rows per in-memory timing (default 65536)")
    p.add_argument("--block", type=int, default=16_384, help="distinct stamps, cycled (default 16384)")
    p.add_argument("--output", choices=("csv", "h5"), default="csv")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from stampclf import Classifier
    from stampclf._bench import synthetic_stamps, time_in_memory

    clf = Classifier(args.model, device=args.device, threads=args.threads, batch_size=args.batch_size)
    block = synthetic_stamps(args.block, clf.card.shape)
    path = _common.stamp_file(args.workdir, clf, args.n, block)
    n_mem = min(args.n_memory, args.n)
    before = n_mem / time_in_memory(clf, block, n_mem)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = os.path.join(tmp, f"out.{args.output}")
        cmd = [*_common.stampclf_cmd(), "classify", path, "-o", out, "-q", "--no-progress", "--device", args.device,
               "-m", str(clf.path), "-b", str(args.batch_size)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        wall, rss, _ = _common.run_measured(cmd)
        out_mb = os.path.getsize(out) / 2**20
    after = n_mem / time_in_memory(clf, block, n_mem)
    mem_rate = (before + after) / 2
    e2e_rate = args.n / wall
    figures: dict[str, Any] = {
        "rows in file": args.n,
        "file size, MiB": os.path.getsize(path) / 2**20,
        f"output .{args.output}, MiB": out_mb,
        "in-memory classify stamps/s (before, after)": f"{before:,.0f}, {after:,.0f}",
        "end-to-end stampclf classify stamps/s": e2e_rate,
        "end-to-end wall time, s": wall,
        "end-to-end peak RSS, MiB": rss / 2**20,
        "end-to-end / in-memory (ratio)": e2e_rate / mem_rate,
        "device, threads, batch": f"{clf.device}, {clf.threads}, {args.batch_size}",
    }
    _common.report("end-to-end vs in-memory", figures, args)


if __name__ == "__main__":
    main()
