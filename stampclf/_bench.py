"""``stampclf bench``: in-memory and end-to-end throughput of a model."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from .classifier import Classifier
from .preprocess import prepare_stamps

__all__ = ["run_bench"]


def _synthetic(clf: Classifier, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 10.0, size=(n,) + clf.card.shape).astype(np.float32)


def run_bench(model: str, device: str, batch_size: int, n: int, threads: int | None) -> Iterator[str]:
    """Yield result lines: model inference on prepared input, then classify of an HDF5 file."""
    import h5py

    from ._run import classify_files

    t0 = time.perf_counter()
    clf = Classifier(model, device=device, threads=threads, batch_size=batch_size)
    yield f"model {clf.name} v{clf.version} on {clf.device} ({clf.threads} threads), batch {batch_size}, " \
          f"load {time.perf_counter() - t0:.2f} s"
    if clf.notice:
        yield f"note: {clf.notice}"
    raw = _synthetic(clf, n)
    x = prepare_stamps(raw, clf.card.input, clf.card.preprocessing)[0] if clf.card.kind == "stamp" else raw
    clf._run(x[: batch_size])  # warm-up outside the timing
    t = time.perf_counter()
    clf._run(x)
    dt = time.perf_counter() - t
    yield f"in-memory inference: {n / dt:,.0f} rows/s ({n:,} rows in {dt:.2f} s)"
    if clf.card.kind != "stamp":
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("stamps", data=raw, chunks=(min(n, 4096),) + raw.shape[1:])
        out = os.path.join(tmp, "out.h5")
        s = classify_files(clf, [path], out, batch_size, progress=False)
        yield f"end-to-end classify (HDF5 -> HDF5): {s.rows / s.seconds:,.0f} rows/s ({s.rows:,} rows in {s.seconds:.2f} s)"
