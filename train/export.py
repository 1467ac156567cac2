"""Export a trained model to ONNX with its model card, and check the export.

Usage
-----
    python train/export.py --model hits [--checkpoint runs/hits/checkpoint.pt] [--out exported] [--force]
    python -m train.export --model hits --out /tmp/exported [--version 1.1.0+local.mytest]

Writes ``<out>/<model>.onnx`` (dynamic batch axis, softmax with the fitted
temperature inside the graph, card in ``metadata_props``) and copies the
training figures to ``<out>/<model>/``. Runs ``onnx.checker`` (full check) and
compares ONNX Runtime with PyTorch at batch sizes 1, 7 and the card's default batch (at most
256: a large input's check stays in memory); fails if the
largest absolute difference in probabilities exceeds 1e-5.

The card's version is the registry's (``ModelSpec.version``) only for a run of the
registered recipe: same recipe and data options (``--set`` keys in `SAME_MODEL_KEYS`
aside), default epochs, seed 0. Any other run gets a PEP 440 local version such as
``1.1.0+local.20261123.1a2b3c4d`` (the training date and the weights' sha256 prefix) and a notice; ``--version`` sets it
explicitly. Into the repository's own ``exported/`` (the default ``--out``) an
existing model file is overwritten only with ``--force``: a quick retrain never
silently replaces a shipped model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `train` and `stampclf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train import require_training_extra

    require_training_extra("export.py")

import numpy as np
import torch
import torch.nn as nn

import stampclf
from stampclf._card import CARD_KEY, ModelCard, graph_sha256, read_card, read_onnx_parts
from train.registry import ModelSpec, create_model, get_spec, list_models, with_classes, with_size
from train.train import DEFAULT_EPOCHS, NO_EFFECT_KEYS, json_safe, load_weights, reproduce_command

__all__ = ["export", "main", "Deployable", "TOLERANCE", "EXPORTED", "card_version", "recipe_differences"]

#: The repository's shipped models (the default ``--out``); existing files here need ``--force``.
EXPORTED = Path(__file__).resolve().parent.parent / "exported"
#: ``--set`` keys that leave the trained model what the registry describes: scratch and speed
#: (`NO_EFFECT_KEYS`), simulation processes (the data do not depend on them), the extra
#: ``real_sn`` test split (evaluation only), and where the image data are read from
SAME_MODEL_KEYS = (*NO_EFFECT_KEYS, "sim_workers", "real_sn", "root", "archive")
#: a model name: also its file name (``<name>.onnx``) and what ``stampclf classify --model`` takes
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: PEP 440 versions the card accepts from ``--version`` (release, pre/post/dev, local part)
VERSION_RE = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+([._-][a-z0-9]+)*)?", re.I)

#: Largest accepted |p_onnx - p_torch|.
TOLERANCE = 1e-5
#: ONNX Runtime 1.20+ reads IR version 10; newer `onnx` writes newer IR by default.
IR_VERSION = 10


class Deployable(nn.Module):
    """The trained network plus calibration: logits / T -> softmax probabilities."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x) * self.inv_t, dim=1)


def load_trained(spec: ModelSpec, checkpoint: Path) -> Deployable:
    """Build the registered model and load a checkpoint written by ``train.py``."""
    state = load_weights(checkpoint)
    if not isinstance(state, dict) or "state_dict" not in state:
        hint = ": an unfinished run's state; finish it with train.py --resume" if isinstance(state, dict) and "fingerprint" in state else ""
        raise ValueError(f"{checkpoint}: not a checkpoint written by train.py{hint}")
    net = create_model(spec.name, len(spec.classes))
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:  # torch lists every mismatched tensor: one line is enough here
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ValueError(f"{checkpoint}: these weights do not fit model {spec.name!r} (a checkpoint of "
                         f"another model? {first[:160]})") from None
    model = Deployable(net, float(state.get("temperature", torch.tensor(1.0))))
    return model.eval()


def _export(model: nn.Module, example: torch.Tensor, input_name: str) -> Any:
    return torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[input_name],
        output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        optimize=True,
        verbose=False,
    )


def to_onnx_bytes(model: nn.Module, shape: tuple[int, int, int], input_name: str) -> bytes:
    """Export with the torch.export-based exporter, batch axis dynamic; no card yet."""
    import onnx

    example = torch.zeros((2, *shape), dtype=torch.float32)
    # "torchvision is not installed. Skipping torchvision::nms" x4: no model here uses those ops
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own deprecation chatter, not actionable here
        program = _export(model, example, input_name)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def canonical_command(command: str) -> str:
    """The training command without options that cannot change the result (see ``reproduce_command``).

    Reports written before those options were dropped at training time still carry them.
    """
    argv = shlex.split(command)
    if argv[:2] != ["python", "train/train.py"]:
        return command
    return reproduce_command(argv[2:])


