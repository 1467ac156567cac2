"""The examples run as documented, against the shipped model and sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_classify_api_example_runs_on_the_shipped_sample() -> None:
    r = subprocess.run(
        [sys.executable, "examples/classify_api.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("256 stamps, accuracy ")
    assert float(line.split("accuracy ")[1].split(";")[0]) > 0.95  # the README's 0.984, with margin
