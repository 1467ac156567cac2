"""Train a registered model with a fixed seed and write a checkpoint and a report.

Usage
-----
    python train/train.py --model hits [--epochs N] [--seed 0] [--out runs/hits] [--set key=value ...]

    python train/train.py --model cifar10 --evaluate-only   # re-evaluate runs/cifar10 after a TTA change

    python train/train.py --model galaxy --resume   # continue the interrupted run in runs/galaxy

Writes ``<out>/checkpoint.pt`` (a plain state dict, loaded with ``weights_only=True``),
``<out>/report.json`` (history, validation and test metrics, calibration, operating
points, provenance, the exact command) and PNG figures: learning curves, confusion
matrix and ROC curve.

After every epoch the run's state (weights, optimizer, schedule, EMA, random number
generators, history, best epoch) is written to ``<out>/resume.pt``, removed when the run
finishes. ``--resume`` with the interrupted run's command continues from it to the same
weights as an uninterrupted run; another seed, recipe, epoch count, device type, thread count or data is
refused, naming the first difference.

Recipe keys (the registry's ``recipe``, each overridable with ``--set``): ``epochs``,
``batch_size``, ``optimizer`` (``adamw`` | ``sgd``: Nesterov), ``lr`` (one-cycle peak),
``momentum``, ``weight_decay``, ``pct_start``, ``label_smoothing``, ``class_weights`` (one
weight per class, or ``balanced``: N / (K n_c) from the training split),
``channels_last`` (NHWC tensors, faster convolutions on CPU), ``init_from_data`` (N: call
every submodule's ``init_from_data(x)`` with N training inputs before training),
``ema`` (a decay such as 0.999: validate, select and save an exponential moving average
of the weights and batch-norm statistics, updated every step), ``workers``; ``augment`` and
the other data options are the dataset loader's (``train.data.dataset_options``). Any other
``--set`` key is refused (a typo such as ``n_trian=`` would otherwise train on the defaults).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import pickle  # its UnpicklingError only: what torch.load(weights_only=True) raises
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `train` and `stampclf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train import require_training_extra

    require_training_extra("train.py")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from stampclf import metrics as M
from train.data import DataBundle, dataset_options, load_dataset
from train.registry import SIZE_RANGE, ModelSpec, create_model, get_spec, list_models, with_classes, with_size

__all__ = ["train", "main", "predict_logits", "fit_temperature", "reproduce_command", "check_options", "OptionError",
           "parse_options", "one_class_note", "check_device", "json_safe",
           "valid_keys", "NO_EFFECT_KEYS", "TRAIN_KEYS", "DEFAULT_EPOCHS", "RESUME_FILE", "load_weights"]

#: the state of an unfinished run in its ``--out``, written after every epoch (``--resume``)
RESUME_FILE = "resume.pt"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch; deterministic kernels where torch has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _batches(ds: Dataset, batch_size: int, shuffle: bool, gen: torch.Generator, workers: int) -> Iterator[Any]:
    if isinstance(ds, TensorDataset):  # in-memory: index tensors directly, far faster than a DataLoader
        n = len(ds)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in ds.tensors)
    else:
        yield from DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
            persistent_workers=False, drop_last=False,
        )


@torch.no_grad()
def predict_logits(model: nn.Module, ds: Dataset, batch_size: int, device: str, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a whole dataset, in order."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    logits, labels = [], []
    for x, y in _batches(ds, batch_size, False, gen, workers):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _init_from_data(model: nn.Module, train: Dataset, n: int, device: str, gen_seed: int) -> None:
    """Call ``init_from_data(x)`` of every submodule that has one, with *n* training inputs (0: skip).

    The inputs are the first *n* of a seeded permutation of the training set, before augmentation.
    """
    hooks = [m for m in model.modules() if hasattr(m, "init_from_data")]
    if n <= 0 or not hooks:
        return
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(gen_seed))[:n]
    x = torch.stack([train[int(i)][0] for i in idx]).to(device)
    for m in hooks:
        m.init_from_data(x)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T in [0.05, 20] minimising the NLL of ``softmax(logits / T)`` (Guo+2017).

    A bounded grid search rather than gradient descent: on separable data the
    unconstrained optimum runs off to T -> 0.
    """
    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()
    grid = torch.logspace(np.log10(0.05), np.log10(20.0), 241, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(z / t, y) for t in grid])
    return float(np.clip(float(grid[int(nll.argmin())]), 0.05, 20.0))


