"""Peak memory (RSS) of ``stampclf classify`` for a small and a large file: memory stays flat.

Each size runs in its own child process (``RUSAGE_CHILDREN`` of a wrapper that
runs only that child), writing CSV. The figure is the ratio of the two peaks.
Targets: within 10 % of each other (ratio <= 1.10) and under 1 GiB.

    python benchmarks/peak_memory.py --model hits --sizes 100000 1000000 [--output csv|h5]
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import _common


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--block", type=int, default=16_384, help="distinct stamps, cycled (default 16384)")
    p.add_argument("--output", choices=("csv", "h5"), default="csv")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from stampclf import Classifier
    from stampclf._bench import synthetic_stamps

    clf = Classifier(args.model, device="cpu", batch_size=args.batch_size)
    block = synthetic_stamps(args.block, clf.card.shape)
    peaks, walls = [], []
    for n in args.sizes:
        path = _common.stamp_file(args.workdir, clf, n, block)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            cmd = [*_common.stampclf_cmd(), "classify", path, "-o", os.path.join(tmp, f"out.{args.output}"), "-q",
                   "--no-progress", "--device", args.device, "-m", str(clf.path), "-b", str(args.batch_size)]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            wall, rss, _ = _common.run_measured(cmd)
        peaks.append(rss)
        walls.append(wall)
    small, large = args.sizes
    figures: dict[str, Any] = {
        f"peak RSS, {small:,} stamps, MiB": peaks[0] / 2**20,
        f"peak RSS, {large:,} stamps, MiB": peaks[1] / 2**20,
        "large / small (ratio)": peaks[1] / peaks[0],
        "largest peak / 1 GiB": max(peaks) / 2**30,
        "wall times, s": ", ".join(f"{w:.1f}" for w in walls),
        "device, batch, output": f"{args.device}, {args.batch_size}, {args.output}",
    }
    _common.report("peak memory", figures, args)


if __name__ == "__main__":
    main()
