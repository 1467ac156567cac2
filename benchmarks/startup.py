"""Start-up: wall time of ``stampclf classify`` on a 100-stamp file, import and session creation included.

Side by side in one run: the same command, and the floor a Python program with
the same dependencies pays anyway (``python -c "import numpy, onnxruntime,
h5py"``); each is the median of ``--repeat`` fresh processes. Also prints the
slowest imports of ``import stampclf`` (``python -X importtime``).
Target: < 1.5 s.

    python benchmarks/startup.py --model hits [--repeat 7]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import _common


def _importtime(top: int = 8) -> list[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import stampclf.cli"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    rows.sort(reverse=True)
    return [f"{us / 1000:7.1f} ms {name}" for us, name in rows[:top]]


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rows", type=int, default=100)
    args = p.parse_args()

    from stampclf import Classifier
    from stampclf._bench import synthetic_stamps, write_stamp_file

    clf = Classifier(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.h5")
        write_stamp_file(path, synthetic_stamps(args.rows, clf.card.shape), args.rows,
                         clf.card.input.get("hdf5_datasets"))  # fmt: skip
        cmd = [*_common.stampclf_cmd(), "classify", path, "-o", os.path.join(tmp, "out.csv"), "-q",
               "--device", "cpu", "-m", str(clf.path)]  # fmt: skip
        floor_cmd = [sys.executable, "-c", "import numpy, onnxruntime, h5py"]
        walls, floors = [], []
        for _ in range(args.repeat):
            walls.append(_common.run_measured(cmd)[0])
            floors.append(_common.run_measured(floor_cmd)[0])
    wall, floor = _common.median(walls), _common.median(floors)
    figures: dict[str, Any] = {
        f"stampclf classify, {args.rows} stamps, s (median)": wall,
        "  min, max, s": f"{min(walls):.3f}, {max(walls):.3f}",
        "import numpy, onnxruntime, h5py, s (median)": floor,
        "classify / dependency imports (ratio)": wall / floor,
        "classify / 1.5 s target (ratio)": wall / 1.5,
    }
    _common.report("start-up", figures, args)
    print("slowest imports of `import stampclf.cli` (cumulative):")
    for line in _importtime():
        print("   ", line)


if __name__ == "__main__":
    main()
