"""GPU figures of the CUDA path: IOBinding, CUDA graphs, fp16 with its accuracy check, end to end.

Run by ``benchmarks/gpu.sh`` on a GPU machine (it installs ``onnxruntime-gpu`` first
when needed). Every figure goes to ``--out/gpu_bench.json`` as soon as it is
measured (a run cut short still returns what it has) and is printed.

Figures
-------
- model only, input already on the GPU (IOBinding, fixed batch shape), fp32, with
  and without a CUDA graph, per batch size: stamps/s. Target >= 1,000,000.
- model only, input from host memory (`Classifier` path: copy in, run, copy out).
- fp16 (converted on load): the same rates, and its accuracy on the model's test
  data next to fp32's; accepted only when within 0.1 points.
- normalisation on the GPU (``prep="device"``: the ``stampclf/_graphs`` graph chained
  to the model): raw stamps on the GPU, stamps/s; and its agreement with numpy
  preprocessing (statuses equal, max probability difference) on stamps with masks.
- classify in memory: preprocessing on the host (numpy, one thread and a pool) and on
  the device, + GPU inference.
- end to end: ``stampclf classify FILE.h5 -o OUT.csv --device cuda --prep host|device``
  on an ``--n-file`` HiTS-layout file, next to the rate at which h5py alone reads the
  same file (the disk/page-cache floor). Target: end to end limited by the disk.

    python benchmarks/gpu_bench.py --model hits --out $OUT [--n-file 1000000] [--quick]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

record = _common.recorder("gpu_bench.json", width=58)


def gpu_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_rate(clf: Any, x: np.ndarray, seconds: float) -> float:
    """Stamps/s of the bound model with a real batch already on the GPU (no host copies)."""
    runner = clf._runner
    if runner._binding is None:  # --device cpu (a dry run of this script): no device buffers
        return host_rate(clf, np.concatenate([x] * 4))
    runner.warmup()
    runner._x_dev.update_inplace(np.ascontiguousarray(x[: runner.batch_size]))
    runner.run_bound()
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner.run_bound()
        runs += 1
    runner._y_dev.numpy()
    return runs * runner.batch_size / (time.perf_counter() - t0)


def host_rate(clf: Any, x: np.ndarray) -> float:
    """Stamps/s of `Classifier._run` on prepared input in host memory."""
    clf._run(x[: clf.batch_size])
    t0 = time.perf_counter()
    clf._run(x)
    return len(x) / (time.perf_counter() - t0)


def cpu_ops(graph: bytes, raw: np.ndarray) -> list[str]:
    """Ops of a device prep graph that ONNX Runtime ran on the CPU (profiled; shape arithmetic is fine)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(graph, opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        scalars = {"softening": np.array(1.0, np.float32), "fill": np.array(0.0, np.float32)}
        sess.run(None, {"stamps": np.ascontiguousarray(raw, dtype=np.float32), **scalars})
        events = json.loads(Path(sess.end_profiling()).read_text())
    return sorted({e["args"].get("op_name", "?") for e in events
                   if e.get("cat") == "Node" and e.get("args", {}).get("provider") == "CPUExecutionProvider"})  # fmt: skip


def test_data(clf: Any, n_max: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Prepared test stamps and labels: ``--test-data`` or the card's simulated test split."""
    from stampclf.preprocess import prepare_stamps

    if ARGS.test_data:
        from stampclf.io import HDF5Reader

        r = HDF5Reader(ARGS.test_data, clf.card.input)
        b = r.read_block(0, min(r.n_rows, n_max))
        r.close()
        x, _ = prepare_stamps(b.stamps, clf.card.input, clf.card.preprocessing)
        return x, np.asarray(b.labels, dtype=np.int64), ARGS.test_data
    data = clf.card.training.get("data", {})
    seeds, sizes = data.get("split_seeds", {}), data.get("sizes", {})
    seed = seeds.get("test", 1000 * int(clf.card.training.get("seed", 0)) + 3)
    n = min(int(sizes.get("test", clf.card.training.get("recipe", {}).get("n_test", 100_000))), n_max)
    try:
        from train.data.hits import simulate_prepared
    except ImportError as exc:
        print(f"(no simulator for the test split: {exc})", flush=True)
        return None
    x, y, _ = simulate_prepared(n, seed, clf.card.input, clf.card.preprocessing)
    return x, y, f"simulated test split: seed {seed}, {n:,} stamps (train/data/hits.py)"


def accuracy(clf: Any, proba: np.ndarray, y: np.ndarray) -> float:
    pred = np.array([clf.classes.index(c) for c in clf._decide(proba)])
    return float((pred == y).mean())


def main() -> None:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    from stampclf import Classifier
    from stampclf._bench import describe_machine, synthetic_stamps, write_stamp_file
    from stampclf.preprocess import prepare_stamps

    record(out, "gpu", gpu_name())
    record(out, "machine", describe_machine())
    record(out, "onnxruntime providers", ort.get_available_providers())
    probe = Classifier(ARGS.model, device=ARGS.device, batch_size=1024)
    record(out, "session providers", probe.session.get_providers())
    record(out, "model", f"{probe.name} v{probe.version} ({probe.path})")
    secs = 1.0 if ARGS.quick else 3.0
    batches = [int(b) for b in ARGS.batches.split(",")]
    raw = synthetic_stamps(max(batches), probe.card.shape)
    x = prepare_stamps(raw, probe.card.input, probe.card.preprocessing)[0]
    del probe

    # 1. model only, input on the GPU
    best = (0.0, batches[0], False)
    for bs in batches:
        for graph in (False, True):
            key = f"fp32 input on GPU, batch {bs}{', CUDA graph' if graph else ''}: stamps/s"
            try:
                clf = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, cuda_graph=graph)
                clf._run(x[:bs])
                rate = device_rate(clf, x, secs)
            except Exception as exc:  # noqa: BLE001 - record and go on (e.g. graph capture refused)
                record(out, key, f"failed: {exc.__class__.__name__}: {str(exc)[:200]}")
                continue
            record(out, key, rate)
            best = max(best, (rate, bs, graph))
            del clf
    rate, bs, graph = best
    record(out, "best fp32 input on GPU: stamps/s", rate)
    record(out, "best fp32 input on GPU / 1,000,000 target (ratio)", rate / 1e6)
    record(out, "best setting", f"batch {bs}, CUDA graph {graph}")

    # 1b. normalisation graph + model, raw stamps on the GPU; agreement with numpy
    try:
        dev = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, prep="device")
        dev.classify(raw[:bs])
        runner = dev._runner
        runner._raw_dev.update_inplace(np.ascontiguousarray(raw[:bs], dtype=np.float32))
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            runner.run_bound(raw=True)
            runs += 1
        runner._y_dev.numpy()
        record(out, f"prep on device + model, raw input on GPU, batch {bs}: stamps/s",
               runs * bs / (time.perf_counter() - t0))  # fmt: skip
        record(out, "prep graph: ops placed on the CPU", cpu_ops(runner.prep.model, raw[:bs]))
        cm = np.ascontiguousarray(raw[:bs].transpose(1, 0, 2, 3), dtype=np.float32)
        record(out, "prep graph, channel-major input: ops placed on the CPU", cpu_ops(runner.prep_cm.model, cm))
        a, b = dev.classify(raw[:bs]), dev.classify(cm.transpose(1, 0, 2, 3))  # as the HDF5 reader gives them
        record(out, "prep device, channel-major vs (N, C) input: max |p difference|",
               float(np.nanmax(np.abs(a.proba - b.proba))))  # fmt: skip
        host = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, prep="host")
        masked = raw[: 4 * bs].copy()
        masked[::7, :, :4, :] = np.nan  # masked rows, as at CCD edges
        masked[1::11, 0] = 0.0  # missing templates
        a, b = host.classify(masked), dev.classify(masked)
        record(out, "prep device vs host: statuses equal", bool((a.status == b.status).all()))
        record(out, "prep device vs host: max |p difference|", float(np.nanmax(np.abs(a.proba - b.proba))))
        record(out, "prep device vs host: labels equal (fraction)", float((a.labels == b.labels).mean()))
        del dev, host
    except Exception as exc:  # noqa: BLE001 - record and go on
        record(out, "prep on device", f"failed: {exc.__class__.__name__}: {str(exc)[:300]}")

    # 2. model only, host input (the Classifier path)
    n_host = min(len(x) * 4, 262_144)
    xh = np.concatenate([x] * (n_host // len(x) + 1))[:n_host]
    clf = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, cuda_graph=graph, prep="host")
    record(out, f"fp32 input from host memory, batch {bs}: stamps/s", host_rate(clf, xh))

    # 3. fp16: speed and accuracy against fp32 on the test data
    try:
        half = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, precision="fp16", cuda_graph=graph)
        half._run(x[:bs])
        record(out, f"fp16 input on GPU, batch {bs}: stamps/s", device_rate(half, x, secs))
        record(out, f"fp16 input from host memory, batch {bs}: stamps/s", host_rate(half, xh))
        td = test_data(clf, 20_000 if ARGS.quick else 200_000)
        if td is None:
            record(out, "fp16 accepted", "no: no test data to check it on")
        else:
            xt, yt, what = td
            p32, p16 = clf._run(xt), half._run(xt)
            a32, a16 = accuracy(clf, p32, yt), accuracy(half, p16, yt)
            record(out, "fp16 check data", what)
            record(out, "fp32 test accuracy", a32)
            record(out, "fp16 test accuracy", a16)
            record(out, "max |p_fp16 - p_fp32|", float(np.abs(p16 - p32).max()))
            record(out, "fp16 accepted (within 0.1 points)", bool(abs(a16 - a32) <= 0.001))
        del half
    except Exception as exc:  # noqa: BLE001
        record(out, "fp16", f"failed: {exc.__class__.__name__}: {str(exc)[:300]}")

    # 4. classify in memory: CPU preprocessing + GPU
    n_mem = min(len(raw), 65_536)
    clf.classify(raw[:bs])
    t0 = time.perf_counter()
    for s in range(0, n_mem, bs):
        clf.classify(raw[s : s + bs])
    record(out, "classify in memory (1 preprocessing thread): stamps/s", n_mem / (time.perf_counter() - t0))
    from concurrent.futures import ThreadPoolExecutor

    workers = clf.prep_workers
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda s: prepare_stamps(raw[s : s + bs], clf.card.input, clf.card.preprocessing),
                      range(0, n_mem, bs)))  # fmt: skip
    record(out, f"preprocessing alone, {workers} threads: stamps/s", n_mem / (time.perf_counter() - t0))
    dev = Classifier(ARGS.model, device=ARGS.device, batch_size=bs, prep="device")
    dev.classify(raw[:bs])
    t0 = time.perf_counter()
    for s in range(0, n_mem, bs):
        dev.classify(raw[s : s + bs])
    record(out, "classify in memory, prep on device: stamps/s", n_mem / (time.perf_counter() - t0))
    del dev

    # 5. end to end, next to reading the same file with h5py alone
    if ARGS.n_file:

        work = Path(ARGS.workdir)
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"gpu_e2e_{ARGS.n_file}.h5"
        t0 = time.perf_counter()
        write_stamp_file(str(path), raw[:16_384], ARGS.n_file, clf.card.input.get("hdf5_datasets"))
        record(out, "end-to-end file", f"{ARGS.n_file:,} rows, {path.stat().st_size / 2**30:.2f} GiB, "
                                        f"written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        read_rate, own = _common.read_rates(str(path), clf.card.input, ARGS.n_file, bs)
        record(out, "h5py reading the file alone: stamps/s", read_rate)
        record(out, f"stampclf's HDF5 reader alone (batch {bs}): stamps/s", own)
        csv = work / "gpu_e2e.csv"
        h5 = work / "gpu_e2e_out.h5"
        base = [*_common.stampclf_cmd(), "classify", str(path), "--no-progress", "--device", ARGS.device,
                "-m", str(clf.path), "-b", str(bs)]  # fmt: skip
        # device prep twice (the first run also pays the cuDNN search): best of the two
        for prep, target, rounds in (("host", csv, 1), ("device", csv, 2), ("device", h5, 1)):
            tag = f"end-to-end --prep {prep}" + (", HDF5 out" if target == h5 else "")
            walls, runs = [], []
            for _ in range(rounds):
                wall, rss, err = _common.run_measured([*base, "-o", str(target), "--prep", prep])
                walls.append(wall)
                run = re.search(r" in ([0-9.]+) s \(", err)  # the summary line: the run itself, without start-up
                runs += [float(run[1])] if run else []
            wall = min(walls)
            e2e = ARGS.n_file / wall
            record(out, f"{tag}, stampclf classify --device {ARGS.device} -b {bs}: stamps/s", e2e)
            record(out, f"{tag}: wall time, s (start-up included)", walls if rounds > 1 else wall)
            record(out, f"{tag}: peak RSS, MiB", rss / 2**20)
            record(out, f"{tag} / h5py read rate (ratio)", e2e / read_rate)
            record(out, f"{tag} / best input-on-GPU rate (ratio)", e2e / best[0])
            if runs:
                record(out, f"{tag}: stamps/s of the run itself (start-up excluded)", ARGS.n_file / min(runs))
                record(out, f"{tag}, run itself / h5py read rate (ratio)", ARGS.n_file / min(runs) / read_rate)
            record(out, f"{tag}: stderr", err.strip()[-300:])
        if ARGS.py_spy:  # where the time of the device-prep run goes, per thread (collapsed stacks)
            prof = out / "e2e_device_pyspy.txt"
            cmd = [ARGS.py_spy, "record", "--format", "raw", "--threads", "--idle", "--rate", "200", "-o", str(prof),
                   "--", *base, "-o", str(csv), "--prep", "device"]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            record(out, "py-spy profile of end-to-end --prep device", f"exit {r.returncode}: {prof.name} "
                                                                     f"{r.stderr.strip()[-200:]}")  # fmt: skip
        os.unlink(path)
        for f in (csv, h5):
            f.unlink(missing_ok=True)
    record(out, "done", True)


if __name__ == "__main__":
    p = _common.parser(__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_bench_out"))
    p.add_argument("--batches", default="4096,16384,65536", help="batch sizes to try (comma-separated)")
    p.add_argument("--n-file", type=int, default=1_000_000, help="rows of the end-to-end file (0: skip)")
    p.add_argument("--test-data", default=None, help="HiTS-layout HDF5 with labels for the fp16 check")
    p.add_argument("--quick", action="store_true", help="short timings, small checks")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try this script without a GPU")
    p.add_argument("--py-spy", default=None, help="py-spy binary: also profile one end-to-end --prep device run")
    ARGS = p.parse_args()
    sys.exit(main())
