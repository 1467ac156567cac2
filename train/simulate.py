"""Write simulated HiTS real/bogus candidates as a HiTS-layout HDF5 file.

Usage (from the repository root)::

    python train/simulate.py --n 200000 --seed 1 --out /tmp/sim.h5
    python -m train.simulate --n 1000 --seed 2 --out /tmp/small.h5 --workers 2

Datasets: ``temp_images``, ``sci_images``, ``diff_images``, ``SNR_images`` (float32,
(N, 21, 21)), ``labels`` (int64, 1 real / 0 bogus), ``id`` (int64, 0..N-1), ``kind``
(int16, with attribute ``names``: JSON mapping code -> name). File attributes record the
seed, N, real fraction, simulator version and the command. Stamps are written chunk by
chunk, so memory stays bounded for any N; the file content depends only on
(N, seed, real fraction), not on ``--workers``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: make `train` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from train.data.hits_sim import CHUNK, KINDS, SIM_VERSION, STAMP, iter_simulate, simulate_chunk  # noqa: E402

IMAGE_KEYS = ("temp_images", "sci_images", "diff_images", "SNR_images")


def _chunks_parallel(n: int, seed: int, real_fraction: float, workers: int):
    """Yield (start, chunk) in order, simulated by `workers` processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    starts = list(range(0, n, CHUNK))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {}
        ahead = 2 * workers  # bounded look-ahead keeps memory bounded
        for i in range(min(ahead, len(starts))):
            futures[i] = pool.submit(simulate_chunk, i, n, seed, real_fraction)
        for i, start in enumerate(starts):
            chunk = futures.pop(i).result()
            if i + ahead < len(starts):
                futures[i + ahead] = pool.submit(simulate_chunk, i + ahead, n, seed, real_fraction)
            yield start, chunk


def write_h5(
    out: Path,
    n: int,
    seed: int,
    real_fraction: float = 0.5,
    workers: int = 1,
    command: str | None = None,
    compression: str | None = None,
) -> dict:
    """Simulate ``n`` stamps into ``out``; return a small summary (timing, class counts)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    counts = np.zeros(len(KINDS), dtype=np.int64)
    with h5py.File(tmp, "w") as f:
        kw = dict(chunks=(min(max(n, 1), 1024), STAMP, STAMP), compression=compression) if n else {}
        for k in IMAGE_KEYS:
            f.create_dataset(k, shape=(n, STAMP, STAMP), dtype="f4", **kw)
        f.create_dataset("labels", shape=(n,), dtype="i8")
        f.create_dataset("id", data=np.arange(n, dtype=np.int64))
        kind = f.create_dataset("kind", shape=(n,), dtype="i2")
        kind.attrs["names"] = json.dumps({str(i): name for i, name in enumerate(KINDS)})
        f.attrs.update(
            seed=seed,
            n=n,
            real_fraction=real_fraction,
            simulator="train.data.hits_sim",
            sim_version=SIM_VERSION,
            command=command or "",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            channels=json.dumps(list(IMAGE_KEYS)),
        )
        chunks = (
            iter_simulate(n, seed, real_fraction) if workers <= 1 else _chunks_parallel(n, seed, real_fraction, workers)
        )
        for start, d in chunks:
            stop = start + len(d["labels"])
            for k in IMAGE_KEYS:
                f[k][start:stop] = d[k]
            f["labels"][start:stop] = d["labels"]
            kind[start:stop] = d["kind"]
            counts += np.bincount(d["kind"], minlength=len(KINDS))
    tmp.replace(out)  # never leave a half-written file under the final name
    dt = time.perf_counter() - t0
    return {
        "n": n,
        "seconds": dt,
        "stamps_per_s": n / dt if dt > 0 else float("inf"),
        "kinds": {name: int(c) for name, c in zip(KINDS, counts, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Simulate HiTS real/bogus candidates into a HiTS-layout HDF5 file.")
    ap.add_argument("--n", type=int, required=True, help="number of stamps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--real-fraction", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    ap.add_argument("--compression", choices=["gzip", "lzf"], default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = ap.parse_args(argv)
    if args.n < 0 or not 0.0 <= args.real_fraction <= 1.0:
        ap.error("need --n >= 0 and 0 <= --real-fraction <= 1")
    if args.out.exists() and not args.force:  # e.g. the shipped examples/hits_sample.h5
        ap.error(f"{args.out} exists; give --force to replace it")
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["simulate", *argv])
    summary = write_h5(args.out, args.n, args.seed, args.real_fraction, args.workers, command, args.compression)
    print(f"wrote {args.out}: {args.n} stamps in {summary['seconds']:.1f} s ({summary['stamps_per_s']:.0f} stamps/s)")
    print("kinds: " + ", ".join(f"{k}={v}" for k, v in summary["kinds"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
