"""End to end on a GPU only: ``stampclf classify`` of one HiTS-layout file, in a few settings.

The short companion of ``gpu_bench.py`` (which measures everything): the file is
written once, read once by h5py and once by stampclf's reader (the floors), then
classified with each ``--prep`` and each Python thread switch interval given, each
setting ``--rounds`` times. The rate of a run is the one its own summary line gives
(start-up excluded); the best of the rounds is recorded. ``--cold``: each run reads the
file from the disk (evicted from the page cache first), and the disk's own in-order read
rate is the floor. Figures go to
``--out/gpu_e2e.json`` as they are measured.

    python benchmarks/gpu_e2e.py --n 1000000 --out $OUT [--switch 0.005,0.0005] [--py-spy /tmp/py-spy] [--cold]
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

record = _common.recorder("gpu_e2e.json", width=64)


def upload_probe(out: Path, clf: Any) -> None:
    """One batch of raw stamps to the GPU (`OrtValue.update_inplace`) from pageable and from pinned memory."""
    import threading

    import numpy as np

    from stampclf import Classifier, _pinned

    dev = Classifier(clf.path, device="cuda", prep="device", batch_size=clf.batch_size)
    runner = dev._runner_now()
    runner.warmup()
    target, stage, _ = runner._channel_major()
    for kind in ("pageable", "pinned"):
        a = np.ones(stage.shape, np.float32)
        if kind == "pinned" and not _pinned.pin(a):
            record(out, "upload probe: pin", "failed")
            continue
        spins, stop = [0], [False]

        def spin(spins: list[int] = spins, stop: list[bool] = stop) -> None:
            while not stop[0]:
                spins[0] += 1

        thread = threading.Thread(target=spin)
        thread.start()
        target.update_inplace(a)
        t0 = time.perf_counter()
        for _ in range(20):
            target.update_inplace(a)
        dt = (time.perf_counter() - t0) / 20
        stop[0] = True
        thread.join()
        record(out, f"upload probe, {kind}: GB/s", a.nbytes / dt / 1e9)
        record(out, f"upload probe, {kind}: ms per batch", dt * 1e3)
        record(out, f"upload probe, {kind}: other thread's Python steps per ms meanwhile", spins[0] / (20 * dt * 1e3))
        if kind == "pinned":
            _pinned.unpin(a)


def recycling(out: Path, clf: Any, path: Path, csv: Path) -> None:
    """In this process: classify the file with each cap on the reader's recycled blocks; blocks made new vs reused."""
    import stampclf.io._hdf5 as h5mod
    from stampclf import Classifier, classify_files

    real = h5mod.HDF5Reader._block_buffer
    made: list[bool] = []

    def counted(self: Any, shape: tuple[int, ...], dtype: Any) -> Any:
        kept = {id(b) for b in self._blocks}
        buf = real(self, shape, dtype)
        made.append(id(buf) not in kept)
        return buf

    h5mod.HDF5Reader._block_buffer = counted
    dev = Classifier(clf.path, device=ARGS.device, prep="device", batch_size=clf.batch_size)
    dev._runner_now().warmup()
    for cap in (int(c) for c in ARGS.caps.split(",")):
        h5mod._RECYCLED_BLOCKS = cap
        made.clear()
        t0 = time.perf_counter()
        s = classify_files(dev, [str(path)], str(csv), progress=False)
        rate = s.rows / (time.perf_counter() - t0)
        record(out, f"in process, recycled blocks cap {cap}: stamps/s", rate)
        record(out, f"in process, recycled blocks cap {cap}: blocks made new / all", f"{sum(made)} / {len(made)}")
    h5mod.HDF5Reader._block_buffer = real
    h5mod._RECYCLED_BLOCKS = 6