def safe_pct_start(pct: float, total_steps: int) -> float:
    """*pct* for `OneCycleLR`, nudged where it would divide by zero.

    OneCycleLR divides by ``pct * total_steps - 1``, which is exactly 0 in some tiny runs
    (e.g. 4 steps at 0.25).
    """
    if abs(pct * total_steps - 1.0) < 1e-9:
        return 1.5 / total_steps if total_steps > 2 else pct / 2
    return pct


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _decide(proba: np.ndarray, spec: ModelSpec, threshold: float) -> np.ndarray:
    if spec.positive_class is not None and len(spec.classes) == 2:
        pos = spec.classes.index(spec.positive_class)
        return np.where(proba[:, pos] >= threshold, pos, 1 - pos)
    return proba.argmax(axis=1)


def evaluate_split(
    model: nn.Module, ds: Dataset, spec: ModelSpec, t: float, threshold: float, batch_size: int, device: str, workers: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of one split with calibrated probabilities; also returns (proba, labels)."""
    logits, y = predict_logits(model, ds, batch_size, device, workers)
    proba = _softmax(logits, t)
    pos = spec.classes.index(spec.positive_class) if spec.positive_class else None
    m = M.summary(y, proba, _decide(proba, spec, threshold), list(spec.classes), pos)
    m["ece"] = M.expected_calibration_error(y, proba)
    if len(spec.classes) > 2:
        top3 = np.argsort(-proba, axis=1)[:, :3]
        m["top3_accuracy"] = float((top3 == y[:, None]).any(axis=1).mean())
    return m, proba, y


def _ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """torch's EMA for float tensors; integer ones (BN ``num_batches_tracked``) are copied, not averaged.

    AveragedModel calls it once per group of tensors of one device and dtype.
    """
    floats = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            floats(averaged, current, n)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def _resume_state(out: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The saved state of the unfinished run in *out* with ``--resume``; None without.

    Without ``--resume`` (or ``--force``) an unfinished run is refused: the new run would
    overwrite its state after its first epoch.
    """
    path = out / RESUME_FILE
    if not args.resume:
        if path.exists() and not args.force:
            raise ValueError(f"--out {out}: holds an unfinished run ({RESUME_FILE}); give --resume to continue it, "
                             "--force to start it again, or another --out")
        return None
    if not path.is_file():
        raise ValueError(f"--resume: {path}: no such file (no interrupted run to continue in --out {out})")
    return load_weights(path, "--resume: ", "run state")


def load_weights(path: Path, prefix: str = "", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain values only, never general pickle;
    a file cut short or not torch's is a `ValueError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise ValueError(f"{prefix}{path}: not a readable {what} ({str(exc).splitlines()[0][:160]})") from None


def _split_digests(provenance: dict[str, Any]) -> dict[str, str]:
    """The sha256 of each split: image sets' file lists (decoded pixels may differ by a Pillow
    version), stamps' arrays."""
    return provenance.get("file_lists_sha256" if "file_lists_sha256" in provenance else "sha256", {})


def _fingerprint(spec: ModelSpec, args: argparse.Namespace, epochs: int, recipe: dict[str, Any],
                 data: DataBundle) -> dict[str, str]:
    """What a resumed run must share with the interrupted one to train the same weights, as JSON by key.

    The speed-only keys (`NO_EFFECT_KEYS`, ``workers``) and the data's paths are left out: a
    pre-empted job may resume on another node, with another cache or the files elsewhere
    (their content is compared, ``data.*``).
    """
    skip = {*NO_EFFECT_KEYS, "workers", "epochs", "data", "root"}
    items = {"model": spec.name, "seed": args.seed, "epochs": epochs, "device": torch.device(args.device).type,
             "threads": torch.get_num_threads(),  # another count gives other weights on the CPU
             **{f"recipe.{k}": v for k, v in sorted(recipe.items()) if k not in skip},
             **{f"data.{k}.rows": len(getattr(data, k)) for k in ("train", "val", "test")},
             **{f"data.{k}.sha256": v for k, v in sorted(_split_digests(data.provenance).items())}}
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in items.items()}


def _check_fingerprint(saved: dict[str, str], now: dict[str, str], path: Path) -> None:
    """Refuse to resume the run saved in *path* with other settings, naming the first difference."""
    for key in dict.fromkeys([*saved, *now]):
        if saved.get(key) != now.get(key):
            raise ValueError(f"--resume: {key} is {now.get(key, 'not set')} here but {saved.get(key, 'not set')} in "
                             f"{path}; give the interrupted run's command, or --force to start it again")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write *state* to *path* through a temporary file: a killed job leaves the previous epoch's, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk while saving: no stray temporary file
        tmp.unlink(missing_ok=True)
        raise


def _rng_states(device: str) -> dict[str, Any]:
    """The random number generators the loop draws from besides its own *gen*: torch's (dropout).

    numpy's and `random`'s are not saved: nothing in the loop draws from them (the
    augmentations take *gen*; the data splits are drawn before it, from the seed).
    """
    cuda = torch.device(device).type == "cuda"  # dropout on the GPU draws from CUDA's generators
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None}