def canonical_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without the scratch options (cache path, decode threads) that cannot change the result."""
    return {k: v for k, v in recipe.items() if k not in NO_EFFECT_KEYS}


def shipped_report(report: dict[str, Any]) -> dict[str, Any]:
    """The training report as shipped beside the model: command, recipe and options without scratch paths."""
    return {**report, "command": canonical_command(report["command"]),
            "recipe": canonical_recipe(report.get("recipe", {})),
            "options": canonical_recipe(report.get("options", {}))}


def _plain(value: Any) -> Any:
    """*value* as JSON gives it back (tuples -> lists), to compare a recipe with a report's."""
    return json.loads(json.dumps(value, sort_keys=True, default=float))


def recipe_differences(spec: ModelSpec, report: dict[str, Any]) -> list[str]:
    """What makes the run of *report* other than the registered recipe of *spec* (empty: none).

    Compares the run's recipe (registry recipe, ``--set`` options and epochs, as train.py
    records it) with the registry's, ignoring `SAME_MODEL_KEYS`; also the seed (0).
    """
    # the root of the shared data sets is where they were unpacked; your own images' root is the data
    same = tuple(k for k in SAME_MODEL_KEYS if not (k == "root" and spec.dataset == "image_folder"))

    def relevant(recipe: dict[str, Any]) -> dict[str, Any]:
        return _plain({k: v for k, v in recipe.items() if k not in same})

    ignored = set(report.get("recipe_ignored", ()))  # registry keys the run's data had no use for
    registered = {k: v for k, v in relevant({**spec.recipe, "epochs": spec.recipe.get("epochs", DEFAULT_EPOCHS)}).items()
                  if k not in ignored}
    used = relevant(report.get("recipe", {}))
    missing = object()
    diffs = [k for k in sorted({*registered, *used}) if registered.get(k, missing) != used.get(k, missing)]
    if report.get("seed", 0) != 0:
        diffs.append("seed")
    return diffs


def card_version(
    spec: ModelSpec, report: dict[str, Any], version: str | None = None, weights_sha: str = ""
) -> tuple[str, str | None]:
    """The card's version and a one-line notice (None when there is nothing to say).

    *version* (``--version``) wins; else the registry's version for a run of the registered
    recipe, and the registry's version plus a PEP 440 local part ``+local.<training date>``
    for any other run.
    """
    if version is not None:
        if not VERSION_RE.fullmatch(version):
            raise ValueError(f"--version {version!r} is not a PEP 440 version such as 1.1.0 or 1.1.0+local.test")
        return version, None
    diffs = recipe_differences(spec, report)
    if not diffs:
        return spec.version, None
    date = re.sub(r"\D", "", str(report.get("date", "")))[:8]
    if len(date) != 8:
        date = datetime.now(timezone.utc).strftime("%Y%m%d")
    # the weights' sha256 prefix tells two retrains of one day apart on every output row
    local = f"{spec.version}{'.' if '+' in spec.version else '+'}local.{date}" + (f".{weights_sha[:8]}" if weights_sha else "")
    return local, (f"[export] note: not the registered {spec.name} {spec.version} recipe (differs in: "
                   f"{', '.join(diffs)}): card version {local}; give --version VERSION to choose another")


