"""HiTS real/bogus training data: simulated (in parallel, optionally cached) or read from HiTS-layout HDF5.

Options (``--set key=value``, defaults from the model's recipe)
-----------------------------------------------------------------
``n_train``, ``n_val``, ``n_test``
    Simulated split sizes.
``data=train.h5,val.h5,test.h5`` | ``data=all.h5``
    Read three labelled HDF5 files instead of simulating, or one that is split 70/15/15
    (stratified by class, from the seed; ``val_fraction``, ``test_fraction``): any layout
    ``stampclf classify`` reads (HiTS per-channel datasets or a stacked ``stamps`` array),
    labels as class indices or names; rows the runtime would fail are left out and counted.
    ``data_layout=channels|stacked`` and ``data_channels_last=true`` as ``stampclf
    classify``'s ``--layout`` and ``--channels-last``.
``sim_workers``
    Processes simulating shards (default: the CPUs this process may use). The data do
    not depend on it: shards have a fixed size and their own seeds.
``cache=DIR``
    Keep simulated, preprocessed splits as ``.npy`` files in DIR and reuse them (several
    models trained one after another on the same data simulate it once).
``snr_derived``
    Fraction of training stamps whose SNR channel is replaced by the difference channel
    (augmentation, see `HitsAugment`).
``real_sn=PATH`` | ``real_sn=none``
    The 87 real HiTS supernovae as an extra test split ``real_sn`` (default: the shared
    data file ``../shared/data/hits/hits2015_sn_science_stamps.h5`` next to the repository,
    skipped with a note when absent). Its metrics have no ROC AUC (one class: NaN);
    ``train/export.py`` stores that as null in the strict-JSON card.

``train/train.py`` refuses any other ``--set`` key that is not a training recipe key.

Seeds: split ``k`` (1 train, 2 validation, 3 test) of training seed ``s`` has split seed
``1000 s + k``; its shard ``j`` is simulated with seed ``10_000 * split_seed + j``.
``train/evaluate_hits.py`` uses split seed 999, which no training seed produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from stampclf.preprocess import prepare_stamps

from . import DataBundle, array_sha256, register_dataset, stratified_split

__all__ = [
    "CHANNEL_KEYS", "SHARD", "stack_channels", "to_tensors", "read_labelled_h5", "simulate_prepared", "HitsAugment",
    "real_sn_path",
]

CHANNEL_KEYS = ("temp_images", "sci_images", "diff_images", "SNR_images")
#: Stamps per simulation shard (a multiple of the simulator's chunk size).
SHARD = 16_384
#: Shared-data file with the real HiTS supernovae, relative to the repository root.
REAL_SN_DEFAULT = Path("..") / "shared" / "data" / "hits" / "hits2015_sn_science_stamps.h5"
_REPO = Path(__file__).resolve().parents[2]


def stack_channels(d: dict[str, np.ndarray]) -> np.ndarray:
    """HiTS-layout arrays (one per channel, (N, 21, 21) or (N, 441)) to (N, 4, 21, 21)."""
    parts = [np.asarray(d[k], dtype=np.float32) for k in CHANNEL_KEYS]
    return np.stack([p.reshape(len(p), 21, 21) for p in parts], axis=1)


def to_tensors(stamps: np.ndarray, labels: np.ndarray, spec: Any) -> TensorDataset:
    """Preprocess with the runtime's own code and wrap as tensors."""
    x, _status = prepare_stamps(stamps, spec.input, spec.preprocessing, "training data")
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _shard(job: tuple[int, int, dict[str, Any] | None, dict[str, Any] | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate (and, given a card's input and preprocessing, preprocess) one shard; runs in a worker."""
    from .hits_sim import simulate

    n, seed, card_input, preprocessing = job
    d = simulate(n, seed)
    x = stack_channels(d)
    if card_input is not None and preprocessing is not None:
        x, _ = prepare_stamps(x, card_input, preprocessing, f"simulated shard (seed {seed})")
    return x, np.asarray(d["labels"], dtype=np.int64), np.asarray(d["kind"], dtype=np.int16)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def simulate_prepared(
    n: int,
    split_seed: int,
    card_input: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` simulated stamps ``(x, labels, kind)``, preprocessed as the card says (raw if None).

    Shards of `SHARD` stamps with seeds ``10_000 * split_seed + j`` run in ``workers``
    processes; the result does not depend on the number of workers.
    """
    jobs = [
        (min(SHARD, n - i), 10_000 * split_seed + j, card_input, preprocessing)
        for j, i in enumerate(range(0, n, SHARD))
    ]
    workers = max(1, min(workers or _cpus(), len(jobs)))
    if workers == 1:
        parts = [_shard(job) for job in jobs]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent has torch loaded (threads), and fork would warn or hang
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_shard, jobs))
    if not parts:
        return np.zeros((0, 4, 21, 21), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int16)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _cached(
    cache: str | None, n: int, split_seed: int, spec: Any, workers: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not cache:
        return simulate_prepared(n, split_seed, spec.input, spec.preprocessing, workers)
    from .hits_sim import SIM_VERSION

    key = json.dumps([SIM_VERSION, SHARD, n, split_seed, spec.input, spec.preprocessing], sort_keys=True)
    stem = Path(cache) / f"hits_sim_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    files = [stem.with_name(stem.name + f"_{part}.npy") for part in ("x", "y", "kind")]
    if all(f.exists() for f in files):
        return tuple(np.load(f) for f in files)  # type: ignore[return-value]
    arrays = simulate_prepared(n, split_seed, spec.input, spec.preprocessing, workers)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for f, a in zip(files, arrays, strict=True):
        tmp = f.with_name(f.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, a)
        os.replace(tmp, f)  # no half-written cache file is ever read
    return arrays


class HitsAugment:
    """Training augmentation for preprocessed HiTS stamps (runs on the batch's device).

    - a random 90 degree rotation (per batch) and a random mirror (per stamp): real/bogus
      does not depend on orientation;
    - with probability ``snr_derived`` per stamp, the SNR channel becomes a copy of the
      difference channel. Alert streams (ZTF, DECam) ship no noise map, so the runtime
      derives SNR = difference / one robust noise figure, which after the per-channel
      ``robust_asinh`` scaling *is* the scaled difference. The simulator's SNR uses the
      per-pixel noise; training on both keeps the model from relying on the difference.
    """

    on_device = True  # train.py applies it after moving the batch to the device (if it supports that)

    def __init__(self, snr_derived: float = 0.0) -> None:
        self.snr_derived = float(snr_derived)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        x = torch.rot90(x, k, (2, 3))
        n = x.shape[0]
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.snr_derived > 0:
            derived = (torch.rand(n, generator=gen) < self.snr_derived).to(x.device)
            snr = torch.where(derived[:, None, None], x[:, 2], x[:, 3])
            x = torch.cat([x[:, :3], snr[:, None]], 1)
        return x, y


#: the reader's options as ``--set`` keys, for its error messages
_TRAINING_HINTS = {"layout": "--set data_layout={}", "channels_last": "--set data_channels_last=true"}
# "failed: 924 of 1764 pixels not finite" -> one reason, whatever the count
_FAILED_COUNT = re.compile(r"\d+ of \d+ pixels not finite$")
_OVER_BUDGET = "K of M pixels not finite (over the card's nan_policy.max_bad_fraction)"


def read_labelled_h5(path: str, spec: Any, batch_size: int = 8192, layout: str = "auto",
                     channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Model input, class indices and a note on one labelled HDF5 file.

    The file is read by the runtime's own reader (any layout ``stampclf classify``
    accepts) and preprocessed batch by batch with the runtime's code. Rows the runtime
    would not score (status ``failed``: e.g. no finite pixel) are left out, counted in
    the note and printed: a model learns and is evaluated on what it will be given.
    """
    from stampclf import InputError
    from stampclf.io import HDF5Reader
    from stampclf.metrics import label_indices

    reader = HDF5Reader(path, spec.input, str(layout), bool(channels_last), hints=_TRAINING_HINTS)
    try:
        if not reader.has_labels:
            why = getattr(reader, "why_no_labels", None) or "expected a 'labels' dataset, one class per stamp"
            raise InputError(f"{path}: no labels to train on ({why})")
        shape = (reader.n_rows, len(spec.input["channels"]), int(spec.input["height"]), int(spec.input["width"]))
        x, y = np.empty(shape, np.float32), np.empty(reader.n_rows, np.int64)
        keep = np.ones(reader.n_rows, dtype=bool)
        reasons: dict[str, int] = {}
        i = 0
        for batch in reader.batches(batch_size):
            xb, status = prepare_stamps(batch.stamps, spec.input, spec.preprocessing, path)
            n = len(xb)
            x[i : i + n], y[i : i + n] = xb, label_indices(batch.labels, spec.classes, path)
            for j in np.flatnonzero([str(s).startswith("failed") for s in status]):
                keep[i + j] = False
                reason = _FAILED_COUNT.sub(_OVER_BUDGET,
                                           str(status[j]).removeprefix("failed: "))
                reasons[reason] = reasons.get(reason, 0) + 1
            i += n
    finally:
        reader.close()
    note: dict[str, Any] = {"file": os.path.abspath(path), "layout": reader.layout, "rows": int(len(keep)),
                            "used": int(keep.sum())}
    stamp = tuple(int(v) for v in reader.row_shape[1:])
    if stamp != shape[2:]:  # cropped or padded as at run time, where every such row is flagged: say so here too
        note["stamp_size"] = list(stamp)
        print(f"[data] note: {path}: stamps are {stamp[0]}x{stamp[1]}; the model takes {shape[2]}x{shape[3]}, so they "
              f"are centre-{'cropped' if stamp[0] >= shape[2] and stamp[1] >= shape[3] else 'cropped or padded'} "
              "(what stampclf classify does, flagging each row)", flush=True)
    if not keep.all():
        x, y = x[keep], y[keep]
        note["left_out"] = reasons
        top = max(reasons, key=reasons.__getitem__)
        print(f"[data] {path}: {int((~keep).sum()):,} of {len(keep):,} rows left out, as stampclf classify would "
              f"fail them (most often {top!r}: {reasons[top]:,})", flush=True)
    if not reader.n_rows:
        raise InputError(f"{path}: no stamps (0 rows)")
    if not len(y):
        raise InputError(f"{path}: no row to train on ({reader.n_rows} rows; none the runtime could score)")
    return x, y, note


def real_sn_path(option: Any) -> Path | None:
    """The real-SN file from the ``real_sn`` option (None: default, ``"none"``: skip)."""
    if option is not None and str(option).lower() in ("none", "", "false", "0"):
        return None
    return Path(option) if option is not None else (_REPO / REAL_SN_DEFAULT).resolve()


def _real_sn(option: Any, spec: Any) -> tuple[dict[str, TensorDataset], dict[str, Any]]:
    path = real_sn_path(option)
    if path is None:
        return {}, {"real_sn": "skipped (real_sn=none)"}
    if not path.exists():
        if option is not None:  # a path the user gave (or a typo of 'none'): not a reason to go on without it
            raise FileNotFoundError(f"--set real_sn={option}: no such file (real_sn=none: no real-SN test)")
        print(f"[data] note: real HiTS supernovae not found at {path}; no real_sn test (set real_sn=PATH)", flush=True)
        return {}, {"real_sn": f"skipped: {path} not found"}
    try:
        from .hits_real import build_real_sn_stamps
    except ImportError as exc:  # the real-stamp builder is another module; degrade to a note
        print(f"[data] note: cannot build real SN stamps ({exc}); no real_sn test", flush=True)
        return {}, {"real_sn": f"skipped: {exc}"}
    d = build_real_sn_stamps(str(path))
    stamps = stack_channels(d) if isinstance(d, dict) else np.asarray(d)
    labels = np.asarray(d["labels"]) if isinstance(d, dict) and "labels" in d else np.ones(len(stamps), np.int64)
    ds = to_tensors(stamps, labels, spec)
    return {"real_sn": ds}, {"real_sn": {"file": str(path), "n": len(ds), "sha256": array_sha256(stamps, labels)}}


#: the ``--set`` keys `load_hits` reads (see the module docstring)
HITS_OPTIONS = ("n_train", "n_val", "n_test", "data", "val_fraction", "test_fraction", "data_layout",
                "data_channels_last", "sim_workers", "cache", "snr_derived", "real_sn")
#: the keys that apply to data= files only
FILE_OPTIONS = ("val_fraction", "test_fraction", "data_layout", "data_channels_last")


def _reader_options(options: dict[str, Any]) -> dict[str, Any]:
    """``HDF5Reader``'s layout options from ``data_layout`` and ``data_channels_last``."""
    last = options.get("data_channels_last", False)
    if not isinstance(last, bool):
        raise ValueError(f"--set data_channels_last={last}: expected true or false")
    return {"layout": str(options.get("data_layout", "auto")), "channels_last": last}
#: the keys that shape simulated data only (refused with ``data=``, left out of the run's recipe)
SIMULATION_OPTIONS = ("n_train", "n_val", "n_test", "sim_workers", "cache")


def _split_one_file(path: str, spec: Any, recipe: dict[str, Any], seed: int
                    ) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """``data=all.h5``: one file split into train/val/test, stratified by class, from the seed."""
    x, y, note = read_labelled_h5(path, spec, **_reader_options(recipe))
    fractions = (float(recipe.get("val_fraction", 0.15)), float(recipe.get("test_fraction", 0.15)))
    if not all(0 < f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) and leave rows to train on; got {fractions}")
    val, test, train = stratified_split(y, fractions, seed)
    split = {"seed": seed, "val_fraction": fractions[0], "test_fraction": fractions[1], "stratified": True}
    return {k: (x[idx], y[idx], {**note, "split": {**split, "rows": int(len(idx))}})
            for k, idx in (("train", train), ("val", val), ("test", test))}


def _read_given_splits(option: str, spec: Any, recipe: dict[str, Any] | None = None,
                       seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """The ``data=`` splits (three files, or one split from the seed), checked the way a held-out figure needs."""
    recipe = recipe or {}
    paths = [p.strip() for p in option.split(",")]
    if len(paths) not in (1, 3) or not all(paths):
        raise ValueError(f"data= needs one HDF5 file (split 70/15/15 from the seed) or three, train,val,test; "
                         f"got {option!r}")
    if len(paths) == 1:
        return _check_splits(_split_one_file(paths[0], spec, recipe, seed), spec, paths[0])
    given = [k for k in ("val_fraction", "test_fraction") if k in recipe]
    if given:
        raise ValueError(f"--set {given[0]} applies to one data= file, not to three given splits")
    same = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if os.path.realpath(paths[a]) == os.path.realpath(paths[b])]
    names = ("train", "val", "test")
    if same:
        a, b = same[0]
        raise ValueError(f"data=: the {names[a]} and {names[b]} splits are one file, {paths[a]}; "
                         "a held-out split must be other data")
    read = {k: read_labelled_h5(p, spec, **_reader_options(recipe)) for k, p in zip(names, paths, strict=True)}
    return _check_splits(read, spec, paths[0])


def _row_digests(x: np.ndarray) -> list[bytes]:
    """A short digest of each row's model input (8 bytes of BLAKE2b: collisions are negligible here)."""
    return [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in np.ascontiguousarray(x)]


def _note_overlap(splits: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]) -> None:
    """Note, in the split's provenance and on the console, held-out stamps that are also training stamps."""
    train = set(_row_digests(splits["train"][0]))
    for k in ("val", "test"):
        x, _, note = splits[k]
        shared = sum(d in train for d in _row_digests(x))
        if shared:  # e.g. a test file cut from the training file: its figures are not held out
            note["also_in_train"] = shared
            print(f"[data] note: {note['file']}: {shared:,} of {len(x):,} {k} stamps are also in the training "
                  f"split; its figures are not held out for them", flush=True)


def _check_splits(splits: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]], spec: Any,
                  train_path: str) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    digests = {k: array_sha256(x, y) for k, (x, y, _) in splits.items()}
    for k, (_, _, note) in splits.items():
        note["sha256"] = digests[k]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if digests[a] == digests[b]:
            raise ValueError(f"data=: the {a} and {b} splits hold the same stamps and labels "
                             f"({splits[a][2]['file']}, {splits[b][2]['file']})")
    _note_overlap(splits)
    present = np.unique(splits["train"][1])
    if len(present) < len(spec.classes):
        missing = [c for i, c in enumerate(spec.classes) if i not in present]
        raise ValueError(f"{train_path}: the training split has no {', '.join(map(repr, missing))} stamp; "
                         f"it needs every class of {list(spec.classes)}")
    for k in ("val", "test"):
        if len(np.unique(splits[k][1])) < len(spec.classes):
            print(f"[data] note: {splits[k][2]['file']}: the {k} split lacks a class; its ROC AUC and some "
                  "per-class figures are undefined", flush=True)
    return splits


@register_dataset("hits_sim", options=HITS_OPTIONS)
def load_hits(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Simulated HiTS candidates (train/val/test from disjoint seeds) or labelled files (``data=``)."""
    recipe = {**spec.recipe, **options}
    extra: dict[str, TensorDataset] = {}
    ignored: tuple[str, ...] = ()
    if recipe.get("data"):
        given = [k for k in SIMULATION_OPTIONS if k in options]
        if given:
            raise ValueError(f"--set {given[0]} does not apply with data= (the files give the splits)")
        ignored = SIMULATION_OPTIONS
        splits = _read_given_splits(str(recipe["data"]), spec, options, seed)
        prov: dict[str, Any] = {"source": "labelled HDF5 files", "files": {k: n for k, (_, _, n) in splits.items()}}
        # hash of the preprocessed model input (what the network saw), as for simulated data
        prov["sha256"] = {k: n.pop("sha256") for k, n in prov["files"].items()}
        train, val, test = (TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) for x, y, _ in splits.values())
    else:
        given = [k for k in FILE_OPTIONS if k in options]
        if given:
            raise ValueError(f"--set {given[0]} applies to data= files, not to simulated data")
        from .hits_sim import SIM_VERSION

        sizes = [int(recipe["n_train"]), int(recipe["n_val"]), int(recipe["n_test"])]
        seeds = [seed * 1000 + 1, seed * 1000 + 2, seed * 1000 + 3]  # disjoint streams: test never seen
        workers = int(recipe["sim_workers"]) if recipe.get("sim_workers") else None
        prepared = [_cached(recipe.get("cache"), n, s, spec, workers) for n, s in zip(sizes, seeds, strict=True)]
        prov = {
            "source": "simulated HiTS candidates (train/data/hits_sim.py), conditions from the real HiTS 2015 "
            "campaign (rodrigcd/HiTS_simulations, MIT)",
            "simulator_version": SIM_VERSION,
            "split_seeds": {"train": seeds[0], "val": seeds[1], "test": seeds[2]},
            "shard": {"size": SHARD, "seed": "10000 * split_seed + shard index"},
            "sizes": {"train": sizes[0], "val": sizes[1], "test": sizes[2]},
            # hash of the preprocessed model input (what the network saw)
            "sha256": {name: array_sha256(x, y) for name, (x, y, _) in zip(("train", "val", "test"), prepared, strict=True)},
        }
        train, val, test = (TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) for x, y, _ in prepared)
    extra, note = _real_sn(recipe.get("real_sn"), spec)  # the real HiTS supernovae: a check for any hits model
    prov.update(note)
    prov["augmentation"] = {"rot90_and_mirror": True, "snr_derived": float(recipe.get("snr_derived", 0.0))}
    return DataBundle(
        train=train, val=val, test=test, provenance=prov,
        augment=HitsAugment(float(recipe.get("snr_derived", 0.0))), extra_tests=extra, ignored=ignored,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m train.data.hits --cache DIR [--model hits] [--seed 0] [--set key=value ...]``.

    Simulates and preprocesses the splits a training run would use and writes them to the
    cache, so that several trainings started afterwards (or at once) only load them.
    """
    import argparse

    import train.models  # noqa: F401 - registers the models
    from train.registry import get_spec
    from train.train import parse_options

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0] if main.__doc__ else None)
    p.add_argument("--cache", required=True)
    p.add_argument("--model", default="hits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    args, _unknown = p.parse_known_args(argv)  # tolerate train.py-only flags such as --epochs
    opts = {**parse_options(args.options), "cache": args.cache, "real_sn": "none"}
    data = load_hits(get_spec(args.model), opts, args.seed)
    print("cached", len(data.train), len(data.val), len(data.test), json.dumps(data.provenance["sha256"]))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