def _restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, ema: AveragedModel | None, gen: torch.Generator) -> None:
    """Load the weights, optimizer, schedule, EMA and random number generators of a saved epoch (`RESUME_FILE`)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if ema is not None:  # the fingerprint holds ema: saved exactly when it is on
        ema.load_state_dict(state["ema"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:  # the fingerprint holds the device type: saved exactly on cuda
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(spec: ModelSpec, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Train *spec* and write checkpoint, report and figures to ``args.out``. Returns the report."""
    out = Path(args.out or f"runs/{spec.name}")  # made when there is something to write (an epoch's state)
    _check_out(out)  # now, not after hours of training
    saved = _resume_state(out, args)
    # a model exported from it would lose its report; with a resume.pt, finish was interrupted: --resume redoes it
    if (out / "checkpoint.pt").exists() and not args.force and saved is None:
        raise ValueError(f"--out {out}: holds a trained run already (checkpoint.pt); give --force to replace it, "
                         "or another --out")
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    spec = with_size(spec, options.get("size"))  # before the data: images are decoded at that size
    recipe = {**spec.recipe, **options}
    epochs = int(args.epochs or recipe.get("epochs", DEFAULT_EPOCHS))
    bs = int(recipe.get("batch_size", 256))
    workers = int(recipe.get("workers", 0))
    t_start = time.time()
    given = ", ".join(f"{k}={options[k]}" for k in ("data", "root") if options.get(k))  # the user's own files
    print(f"[train] {spec.name}: loading data ({given or spec.dataset})", flush=True)
    data: DataBundle = load_dataset(spec, options, args.seed)
    print(f"[train] data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
          f"({time.time() - t_start:.0f} s)", flush=True)

    spec, model = _model_for(spec, data, device)
    _init_from_data(model, data.train, int(recipe.get("init_from_data", 0)), device, gen_seed=args.seed)
    # NHWC is ~1.4x faster for convolutions on CPU (oneDNN); the weights and the result are the same
    memory_format = torch.channels_last if recipe.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    lr, wd = float(recipe.get("lr", 1e-3)), float(recipe.get("weight_decay", 1e-4))
    if recipe.get("optimizer", "adamw") == "sgd":  # SGD + Nesterov: the proven CIFAR-10 ResNet recipe
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=float(recipe.get("momentum", 0.9)), nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = max(1, -(-len(data.train) // bs))
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=safe_pct_start(float(recipe.get("pct_start", 0.15)), total_steps)
    )
    # extra loss terms a model declares itself (e.g. L1 on dense weights of a Keras-style baseline)
    regularization = getattr(model, "regularization", None)
    on_device = bool(getattr(data.augment, "on_device", False))  # batched tensor augmentation after the transfer
    smoothing = float(recipe.get("label_smoothing", 0.0))
    class_weights = recipe.get("class_weights")
    if class_weights == "balanced":  # N / (K n_c) from the training split, recorded as the numbers used
        counts = torch.bincount(data.train.tensors[-1].long(), minlength=len(spec.classes)).double()
        class_weights = (counts.sum() / (len(spec.classes) * counts.clamp(min=1))).tolist()
        recipe["class_weights_balanced"] = [round(w, 6) for w in class_weights]
        print(f"[train] class_weights=balanced: {recipe['class_weights_balanced']}", flush=True)
    if class_weights and len(class_weights) != len(spec.classes):
        raise ValueError(f"--set class_weights={json.dumps(class_weights)}: {len(class_weights)} weight(s) for "
                         f"{len(spec.classes)} classes {list(spec.classes)}")
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    # an average of the weights along the trajectory generalises better than the last step on small data
    ema_decay = float(recipe.get("ema", 0.0))
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"recipe key ema must be in [0, 1), got {ema_decay}")
    ema = AveragedModel(model, multi_avg_fn=_ema_update(ema_decay), use_buffers=True) if ema_decay else None
    evaluated = ema.module if ema is not None else model
    gen = torch.Generator().manual_seed(args.seed)
    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}
    best_loss, best_state, best_epoch = float("inf"), None, -1
    recipe = {**{k: v for k, v in recipe.items() if k not in data.ignored}, "epochs": epochs}  # as the report says
    fingerprint = _fingerprint(spec, args, epochs, recipe, data)
    start, before = 0, 0.0  # epochs done and training seconds of the interrupted run
    if saved is not None:
        _check_fingerprint(saved["fingerprint"], fingerprint, out / RESUME_FILE)
        _restore(saved, model, opt, sched, ema, gen)
        history, best_loss, best_epoch, best_state = (saved[k] for k in ("history", "best_loss", "best_epoch", "best_state"))
        start, before = saved["epoch"], saved["seconds"]
        args.saved_epoch = f"{start}/{epochs}"
        print(f"[train] resuming after epoch {start}/{epochs} ({out / RESUME_FILE})", flush=True)
    for epoch in range(start, epochs):
        model.train()
        t0, tot, correct, loss_sum = time.time(), 0, 0, 0.0
        for x, y in _batches(data.train, bs, True, gen, workers):
            if data.augment is not None and not on_device:
                x, y = data.augment(x, y, gen)
            x, y = x.to(device), y.to(device)
            if data.augment is not None and on_device:
                x, y = data.augment(x, y, gen)
            x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
            if regularization is not None:
                loss = loss + regularization()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            tot += len(y)
        vlogits, vy = predict_logits(evaluated, data.val, bs * 2, device, workers)
        vloss = float(F.cross_entropy(torch.from_numpy(vlogits), torch.from_numpy(vy)))
        vacc = float((vlogits.argmax(1) == vy).mean())
        history["train_loss"].append(loss_sum / tot)
        history["train_accuracy"].append(correct / tot)
        history["val_loss"].append(vloss)
        history["val_accuracy"].append(vacc)
        history["lr"].append(float(sched.get_last_lr()[0]))
        if vloss < best_loss:
            best_loss, best_epoch = vloss, epoch
            best_state = {k: v.detach().clone().cpu() for k, v in evaluated.state_dict().items()}
        # saved before the epoch's line: a Ctrl-C seen after the line never loses the epoch
        _save_state(out / RESUME_FILE, {
            "epoch": epoch + 1, "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "generator": gen.get_state(), **_rng_states(device), "history": history, "best_loss": best_loss,
            "best_epoch": best_epoch, "best_state": best_state, "seconds": before + time.time() - t_start})
        args.saved_epoch = f"{epoch + 1}/{epochs}"
        print(f"[train] epoch {epoch + 1}/{epochs} loss {loss_sum / tot:.4f} acc {correct / tot:.4f} "
              f"val_loss {vloss:.4f} val_acc {vacc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    assert best_state is not None
    model.load_state_dict(best_state)
    run = {"history": history, "best_epoch": best_epoch + 1, "command": reproduce_command(_argv(args)),
           "recipe": recipe, "device": device if device == "cpu" else
           f"{device} ({torch.cuda.get_device_name(0)})", "train_seconds": before + time.time() - t_start,
           "threads": torch.get_num_threads()}
    report = finish(spec, model, data, run, out, args, options)
    (out / RESUME_FILE).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return report


def finish(spec: ModelSpec, model: nn.Module, data: DataBundle, run: dict[str, Any], out: Path,
           args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the trained *model* and write its weights (checkpoint), report.json and figures to *out*.

    *run* holds what the training loop knew: ``history``, ``best_epoch``, ``command``,
    ``recipe``, ``device`` and ``train_seconds``. Calibration, operating points and every
    metric are computed here, with the model as registered (its eval-mode graph).
    """
    t_start = time.time()
    device, recipe, history = args.device, run["recipe"], run["history"]
    bs, workers = int(recipe.get("batch_size", 256)), int(recipe.get("workers", 0))
    vlogits, vy = predict_logits(model, data.val, bs * 2, device, workers)
    temperature = fit_temperature(vlogits, vy)
    vproba = _softmax(vlogits, temperature)
    threshold = 0.5
    operating_points: dict[str, Any] = {}
    if spec.positive_class is not None and len(spec.classes) == 2:
        pos = spec.classes.index(spec.positive_class)
        is_pos = vy == pos
        for name, fpr in (("fpr_1pct", 0.01), ("fpr_0.1pct", 0.001)):
            thr = M.threshold_at_fpr(is_pos, vproba[:, pos], fpr)
            operating_points[name] = {
                "threshold": thr,
                "val_fpr": float(((vproba[:, pos] >= thr) & ~is_pos).sum() / max((~is_pos).sum(), 1)),
                "val_tpr": float(((vproba[:, pos] >= thr) & is_pos).sum() / max(is_pos.sum(), 1)),
            }
    val_m, _, _ = evaluate_split(model, data.val, spec, temperature, threshold, bs * 2, device, workers)
    test_m, tproba, ty = evaluate_split(model, data.test, spec, temperature, threshold, bs * 2, device, workers)
    extra = {}
    for name, ds in data.extra_tests.items():
        extra[name], _, _ = evaluate_split(model, ds, spec, temperature, threshold, bs * 2, device, workers)
    uncal = M.expected_calibration_error(vy, _softmax(vlogits, 1.0))

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    args.writing = True  # from here on an interrupt may leave a partial run in *out*
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "temperature": torch.tensor(temperature)}, out / "checkpoint.pt")
    report: dict[str, Any] = {
        "model": spec.name,
        "version": spec.version,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "command": run["command"],
        "options": options,
        **({"recipe_ignored": sorted(data.ignored)} if data.ignored else {}),
        "recipe": recipe,
        "device": run["device"],
        # CPU kernels split their sums by thread: another thread count gives other weights
        **({"threads": run["threads"]} if "threads" in run else {}),
        "best_epoch": run["best_epoch"],
        "history": history,
        "temperature": temperature,
        "calibration": {"method": "temperature scaling on the validation split", "temperature": temperature,
                        "ece_val_before": uncal, "ece_val_after": val_m["ece"], "ece_test": test_m["ece"]},
        "threshold": threshold,
        "operating_points": operating_points,
        "metrics": {"val": val_m, "test": test_m, **extra},
        "data": data.provenance,
        "train_seconds": run["train_seconds"] + (time.time() - t_start if "evaluated_from" not in run else 0.0),
        **({"evaluated_from": run["evaluated_from"]} if "evaluated_from" in run else {}),
        # the training date (a re-evaluation keeps the weights', and says when in evaluated_from)
        "date": run.get("date") or _utc_now(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    # the code that trained the weights: a re-evaluation keeps the run's (none for a run from before it was kept)
    code = run["code"] if "code" in run else code_state()
    if code:
        report["code"] = code
    report["figures"] = write_figures(out, spec, history, test_m, tproba, ty)
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2, sort_keys=True, allow_nan=False, default=float))
    print("[train] test: " + ", ".join(f"{k} {test_m[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1", "roc_auc")), flush=True)
    note = one_class_note(spec.classes, tproba, ty)
    if note:
        print(f"[train] note: {note}", flush=True)
    print(f"[train] wrote {out}/checkpoint.pt, report.json and figures", flush=True)
    return report


def evaluate_only(spec: ModelSpec, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Re-run :func:`finish` on ``<out>/checkpoint.pt`` with the registered model as it is now.

    For a change that touches only the eval-mode graph (test-time augmentation): the
    weights, history and training command of the earlier run (its ``report.json``) are kept.
    """
    out = Path(args.out or f"runs/{spec.name}")
    if not (out / "report.json").is_file() or not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--evaluate-only: {out} holds no trained run (report.json and checkpoint.pt); "
                         "give the run's --out")
    old = json.loads((out / "report.json").read_text())
    retrain = [k for k in TRAIN_KEYS if k in options and k != "workers"] + (["epochs"] if args.epochs is not None else [])
    if retrain:  # the weights are the run's: a training option would be recorded, not applied
        raise ValueError(f"--evaluate-only: {', '.join(dict.fromkeys(retrain))} change(s) training, not evaluation; "
                         "the weights are the run's (train a new run to change them)")
    seed_everything(old["seed"])
    args.seed = old["seed"]
    if "size" in options and options["size"] != old.get("options", {}).get("size"):
        # the weights were trained at the run's size: evaluating (and exporting) them at another
        # would ship a card that describes other images than the model saw
        raise ValueError(f"--evaluate-only: --set size={options['size']} differs from the run's "
                         f"({old.get('options', {}).get('size', 'the default')}); train a new run for another size")
    options = {**old.get("options", {}), **options}
    spec = with_size(spec, options.get("size"))
    data = load_dataset(spec, options, args.seed)
    before, now = _split_digests(old.get("data", {})), _split_digests(data.provenance)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        # other splits (files added or removed redraw them; another --set data= replaces them): the
        # test figures would no longer be held out from the weights, nor the card's data true
        raise ValueError(f"--evaluate-only: the {', '.join(changed)} split(s) differ from the run's (sha256 of "
                         "the data); re-evaluating would report figures on data the weights may have been "
                         "trained on; train a new run, or score other data with stampclf classify --evaluate")
    spec, model = _model_for(spec, data, args.device)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    run = {k: old[k] for k in ("history", "best_epoch", "command", "recipe", "device", "train_seconds")}
    run["date"] = old["date"]
    run["code"] = old.get("code", {})
    run["evaluated_from"] = (f"weights of the run of {old['date']} ({old['command']}), re-evaluated "
                             f"{_utc_now()} with "
                             f"{reproduce_command(_argv(args))}; history figures are from that run")
    return finish(spec, model, data, run, out, args, options)


def one_class_note(classes: list[str] | tuple[str, ...], proba: np.ndarray, y: np.ndarray) -> str | None:
    """A note when the model gives one class to every row of a split that holds several.

    On imbalanced data the accuracy alone hides it (95 % bogus: accuracy 0.95, recall 0).
    """
    predicted = np.unique(proba.argmax(axis=1)) if len(proba) else np.empty(0, int)
    if len(predicted) != 1 or len(np.unique(y)) < 2:
        return None
    counts = np.bincount(y, minlength=len(classes)).tolist()
    return (f"the model calls every test row {classes[int(predicted[0])]!r} (test class counts {counts}): more "
            f"epochs, or --set class_weights=balanced (or one weight per class: {list(classes)})")


def write_figures(out: Path, spec: ModelSpec, history: dict[str, list[float]], test_m: dict[str, Any],
                  proba: np.ndarray, y: np.ndarray) -> list[str]:
    """Learning curves, confusion matrix and ROC curve(s) as PNG; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names: list[str] = []
    ep = np.arange(1, len(history["train_loss"]) + 1)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, history["train_loss"], label="train")
    ax[0].plot(ep, history["val_loss"], label="validation")
    ax[0].set(xlabel="epoch", ylabel="cross-entropy", title=f"{spec.name}: loss")
    ax[1].plot(ep, history["train_accuracy"], label="train")
    ax[1].plot(ep, history["val_accuracy"], label="validation")
    ax[1].set(xlabel="epoch", ylabel="accuracy", title=f"{spec.name}: accuracy")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=90)
    plt.close(fig)
    names.append("learning_curves.png")

    cm = np.asarray(test_m["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(spec.classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.55 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), spec.classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), spec.classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{spec.name}: test confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=90)
    plt.close(fig)
    names.append("confusion_matrix.png")

    fig, ax = plt.subplots(figsize=(4.5, 4))
    targets = [spec.classes.index(spec.positive_class)] if spec.positive_class else range(k)
    for i in targets:
        if (y == i).any() and (y != i).any():
            fpr, tpr, _ = M.roc_curve(y == i, proba[:, i])
            ax.plot(fpr, tpr, label=f"{spec.classes[i]} (AUC {M.roc_auc(y == i, proba[:, i]):.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    if spec.positive_class:
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{spec.name}: test ROC")
    if ax.get_legend_handles_labels()[0]:  # no curve when the test split lacks a class
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)
    names.append("roc.png")
    return names


class OptionError(ValueError):
    """A ``--set`` option that is malformed, unknown to the model or of the wrong kind."""


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON where possible (numbers, lists), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise OptionError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_state(root: Path = Path(__file__).resolve().parent.parent) -> dict[str, Any]:
    """The git commit of the training code and whether tracked files differ from it ({} outside a checkout).

    With the command, seed and data sha256 in the card, this is what it takes to train
    the same weights again.
    """
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        return {}
    def ask(*args: str) -> str:  # fixed arguments, git from PATH: nothing from input
        return subprocess.run([git, *args], cwd=root, capture_output=True, text=True, check=True, timeout=30).stdout  # noqa: S603

    try:
        commit, changed = ask("rev-parse", "HEAD"), ask("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit.strip(), "uncommitted_changes": bool(changed.strip())}


def _model_for(spec: ModelSpec, data: DataBundle, device: str) -> tuple[ModelSpec, nn.Module]:
    """*spec* with its classes (image-folder: the folder names the data found) and a fresh model for it."""
    spec = with_classes(spec, data.provenance.get("classes"))
    return spec, create_model(spec.name, len(spec.classes)).to(device)


def json_safe(value: Any) -> Any:
    """*value* for strict JSON: NaN and infinities (an undefined ROC AUC) become null, numpy scalars numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    return value


def _check_out(out: Path) -> None:
    """Refuse a run folder that could not be written at the end: a file, or no write permission."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent if parent.is_dir() else parent.parent, os.W_OK):
        raise ValueError(f"--out {out}: no permission to write in {parent}")


def _positive(text: str) -> int:
    """An integer of at least 1, for argparse (``--epochs 0`` would fall back to the recipe's)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"registered model: {', '.join(list_models())}")
    p.add_argument("--epochs", type=_positive, default=None, help="override the recipe's epochs (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe or data option, e.g. --set epochs=20 (an unknown key lists the model's keys)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--force", action="store_true", help="replace the run in --out (it holds a checkpoint.pt)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="do not train: re-evaluate <out>/checkpoint.pt with the model as registered now "
                        "(after a change to its test-time augmentation) and rewrite report and figures")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the interrupted run in --out from its {RESUME_FILE} (written after every epoch); "
                        "give the run's command: it ends with the weights of an uninterrupted run")
    return p


#: ``--set`` keys that change only where scratch files go or how fast things run, never the result
NO_EFFECT_KEYS = ("cache", "decode_threads")
#: recipe keys the training loop reads (valid ``--set`` keys for every model; see the module docstring)
TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "pct_start", "label_smoothing",
              "class_weights", "channels_last", "init_from_data", "ema", "workers")
