"""Kill tests: a classification killed mid-run leaves no output, or the previous one, never a truncated file.

A real ``stampclf classify`` process is started on a file big enough to run for seconds;
once rows are being written to the temporary file, it gets SIGKILL, SIGINT or SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

N_ROWS = 20_000


@pytest.fixture(scope="module")
def big_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 HiTS-layout rows, gzip-compressed (small on disk, seconds to classify at batch size 16)."""
    path = tmp_path_factory.mktemp("big") / "big.h5"
    yy, xx = np.mgrid[:21, :21]
    bump = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 4.0)
    level = (np.arange(N_ROWS) % 97)[:, None, None]
    stamps = (100 + level * bump + (yy % 3)).astype(np.int16)  # smooth and repetitive: compresses well
    with h5py.File(path, "w") as f:
        for name in ("temp_images", "sci_images", "diff_images", "SNR_images"):
            f.create_dataset(name, data=stamps, chunks=(512, 21, 21), compression="gzip", compression_opts=1)
        f["id"] = np.arange(N_ROWS, dtype=np.int64)
    return path


def _start(big_h5: Path, model: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stampclf", "classify", str(big_h5), "-o", str(out), "--model", str(model),
         "--device", "cpu", "--threads", "1", "--batch-size", "16", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a job started in the background of a non-interactive shell inherits SIGINT ignored
        # (POSIX), and Python keeps it so; give the child the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.part"))


def _wait_for_rows(proc: subprocess.Popen[str], out: Path, timeout: float = 60.0) -> None:
    """Wait until the run is writing rows into its temporary file."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        tmp = _temp_files(out)
        if tmp and tmp[0].stat().st_size > (64_000 if out.suffix == ".csv" else 0):
            if out.suffix != ".csv":
                time.sleep(0.5)  # HDF5: header first, rows after
            assert proc.poll() is None, "the run ended before it could be killed"
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no rows were written in time")


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
def test_sigkill_leaves_no_output(tmp_path: Path, big_h5: Path, tiny_model_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    proc = _start(big_h5, tiny_model_path, out)
    _wait_for_rows(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a file under the final name"
    # what SIGKILL can leave is the hidden temporary file, never anything under the final name
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert visible == []
    assert [p.name.endswith(".part") for p in _temp_files(out)] == [True]


def test_sigkill_keeps_previous_output(tmp_path: Path, big_h5: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("id,label\nyesterday,real\n")
    proc = _start(big_h5, tiny_model_path, out)
    _wait_for_rows(proc, out)
    proc.kill()
    proc.communicate(timeout=30)
    assert out.read_text() == "id,label\nyesterday,real\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_128_plus_signal_and_cleans_up(tmp_path: Path, big_h5: Path, tiny_model_path: Path, sig: int) -> None:
    out = tmp_path / "out.csv"
    proc = _start(big_h5, tiny_model_path, out)
    _wait_for_rows(proc, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, stderr  # 130 for SIGINT, 143 for SIGTERM
    assert stderr.strip().splitlines()[-1] == "stampclf: interrupted; no output written"
    assert "Traceback" not in stderr
    assert not out.exists() and _temp_files(out) == [], "an interrupted run removes its temporary file"
    assert list(tmp_path.iterdir()) == []
