"""Helpers shared by the benchmark scripts: arguments, machine description, results, test files."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hits", help="shipped model name or path to an .onnx file (default hits)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs of this process)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--workdir", default=os.environ.get("STAMPCLF_BENCH_DIR", "/tmp/stampclf_bench"),
                   help="where generated stamp files are kept and reused (default /tmp/stampclf_bench)")  # fmt: skip
    return p


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from stampclf._bench import describe_machine

    return describe_machine()


def report(name: str, figures: dict[str, Any], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
    """Print the figures, one per line, and write them with the machine description to ``--json``."""
    doc = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "figures": figures,
        **(extra or {}),
    }
    print(f"== {name}")
    for k, v in figures.items():
        print(f"{k:>42}: {v:,.4g}" if isinstance(v, float) else f"{k:>42}: {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def recorder(name: str, width: int = 58) -> Callable[[Path, str, Any], None]:
    """``record(out, key, value)``: add one figure, print it, and rewrite ``out/name`` (JSON) with
    every figure so far, so that a run cut short still leaves what it measured."""
    results: dict[str, Any] = {}

    def record(out: Path, key: str, value: Any) -> None:
        results[key] = value
        print(f"{key:>{width}}: {value:,.4g}" if isinstance(value, float) else f"{key:>{width}}: {value}", flush=True)
        (out / name).write_text(json.dumps(results, indent=2, default=str) + "\n")

    return record


def read_rates(path: str, card_input: dict[str, Any], n: int, batch: int, cold: bool = False) -> tuple[float, float]:
    """Stamps/s of h5py alone reading every stamp dataset of a file (65,536 rows a call), and of
    stampclf's `HDF5Reader` giving its batches: the floors an end-to-end run is measured against.
    *cold*: each from the disk (the file evicted from the page cache first)."""
    import h5py

    from stampclf.io import HDF5Reader

    if cold:
        evict(path)
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        for s in range(0, n, 65_536):
            for name in card_input.get("hdf5_datasets") or ["stamps"]:
                f[name][s : s + 65_536]
    h5 = n / (time.perf_counter() - t0)
    if cold:
        evict(path)
    t0 = time.perf_counter()
    reader = HDF5Reader(str(path), card_input)
    for _ in reader.batches(batch):
        pass
    reader.close()
    return h5, n / (time.perf_counter() - t0)


def evict(path: str | Path) -> None:
    """Drop a file's pages from the page cache (``POSIX_FADV_DONTNEED``; no root needed): the next read is the disk's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_rate(path: str | Path, n: int) -> float:
    """Stamps/s (*n* rows in the file) of reading the whole file from the disk, in order, 64 MiB a call:
    the floor "limited by the disk" means."""
    evict(path)
    buf = memoryview(bytearray(64 * 2**20))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]) > 0:
            pass
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t0)


def median(xs: list[float]) -> float:
    """Median of a list of timings."""
    return float(statistics.median(xs))


def stamp_file(workdir: str, clf: Any, n: int, block: Any) -> str:
    """A HiTS-layout file of *n* rows cycling through *block*, made once and reused."""
    from stampclf._bench import write_stamp_file

    os.makedirs(workdir, exist_ok=True)
    c, h, w = clf.card.shape
    path = os.path.join(workdir, f"{clf.name}_{n}_{c}x{h}x{w}_b{len(block)}.h5")
    if not os.path.exists(path):
        tmp = path + ".part"
        t0 = time.perf_counter()
        write_stamp_file(tmp, block, n, clf.card.input.get("hdf5_datasets"))
        os.replace(tmp, path)
        print(f"(wrote {path}: {n:,} rows in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return path


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run *cmd* in a fresh child; return wall seconds, peak RSS (bytes) of that child, and stderr.

    A small wrapper process runs the command so that ``RUSAGE_CHILDREN`` holds
    this one child only.
    """
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "sys.stderr.write(r.stderr)\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
    )
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, check=False)
    try:
        dt, kib, rc = r.stdout.split()[-3:]
    except ValueError:
        raise RuntimeError(f"measurement wrapper failed: {r.stderr[-2000:]}") from None
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}: {r.stderr[-2000:]}")
    return float(dt), int(kib) * 1024, r.stderr


def stampclf_cmd() -> list[str]:
    """The ``stampclf`` command of this interpreter."""
    return [sys.executable, "-m", "stampclf"]