#: ``--set`` keys whose value must be a positive integer / a number
POSITIVE_INT_KEYS = ("epochs", "batch_size", "n_train", "n_val", "n_test", "decode_threads")
#: ... at least 0 (0: off, no limit, or automatic)
COUNT_KEYS = ("limit", "sim_workers", "init_from_data", "workers")
NUMBER_KEYS = ("lr", "momentum", "weight_decay", "pct_start", "label_smoothing", "ema", "snr_derived",
               "val_fraction", "test_fraction")
#: epochs of a recipe that names none
DEFAULT_EPOCHS = 10
#: the ``optimizer`` values the training loop knows (``sgd``: with Nesterov momentum)
OPTIMIZERS = ("adamw", "sgd")


def valid_keys(spec: ModelSpec) -> dict[str, list[str]]:
    """The ``--set`` keys *spec* accepts, by kind: ``recipe`` (training loop and registry recipe),
    ``data`` (its loader's options, `train.data.dataset_options`) and ``speed only`` (`NO_EFFECT_KEYS`:
    they change how fast, not what is trained)."""
    data = set(dataset_options(spec.dataset)) - set(NO_EFFECT_KEYS)
    recipe = {*TRAIN_KEYS, *spec.recipe} - data - set(NO_EFFECT_KEYS)
    return {"recipe": sorted(recipe), "data": sorted(data), "speed only": sorted(NO_EFFECT_KEYS)}


