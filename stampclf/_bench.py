"""``stampclf bench``: throughput of a model, in memory and end to end (also used by ``benchmarks/``).

Every figure is measured after a warm-up batch (session plans, cuDNN search and
CUDA graph capture happen outside the timing).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .classifier import Classifier
from .preprocess import prepare_stamps

__all__ = ["run_bench", "synthetic_stamps", "write_stamp_file", "time_in_memory", "time_model", "time_file"]

#: Rows of synthetic stamps held in memory; larger runs cycle through them.
BLOCK_ROWS = 16_384


def synthetic_stamps(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``(n, C, H, W)`` float32 stamps: sky noise plus a point source of random height.

    Realistic enough that preprocessing (median, MAD) does its usual work.
    """
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    psf = np.exp(-((yy - h // 2) ** 2 + (xx - w // 2) ** 2) / 4.5).astype(np.float32)
    x = rng.normal(100.0, 10.0, (n, c, h, w)).astype(np.float32)
    x += rng.uniform(0.0, 300.0, (n, c, 1, 1)).astype(np.float32) * psf
    return x


def write_stamp_file(
    path: str, block: np.ndarray, n: int, datasets: list[str] | None = None, chunk_rows: int = 4096
) -> None:
    """Write *n* rows cycling through *block* as an HDF5 stamp file, block by block.

    ``datasets``: one name per channel (HiTS layout, e.g. ``temp_images``...);
    ``None``: one stacked ``stamps`` dataset. Ids are the row numbers.
    Memory use is one block, whatever *n*.
    """
    import h5py

    shape = block.shape[1:]
    chunk_rows = max(1, min(chunk_rows, n))
    with h5py.File(path, "w") as f:
        if datasets:
            dsets = [f.create_dataset(d, (n, *shape[1:]), "f4", chunks=(chunk_rows, *shape[1:])) for d in datasets]
        else:
            dsets = [f.create_dataset("stamps", (n, *shape), "f4", chunks=(chunk_rows, *shape))]
        ids = f.create_dataset("id", (n,), "i8", chunks=(min(n, max(chunk_rows, 65_536)),))
        for start in range(0, n, len(block)):
            m = min(len(block), n - start)
            if datasets:
                for c, d in enumerate(dsets):
                    d[start : start + m] = block[:m, c]
            else:
                dsets[0][start : start + m] = block[:m]
            ids[start : start + m] = np.arange(start, start + m)


def _time_calls(fn: Any, rows: np.ndarray, n: int, warm: int) -> float:
    """Seconds for ``fn`` over *n* rows, cycling through *rows* (one warm-up call of *warm* rows first)."""
    fn(rows[:warm])
    t0 = time.perf_counter()
    done = 0
    while done < n:
        m = min(len(rows), n - done)
        fn(rows[:m])
        done += m
    return time.perf_counter() - t0


def time_model(clf: Classifier, x: np.ndarray, n: int) -> float:
    """Seconds for the model alone on *n* rows of prepared input, cycling through *x*."""
    return _time_calls(clf._run, x, n, clf.batch_size)


def time_in_memory(clf: Classifier, raw: np.ndarray, n: int) -> float:
    """Seconds for `Classifier.classify` (preprocessing and model) on *n* raw rows, cycling through *raw*.

    Each call gets the whole block, so preprocessing overlaps inference as it does for files.
    """
    return _time_calls(clf.classify, raw, n, clf.batch_size)


def time_file(clf: Classifier, path: str, output: str) -> tuple[float, int]:
    """Seconds and rows for `classify_files` of one file into *output* (what ``stampclf classify`` runs)."""
    from ._run import classify_files

    t0 = time.perf_counter()
    s = classify_files(clf, [path], output, clf.batch_size, progress=False)
    return time.perf_counter() - t0, s.rows


def _time_device_resident(clf: Classifier, n: int, raw: bool = False) -> float | None:
    """CUDA only: seconds for *n* rows with the input already on the GPU (no host copies).

    *raw*: raw stamps, normalised by the device graph before the model (``prep="device"``).
    """
    runner = clf._runner
    if runner is None or runner.device != "cuda" or (raw and runner.prep is None):
        return None
    runner.warmup()
    runs = max(1, n // runner.batch_size)
    t0 = time.perf_counter()
    for _ in range(runs):
        runner.run_bound(raw)
    runner._y_dev.numpy()  # waits for the last run
    return (time.perf_counter() - t0) * n / (runs * runner.batch_size)


def run_bench(
    model: str,
    device: str,
    batch_size: int | None,
    n: int,
    threads: int | None,
    precision: str = "fp32",
    cuda_graph: bool = False,
    prep: str = "auto",
) -> Iterator[str]:
    """Yield result lines: the model on prepared input, classify in memory, classify of an HDF5 file."""
    t0 = time.perf_counter()
    clf = Classifier(
        model, device=device, threads=threads, batch_size=batch_size, precision=precision, cuda_graph=cuda_graph,
        prep=prep,
    )
    yield (
        f"model {clf.name} v{clf.version} ({precision}) on {clf.device} ({clf.threads} threads), "
        f"batch {clf.batch_size}, prep on {clf.prep}, load {time.perf_counter() - t0:.2f} s"
    )
    if clf.notice:
        yield f"note: {clf.notice}"
    raw = synthetic_stamps(min(n, BLOCK_ROWS), clf.card.shape)
    x = prepare_stamps(raw, clf.card.input, clf.card.preprocessing)[0] if clf.card.kind == "stamp" else raw
    dt = time_model(clf, x, n)
    yield f"model only, in memory:   {n / dt:>12,.0f} rows/s ({n:,} rows in {dt:.2f} s)"
    dev = _time_device_resident(clf, n)
    if dev is not None:
        yield f"model only, input on GPU:{n / dev:>12,.0f} rows/s"
    dev_raw = _time_device_resident(clf, n, raw=True)
    if dev_raw is not None:
        yield f"prep + model, raw on GPU:{n / dev_raw:>12,.0f} rows/s (normalisation graph chained to the model)"
    if clf.card.kind != "stamp":
        return
    dt_mem = time_in_memory(clf, raw, n)
    yield f"classify, in memory:     {n / dt_mem:>12,.0f} rows/s (preprocessing on {clf.prep} + model)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.h5")
        write_stamp_file(path, raw, n, clf.card.input.get("hdf5_datasets"))
        out = os.path.join(tmp, "out.csv")
        clf.classify(raw[: clf.batch_size])  # warm-up
        dt_file, rows = time_file(clf, path, out)
    yield (
        f"classify, HDF5 -> CSV:   {rows / dt_file:>12,.0f} rows/s ({rows:,} rows in {dt_file:.2f} s; "
        f"{dt_mem / dt_file:.2f} of in memory)"
    )


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, affinity, memory and library versions, for benchmark records."""
    import platform

    import onnxruntime as ort

    from ._session import cpu_count

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cpus_total": os.cpu_count(),
        "cpus_affinity": cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
