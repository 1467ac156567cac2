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
    lines = r.stdout.strip().splitlines()
    assert lines[1].startswith("256 stamps with hits ")
    assert lines[2].startswith("accuracy ")
    assert float(lines[2].split()[1].rstrip(",")) > 0.95  # the README's 0.984, with margin