def check_options(spec: ModelSpec, options: dict[str, Any]) -> None:
    """Refuse a ``--set`` key that neither the training loop nor the data loader of *spec* reads.

    Raises
    ------
    OptionError
        One line naming the key (and a close match, if any) and listing the valid keys,
        or the value and what the key takes.
    """
    groups = valid_keys(spec)
    known = {k for keys in groups.values() for k in keys}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listing = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in groups.items() if keys)
            raise OptionError(f"unknown --set key {key!r} for model {spec.name}{hint}; valid keys: {listing}")
    if "size" in options:
        try:
            if options["size"] is None:  # e.g. size=$UNSET: not a reason to train at the default
                raise ValueError("--set size=null: expected a whole number of pixels from {} to {}".format(*SIZE_RANGE))
            with_size(spec, options["size"])
        except ValueError as exc:
            raise OptionError(str(exc)) from None
    for key, value in options.items():  # a bad value fails now, named, not deep in the loop
        shown = value if isinstance(value, str) else json.dumps(value)  # as typed
        least = 1 if key in POSITIVE_INT_KEYS else 0 if key in COUNT_KEYS else None
        if least is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise OptionError(f"--set {key}={shown}: expected an integer of at least {least}")
        if key in NUMBER_KEYS and (not isinstance(value, (int, float)) or (isinstance(value, bool) and key != "ema")):
            raise OptionError(f"--set {key}={shown}: expected a number")
        if key == "snr_derived" and not 0 <= value <= 1:  # a probability per stamp
            raise OptionError(f"--set snr_derived={shown}: expected a probability from 0 to 1")
        if key == "optimizer" and value not in OPTIMIZERS:  # another name trained AdamW under that name
            raise OptionError(f"--set optimizer={shown}: expected one of {', '.join(OPTIMIZERS)}")
        if key == "class_weights" and value not in (None, "balanced") and not (
            isinstance(value, list) and value
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in value)
        ):
            raise OptionError(f"--set class_weights={shown}: expected a list of positive numbers, one per class "
                              "(e.g. class_weights=[1,19]), or balanced")