def build_card(spec: ModelSpec, report: dict[str, Any], weights_sha: str, version: str | None = None,
               name: str | None = None) -> ModelCard:
    """The model card from the registry spec and the training report (as :func:`shipped_report` leaves it).

    *version*: the card's version (default: the registry's, see :func:`card_version`).
    *name*: the card's model name (default: the registry's); the registered model it was
    built as is then kept as ``training.architecture``.
    """
    name = name or spec.name
    import onnx

    versions = {
        **report.get("versions", {}),
        "torch_export": torch.__version__,
        "onnx": onnx.__version__,
        "stampclf": stampclf.__version__,
        "python_export": platform.python_version(),
    }
    test = report["metrics"]["test"]
    return ModelCard(
        name=name,
        version=version or spec.version,
        task=spec.task,
        description=spec.description,
        input=dict(spec.input),
        preprocessing=dict(spec.preprocessing),
        classes=list(spec.classes),
        positive_class=spec.positive_class,
        threshold=float(report.get("threshold", 0.5)),
        operating_points=report.get("operating_points", {}),
        calibration=report.get("calibration", {}),
        training={
            "command": report["command"],
            "seed": report["seed"],
            "device": report.get("device", "cpu"),
            **({"threads": report["threads"]} if "threads" in report else {}),
            "recipe": report.get("recipe", {}),
            "best_epoch": report.get("best_epoch"),
            "train_seconds": round(float(report.get("train_seconds", 0.0)), 1),
            "data": report["data"],
            "parameters": report.get("parameters"),
            **({"code": report["code"]} if report.get("code") else {}),
            **({"architecture": spec.name} if name != spec.name else {}),
            **({"evaluated_from": report["evaluated_from"]} if "evaluated_from" in report else {}),
        },
        metrics={k: _strip(v) for k, v in report["metrics"].items()},
        report={
            "history": report.get("history", {}),
            "figures": [f"{name}/{f}" for f in report.get("figures", [])],
            "test_confusion_matrix": test.get("confusion_matrix"),
        },
        versions=versions,
        date=report.get("date", ""),
        weights_sha256=weights_sha,
    )


def _strip(m: Any) -> Any:
    """Metrics for the card: no confusion matrix (kept once under ``report``), NaN -> null.

    A single-class extra test set (e.g. real supernovae only) has an undefined ROC AUC;
    strict JSON has no NaN, so it is stored as null.
    """
    if isinstance(m, dict):
        return {k: _strip(v) for k, v in m.items() if k != "confusion_matrix"}
    if isinstance(m, list):
        return [_strip(v) for v in m]
    return json_safe(m)