def main() -> None:

    from stampclf import Classifier
    from stampclf._bench import describe_machine, synthetic_stamps, write_stamp_file

    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    record(out, "machine", describe_machine())
    clf = Classifier(ARGS.model, device=ARGS.device, batch_size=ARGS.batch_size)
    record(out, "model", f"{clf.name} v{clf.version} on {clf.device}, batch {clf.batch_size}")
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"gpu_e2e_{ARGS.n}.h5"
    names = clf.card.input.get("hdf5_datasets")
    write_stamp_file(str(path), synthetic_stamps(16_384, clf.card.shape), ARGS.n, names)
    h5, own = _common.read_rates(str(path), clf.card.input, ARGS.n, clf.batch_size)
    record(out, "h5py reading the file alone: stamps/s", h5)
    record(out, "stampclf's reader alone: stamps/s", own)
    if ARGS.cold:  # the floors from the disk: "limited only by the disk" is a ratio near 1 against them
        disk = _common.disk_rate(path, ARGS.n)
        record(out, "cold: the disk, reading the file in order: stamps/s", disk)
        h5_cold, own_cold = _common.read_rates(str(path), clf.card.input, ARGS.n, clf.batch_size, cold=True)
        record(out, "cold: h5py reading the file alone: stamps/s", h5_cold)
        record(out, "cold: stampclf's reader alone: stamps/s", own_cold)
    # the writer's work alone, one thread: what the main thread costs per row on this CPU
    import numpy as np

    from stampclf.io._csvtext import _csv_text
    from stampclf.preprocess import stamp_status

    n = clf.batch_size
    proba = np.random.default_rng(0).random((n, len(clf.classes)), dtype=np.float32)
    labels = np.array(clf.classes * n, dtype=object)[:n]
    t0 = time.perf_counter()
    for _ in range(10):
        stamp_status(np.zeros((n, 4), np.int64), np.zeros((n, 4), bool), "", "", clf.card.input, clf.card.preprocessing)
        _csv_text(np.arange(n), labels, proba, np.full(n, "ok", dtype=object), ["hits", "1.1.0", str(path)], [])
    record(out, "statuses + CSV text alone, one thread: rows/s", 10 * n / (time.perf_counter() - t0))
    if clf.device == "cuda":
        upload_probe(out, clf)
    csv = work / "gpu_e2e.csv"
    if ARGS.caps:
        recycling(out, clf, path, csv)

    def command(prep: str, switch: float, target: Path, tree: str | None = None) -> list[str]:
        # another stampclf first on the path (ahead of the working folder): a side-by-side comparison
        first = f"sys.path.insert(0, {str(Path(tree).resolve())!r}); " if tree else ""
        code = (f"import sys; {first}sys.setswitchinterval({switch}); sys.argv[0] = 'stampclf'; "
                "import stampclf.cli; print(stampclf.cli.__file__, file=sys.stderr); stampclf.cli.main()")  # fmt: skip
        return [sys.executable, "-c", code, "classify", str(path), "-o", str(target), "--no-progress",
                "--device", ARGS.device, "-b", str(clf.batch_size), "-m", str(clf.path), "--prep", prep]  # fmt: skip

    trees = {"this checkout": None, **({f"stampclf from {ARGS.compare}": ARGS.compare} if ARGS.compare else {})}
    for prep in ARGS.prep.split(","):
        for switch in (float(v) for v in ARGS.switch.split(",")):
            for target, (label, tree) in itertools.product(
                (csv, work / "gpu_e2e_out.h5") if ARGS.h5 else (csv,), trees.items()
            ):
                tag = f"{label}: --prep {prep}, switch interval {switch * 1e3:g} ms, {target.suffix[1:]} out{', cold' * ARGS.cold}"
                rates = []
                for _ in range(ARGS.rounds):
                    if ARGS.cold:
                        _common.evict(path)
                    r = subprocess.run(command(prep, switch, target, tree), capture_output=True, text=True, check=False)
                    found = re.search(r" in ([0-9.]+) s \(", r.stderr)
                    if r.returncode or not found:
                        record(out, f"{tag}: failed", r.stderr[-500:])
                        break
                    rates.append(ARGS.n / float(found[1]))
                if rates:
                    record(out, f"{tag}: code", r.stderr.splitlines()[0])
                    record(out, f"{tag}: stamps/s (best of {len(rates)})", max(rates))
                    record(out, f"{tag}: runs", [round(v) for v in rates])
                    record(out, f"{tag} / h5py read rate", max(rates) / h5)
                    record(out, f"{tag} / stampclf reader rate", max(rates) / own)
                    if ARGS.cold:
                        record(out, f"{tag} / the disk", max(rates) / disk)
    if ARGS.py_spy:  # where each thread is (--idle), and who holds the GIL (--gil)
        switch = float(ARGS.switch.split(",")[-1])
        for what in ("idle", "gil"):
            prof = out / f"gpu_e2e_pyspy_{what}.txt"
            r = subprocess.run([ARGS.py_spy, "record", "--format", "raw", "--threads", f"--{what}", "--rate", "50",
                                "-o", str(prof), "--", *command("device", switch, csv)],
                               capture_output=True, text=True, check=False)  # fmt: skip
            record(out, f"py-spy --{what}, --prep device, switch {switch * 1e3:g} ms", r.stderr.strip()[-200:])
    for f in (path, csv, work / "gpu_e2e_out.h5"):
        f.unlink(missing_ok=True)


if __name__ == "__main__":
    p = _common.parser(__doc__)
    p.set_defaults(batch_size=16_384)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_e2e_out"))
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--prep", default="device", help="comma-separated: host, device")
    p.add_argument("--switch", default="0.005", help="comma-separated thread switch intervals, s (Python's default 0.005)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--h5", action="store_true", help="also HDF5 output")
    p.add_argument("--caps", default="", help="comma-separated caps on the reader's recycled blocks, timed in process")
    p.add_argument("--compare", default=None,
                   help="a folder holding another stampclf package (e.g. `git archive REV stampclf`): timed too")  # fmt: skip
    p.add_argument("--cold", action="store_true",
                   help="also from the disk: each run with the file evicted from the page cache, and the floors so")  # fmt: skip
    p.add_argument("--py-spy", default=None, help="py-spy binary: profile one run (the last switch interval)")
    ARGS = p.parse_args()
    main()