def check_device(device: str) -> None:
    """Refuse a ``--device`` torch cannot use here, before any data is read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: this torch has no usable CUDA (torch {torch.__version__}); "
                          "use --device cpu") from None


def _absolute(paths: str) -> str:
    """A ``--set data=``/``root=`` value (comma-separated paths) with every path made absolute."""
    return ",".join(os.path.abspath(p.strip()) if p.strip() else p for p in paths.split(","))


def _argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments of this run (those given to `main`, else ``sys.argv``)."""
    argv = getattr(args, "argv", None)
    return list(sys.argv[1:] if argv is None else argv)


def reproduce_command(argv: list[str]) -> str:
    """The training command for the card, without the options that cannot change the result.

    ``--out`` (the export step reads the default ``runs/<model>``), ``--force``, ``--resume`` and the
    ``--set`` keys in ``NO_EFFECT_KEYS`` (a scratch cache path means nothing on another
    machine) are left out; the files of ``--set data=``/``root=`` are made absolute (the
    command then works from the repository root, where it starts); everything else is kept
    in order.
    """
    keep: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if flag == "--out":
            i += 1 if eq else 2
            continue
        if a in ("--debug", "--force", "--resume"):
            i += 1
            continue
        if flag == "--set":
            kv = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            key, _, paths = kv.partition("=")
            if key in NO_EFFECT_KEYS:
                i += 1 if eq else 2
                continue
            if key in ("data", "root") and paths:  # the files again from any folder, as the report's data section
                kv = f"{key}={_absolute(paths)}"
                keep += [f"--set={kv}"] if eq else ["--set", kv]
                i += 1 if eq else 2
                continue
        keep.append(a)
        i += 1
    return "python train/train.py " + " ".join(shlex.quote(a) for a in keep)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = get_spec(args.model)
    except KeyError as exc:
        print(f"train: error: {exc.args[0]}", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the report's command
    try:  # before any data is read or output written; the usage errors' exit code
        options = parse_options(args.options)
        for key in ("data", "root"):  # the report must find the files again from any folder (--evaluate-only)
            if key in options and (not isinstance(options[key], str) or not options[key].strip()):
                # e.g. --set data=$UNSET or data=null: not a reason to train on the default data
                raise OptionError(f"--set {key}= names no file or folder ({options[key]!r})")
            if isinstance(options.get(key), str):
                options[key] = _absolute(options[key])
        check_options(spec, options)
        check_device(args.device)
        for other in ("force", "evaluate_only"):
            if args.resume and getattr(args, other):  # continue a run, or replace / re-evaluate one
                flag = "--" + other.replace("_", "-")
                raise OptionError(f"--resume and {flag}: --resume continues the unfinished run in --out; give one")
    except OptionError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    try:
        (evaluate_only if args.evaluate_only else train)(spec, args, options)
    except KeyboardInterrupt:
        if args.debug:
            raise
        out = args.out or f"runs/{spec.name}"
        # the run folder is written only after an epoch (its state) and at the end: until then it is as it was
        if getattr(args, "saved_epoch", None):
            state = f"holds epoch {args.saved_epoch} in {RESUME_FILE}: continue with --resume"
        else:
            state = "its contents may be partial: train again" if getattr(args, "writing", False) else "unchanged"
        print(f"train: interrupted; {out} {state}", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as exc:  # bad options or data: one line
        if args.debug:
            raise
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        kind = "" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: "  # a KeyError may be a bug
        print(f"train: error: {kind}{text.splitlines()[0] if text else type(exc).__name__} "
              "(--debug for a traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