def attach_card(model_bytes: bytes, card: ModelCard) -> bytes:
    """Store the card under `CARD_KEY` in ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
    proto.producer_name = "stampclf"
    proto.producer_version = stampclf.__version__
    major = re.match(r"\d+", card.version)
    proto.model_version = int(major.group()) if major else 0
    proto.doc_string = card.description
    return proto.SerializeToString()


def parity(model: nn.Module, path: Path, shape: tuple[int, int, int], seed: int = 0, big: int = 256) -> float:
    """Largest |p_onnx - p_torch| over batches of 1, 7 and *big* random inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in (1, 7, big):
        x = rng.normal(0.0, 1.5, size=(n, *shape)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(None, {name: x})[0]
        diff = float(np.abs(ref - got).max())
        print(f"[export] batch {n:>3}: max |p_onnx - p_torch| = {diff:.2e}")
        worst = max(worst, diff)
    return worst


#: one batch's largest intermediate tensor may take this much memory at the default batch size
ACTIVATION_BUDGET = 256 * 2**20


def largest_activation_per_row(model_bytes: bytes) -> int:
    """Bytes of the graph's largest float32 tensor per input row (test-time views included).

    Shape inference with the batch dimension fixed to 1, so that the views a graph
    concatenates along the batch axis are counted.
    """
    import onnx

    m = onnx.load_from_string(model_bytes)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m = onnx.shape_inference.infer_shapes(m)
    weights = {t.name for t in m.graph.initializer}  # the exporter lists them among the shapes too
    largest = 0
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if v.name not in weights and dims and all(d.HasField("dim_value") for d in dims):
            largest = max(largest, int(np.prod([d.dim_value for d in dims])) * 4)
    return largest


def default_batch_size(per_row: int, budget: int = ACTIVATION_BUDGET) -> int:
    """The card's default batch: the largest power of two in 8..1024 whose largest tensor fits *budget*."""
    n = 1024
    while n > 8 and n * per_row > budget:
        n //= 2
    return n


def _is_exported(folder: Path) -> bool:
    """*folder* is the repository's `EXPORTED` folder (the shipped models)."""
    return folder.resolve() == EXPORTED.resolve()


def export(spec: ModelSpec, checkpoint: Path, out_dir: Path, report_path: Path | None = None,
           version: str | None = None, force: bool = False, name: str | None = None) -> Path:
    """Export *spec* from *checkpoint*; returns the ONNX path. Raises on a failed check.

    *version*: the card's version (default: :func:`card_version`); *name*: the card's model
    name and file name (default: the registry's). Raises `FileExistsError` where *out_dir*
    is the repository's `EXPORTED` folder and the model file exists, unless *force*.
    """
    name = spec.name if name is None else name  # "" is refused below, not taken for the default
    if not NAME_RE.fullmatch(name) or name.lower().endswith(".onnx"):
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    final = out_dir / f"{name}.onnx"
    if not force and final.exists() and _is_exported(out_dir):
        raise FileExistsError(f"{final} exists in the repository's exported/ (the shipped models' folder): "
                              "give --force to overwrite it, or --out another folder")
    report_path = report_path or checkpoint.parent / "report.json"
    raw_report = json.loads(report_path.read_text())
    if raw_report.get("model", spec.name) != spec.name:
        raise ValueError(f"{report_path}: the run of model {raw_report['model']!r}, not {spec.name!r}; "
                         f"give --model {raw_report['model']} or that model's checkpoint")
    spec = with_classes(spec, raw_report.get("data", {}).get("classes"))  # image-folder: from the run
    spec = with_size(spec, raw_report.get("options", {}).get("size"))  # --set size=N: from the run
    report = shipped_report(raw_report)
    model = load_trained(spec, checkpoint)
    shape = (len(spec.input["channels"]), int(spec.input["height"]), int(spec.input["width"]))
    raw = to_onnx_bytes(model, shape, "stamps" if spec.input.get("kind", "stamp") == "stamp" else "images")
    graph, _ = read_onnx_parts(raw)
    weights_sha = graph_sha256(graph)
    version, notice = card_version(spec, report, version, weights_sha)
    if notice:
        print(notice, flush=True)
    report["version"] = version  # the copy beside the model says what its card says
    card = build_card(spec, report, weights_sha, version, name)
    per_row = largest_activation_per_row(raw)
    card.input["largest_activation_bytes_per_row"] = per_row
    card.input["default_batch_size"] = default_batch_size(per_row)
    data = attach_card(raw, card)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".onnx", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        read_card(tmp, verify=True)  # the runtime's own reader accepts it
        worst = parity(model, Path(tmp), shape, big=min(256, card.input["default_batch_size"]))
        if not worst <= TOLERANCE:
            raise RuntimeError(f"ONNX/PyTorch mismatch {worst:.2e} > {TOLERANCE:.0e}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"[export] largest absolute difference in probabilities: {worst:.2e} (tolerance {TOLERANCE:.0e})")
    figs = out_dir / name
    figs.mkdir(exist_ok=True)
    for f in report.get("figures", []):
        shutil.copy2(checkpoint.parent / f, figs / f)
    (figs / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"[export] wrote {final} ({final.stat().st_size / 1e6:.2f} MB), figures in {figs}/")
    return final


def _model_of_run(checkpoint: Path | None, report: Path | None) -> str | None:
    """The registered model a training run's report names (None: no such report)."""
    if checkpoint is None:
        return None
    path = report or checkpoint.parent / "report.json"
    try:
        model = json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a trained model to ONNX with its model card.")
    p.add_argument("--model", default=None,
                   help=f"registered model: {', '.join(list_models())} (default: the one the checkpoint's "
                        "report.json names)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default runs/<model>/checkpoint.pt")
    p.add_argument("--name", default=None,
                   help="model name in the card, on every output row and of the file (default: the registered "
                        "model's); e.g. hits-mysurvey for a retrain on your own data")
    p.add_argument("--report", type=Path, default=None, help="default: report.json next to the checkpoint")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the repository's exported/, where an existing model needs --force)")
    p.add_argument("--version", default=None,
                   help="card version (default: the registry's for a run of the registered recipe, "
                        "else the registry's plus +local.<training date>.<first 8 hex digits of the weights' sha256>)")
    p.add_argument("--force", action="store_true", help="overwrite a model in the repository's exported/")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        print(f"export: error: --checkpoint {args.checkpoint}: no such file; train first: python train/train.py "
              f"--model {args.model or 'NAME'}", file=sys.stderr)
        return 2
    if args.model is None:
        args.model = _model_of_run(args.checkpoint, args.report)
        if args.model is None:
            print("export: error: give --model NAME, or --checkpoint of a run whose report.json names its model",
                  file=sys.stderr)
            return 2
    try:
        spec = get_spec(args.model)
    except KeyError as exc:
        print(f"export: error: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.version is not None and not VERSION_RE.fullmatch(args.version):
        print(f"export: error: --version {args.version!r} is not a PEP 440 version such as 1.1.0 or "
              "1.1.0+local.test", file=sys.stderr)
        return 2
    ckpt = args.checkpoint or Path("runs") / spec.name / "checkpoint.pt"
    if not ckpt.is_file():
        print(f"export: error: checkpoint {ckpt} not found; train first: python train/train.py --model {spec.name}",
              file=sys.stderr)
        return 2
    try:
        export(spec, ckpt, args.out or EXPORTED, args.report, args.version, args.force, args.name)
    except (FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
