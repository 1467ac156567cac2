"""Evaluate exported HiTS real/bogus models through the runtime (`stampclf.Classifier`).

Usage
-----
    python train/evaluate_hits.py --model exported/hits.onnx [--model other.onnx ...]
        [--n 100000] [--seed 999] [--real-sn PATH|none] [--decam DIR|none] [--json OUT.json]

For each ONNX model (its card gives threshold, preprocessing and channel order):

- a fresh, balanced simulated test set of ``--n`` stamps from split seed ``--seed``
  (999: no training seed produces it, see `train.data.hits`), raw pixels through
  ``Classifier.classify``: accuracy, precision, recall, F1, ROC AUC, ECE at the card's
  threshold, the 1 % and 0.1 % FPR operating points, and recall per simulated kind.
  Rows the runtime refuses (more than half the pixels masked; all are bogus) count as
  rejected, i.e. predicted bogus; their number is reported;
- the 87 real HiTS supernovae (`train.data.hits_real`): recall at the card's threshold;
- the trigger stamps of DECam alert packets (``*.avro``): p(real) next to the
  packet's own ``rb`` score (no labels).

Prints one block per model and writes everything to ``--json``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `train` and `stampclf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from stampclf import Classifier
from stampclf import metrics as M

__all__ = ["evaluate", "main", "decam_triggers", "EVAL_SPLIT_SEED"]

#: Split seed of the evaluation set: training seed s uses split seeds 1000 s + {1, 2, 3}.
EVAL_SPLIT_SEED = 999
DECAM_DEFAULT = Path("..") / "shared" / "data" / "alerts" / "decam"
_REPO = Path(__file__).resolve().parent.parent


def _fits_pixels(blob: bytes) -> np.ndarray:
    from astropy.io import fits

    data = bytes(blob)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with fits.open(io.BytesIO(data)) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32)


def robust_sigma(a: np.ndarray) -> float:
    """1.4826 x MAD of the finite pixels (the std when the MAD is 0)."""
    v = a[np.isfinite(a)]
    if v.size == 0:
        return 1.0
    s = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    return s if s > 0 else float(v.std()) or 1.0


def decam_triggers(folder: str) -> dict[str, Any]:
    """Trigger stamps of DECam alert packets as ``(N, 4, H, W)`` raw pixels.

    Channels in the HiTS order: template (``refcutout``), science (``scicutout``),
    difference (``diffcutout``) and SNR-difference = difference / its robust noise
    (alerts carry no noise map). Returns ``ids``, ``stamps``, ``rb`` (the packet's score).
    """
    import fastavro

    ids, stamps, rb, files = [], [], [], []
    for path in sorted(glob.glob(str(Path(folder) / "*.avro"))):
        with open(path, "rb") as fh:
            for rec in fastavro.reader(fh):
                ts = rec["triggersource"]
                ref, sci, diff = (_fits_pixels(ts[k]) for k in ("refcutout", "scicutout", "diffcutout"))
                stamps.append(np.stack([ref, sci, diff, diff / robust_sigma(diff)]))
                ids.append(f"{rec.get('objectid')}/{ts.get('sourceid')}")
                rb.append(float(ts["rb"]) if ts.get("rb") is not None else float("nan"))
                files.append(Path(path).name)
    return {"ids": ids, "stamps": np.asarray(stamps, np.float32), "rb": np.asarray(rb), "files": files}


def mflop_per_stamp(name: str, params: int | None = None) -> float | None:
    """Multiply-adds x 2 of convolutions and dense layers for one stamp.

    None if *name* is not registered or its parameter count differs from *params* (the card's).
    """
    try:
        import torch

        from train.registry import create_model, get_spec
    except ImportError:
        return None
    try:
        spec = get_spec(name)
    except KeyError:
        return None
    model = create_model(name).eval()
    if params is not None and params != sum(p.numel() for p in model.parameters()):
        return None  # the registered architecture is not the one exported
    macs = [0]

    def hook(mod: Any, inp: Any, out: Any) -> None:
        if isinstance(mod, torch.nn.Conv2d):
            macs[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            macs[0] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, len(spec.input["channels"]), spec.input["height"], spec.input["width"]))
    for h in handles:
        h.remove()
    return 2 * macs[0] / 1e6


def _classify(clf: Classifier, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p(real) (NaN where the runtime refused the row) and the status per row."""
    pos = clf.classes.index(clf.card.positive_class)
    pred = clf.classify(stamps)
    return np.asarray(pred.proba[:, pos], dtype=np.float64), np.asarray(pred.status)


def _metrics(y: np.ndarray, p_real: np.ndarray, threshold: float) -> dict[str, Any]:
    refused = ~np.isfinite(p_real)
    p = np.where(refused, 0.0, p_real)  # a refused row is rejected: predicted bogus with p(real) 0
    pred = (p >= threshold).astype(np.int64)
    proba = np.stack([1 - p, p], 1)
    m = M.summary(y, proba, pred, ["bogus", "real"], 1)
    m["ece"] = M.expected_calibration_error(y, proba)
    m["refused"] = {"n": int(refused.sum()), "real": int((refused & (y == 1)).sum())}
    return m


def evaluate(
    model: str, sim: dict[str, Any] | None, real_sn: dict[str, np.ndarray] | None, decam: dict[str, Any] | None, threads: int | None
) -> dict[str, Any]:
    """All figures of one model (see the module docstring)."""
    clf = Classifier(model, device="cpu", threads=threads, batch_size=4096)
    card = clf.card
    thr = float(clf.threshold)
    out: dict[str, Any] = {"model": str(model), "name": card.name, "version": card.version, "threshold": thr}
    out["parameters"] = (card.training or {}).get("parameters")
    # a model exported under another name (export --name) keeps its registered one as the architecture
    architecture = (card.training or {}).get("architecture", card.name)
    out["mflop_per_stamp"] = mflop_per_stamp(architecture, out["parameters"])
    ops = dict(card.operating_points or {})
    if sim is not None:
        t0 = time.time()
        p, status = _classify(clf, sim["stamps"])
        out["sim_seconds"] = time.time() - t0
        y = sim["labels"]
        m = _metrics(y, p, thr)
        m["operating_points"] = {}
        for name, op in ops.items():
            mo = _metrics(y, p, float(op["threshold"]))
            m["operating_points"][name] = {
                "threshold": float(op["threshold"]),
                "fpr": 1.0 - mo["per_class"]["bogus"]["recall"],
                "tpr": mo["recall"],
            }
        pred = np.where(np.isfinite(p), p, 0.0) >= thr
        m["per_kind"] = {
            kind: {
                "label": "real" if int(y[sim["kind"] == k][0]) == 1 else "bogus",
                "n": int((sim["kind"] == k).sum()),
                # fraction classified as its true class: recall (real kinds) or rejection (bogus kinds)
                "correct": float((pred[sim["kind"] == k] == (y[sim["kind"] == k] == 1)).mean()),
            }
            for k, kind in enumerate(sim["kinds"])
            if (sim["kind"] == k).any()
        }
        out["sim_test"] = {**m, "n": int(len(y)), "split_seed": sim["seed"], "simulator_version": sim["version"]}
    if real_sn is not None:
        p, status = _classify(clf, real_sn["stamps"])
        p0 = np.where(np.isfinite(p), p, 0.0)
        det = real_sn["detected"]
        out["real_sn"] = {
            "n": int(len(p)),
            "refused": int((~np.isfinite(p)).sum()),
            "recall": float((p0 >= thr).mean()),
            # detected = a candidate a pipeline would report (|SNR| >= 5 near the centre)
            "n_detected": int(det.sum()),
            "recall_detected": float((p0[det] >= thr).mean()) if det.any() else float("nan"),
            "recall_at": {n: float((p0 >= float(op["threshold"])).mean()) for n, op in ops.items()},
            "p_real": {i: float(q) for i, q in zip(real_sn["id"], p, strict=True)},
        }
    if decam is not None and len(decam["ids"]):
        p, status = _classify(clf, decam["stamps"])
        out["decam"] = [
            {"file": f, "id": i, "rb": float(r), "p_real": float(q), "status": str(s)}
            for f, i, r, q, s in zip(decam["files"], decam["ids"], decam["rb"], p, status, strict=True)
        ]
    return out


def _print(r: dict[str, Any]) -> None:
    print(f"== {r['name']} v{r['version']} ({r['model']}), threshold {r['threshold']:.4f}, "
          f"{r['parameters']} parameters, {r['mflop_per_stamp'] or float('nan'):.2f} MFLOP/stamp")
    if "sim_test" in r:
        m = r["sim_test"]
        print(
            f"  simulated test (n={m['n']}, split seed {m['split_seed']}): accuracy {m['accuracy']:.5f}  "
            f"precision {m['precision']:.5f}  recall {m['recall']:.5f}  F1 {m['f1']:.5f}  "
            f"ROC AUC {m['roc_auc']:.6f}  ECE {m['ece']:.5f}  refused {m['refused']['n']} (real {m['refused']['real']})"
        )
        for name, op in m["operating_points"].items():
            print(f"  {name}: threshold {op['threshold']:.4f} -> FPR {op['fpr']:.5f}, TPR {op['tpr']:.5f}")
        print("  per kind: " + ", ".join(f"{k} {v['correct']:.4f}" for k, v in m["per_kind"].items()))
    if "real_sn" in r:
        s = r["real_sn"]
        print(
            f"  real HiTS SNe: recall {s['recall']:.4f} ({round(s['recall'] * s['n'])}/{s['n']}), detected ones "
            f"{s['recall_detected']:.4f} ({round(s['recall_detected'] * s['n_detected'])}/{s['n_detected']}) at the "
            "default threshold; all at " + ", ".join(f"{k} {v:.4f}" for k, v in s["recall_at"].items())
        )
    for d in r.get("decam", []):
        print(f"  DECam {d['id']:<28} rb {d['rb']:.3f}  p_real {d['p_real']:.4f}  {d['status']}")


def markdown_row(r: dict[str, Any]) -> str:
    """One row of the accuracy table in docs/hits-models.md."""
    m, sn = r.get("sim_test"), r.get("real_sn")
    cells = [f"`{r['name']}`"]
    cells += [f"{m[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "ece")] if m else [""] * 6
    if sn:
        cells.append(
            f"{sn['recall']:.3f} ({round(sn['recall'] * sn['n'])}) / "
            f"{sn['recall_detected']:.3f} ({round(sn['recall_detected'] * sn['n_detected'])} of {sn['n_detected']})"
        )
    else:
        cells.append("")
    return "| " + " | ".join(cells) + " |"


def _sim_set(n: int, seed: int, workers: int | None) -> dict[str, Any]:
    from train.data.hits import simulate_prepared
    from train.data.hits_sim import KINDS, SIM_VERSION

    t0 = time.time()
    stamps, labels, kind = simulate_prepared(n, seed, None, None, workers)  # raw pixels: the runtime preprocesses
    print(f"[eval] simulated {n} stamps (split seed {seed}) in {time.time() - t0:.0f} s", flush=True)
    return {"stamps": stamps, "labels": labels, "kind": kind, "kinds": KINDS, "seed": seed, "version": SIM_VERSION}


def _real_sn(option: str | None) -> dict[str, np.ndarray] | None:
    from train.data.hits import real_sn_path, stack_channels

    path = real_sn_path(option)
    if path is None or not path.exists():
        print(f"[eval] note: no real HiTS supernovae ({path or 'real-sn none'})", flush=True)
        return None
    try:
        from train.data.hits_real import build_real_sn_stamps
    except ImportError as exc:
        print(f"[eval] note: cannot build real SN stamps ({exc})", flush=True)
        return None
    d = build_real_sn_stamps(str(path))
    stamps = stack_channels(d)
    detected = np.asarray(d.get("detected", np.ones(len(stamps), bool)), dtype=bool)
    return {"stamps": stamps, "detected": detected, "id": np.asarray(d.get("id", np.arange(len(stamps)))).astype(str)}


def input_figure(path: str, card: Any, groups: dict[str, np.ndarray], per_group: int = 4) -> None:
    """PNG of stamps as the model sees them (after the card's preprocessing): rows = stamps, columns = channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stampclf.preprocess import prepare_stamps

    rows = [(g, x) for g, stamps in groups.items() for x in prepare_stamps(stamps[:per_group], card.input, card.preprocessing)[0]]
    channels = list(card.input["channels"])
    fig, axes = plt.subplots(len(rows), len(channels), figsize=(1.6 * len(channels), 1.5 * len(rows)), squeeze=False)
    for r, (group, x) in enumerate(rows):
        for c, name in enumerate(channels):
            ax = axes[r, c]
            ax.imshow(x[c], origin="lower", cmap="magma", vmin=-3, vmax=5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(group, fontsize=7)
    fig.suptitle("model input: asinh(x / robust noise) per stamp and channel; colour range -3..5", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="ONNX file or shipped name (repeatable)")
    p.add_argument("--n", type=int, default=100_000, help="simulated test stamps (0: skip)")
    p.add_argument("--seed", type=int, default=EVAL_SPLIT_SEED, help="split seed of the simulated test set")
    p.add_argument("--real-sn", default=None, help="real HiTS SN file (default: ../shared/data/hits/...; 'none': skip)")
    p.add_argument("--decam", default=None, help="folder of DECam .avro alerts (default: ../shared/data/alerts/decam)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    p.add_argument("--workers", type=int, default=None, help="simulation processes")
    p.add_argument("--markdown", action="store_true", help="also print one table row per model (docs/hits-models.md)")
    p.add_argument("--figure", default=None, help="write a PNG of DECam, real-SN and simulated inputs as the model sees them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sim = _sim_set(args.n, args.seed, args.workers) if args.n > 0 else None
    real_sn = _real_sn(args.real_sn)
    decam = None
    folder = Path(args.decam) if args.decam else (_REPO / DECAM_DEFAULT).resolve()
    if (args.decam is None or args.decam.lower() != "none") and folder.is_dir():
        decam = decam_triggers(str(folder))
    if args.figure:
        groups = {}
        if decam is not None:
            groups["DECam alert"] = decam["stamps"]
        if real_sn is not None:
            groups["HiTS SN (detected)"] = real_sn["stamps"][real_sn["detected"]]
        if sim is not None:
            for label, name in ((1, "sim real"), (0, "sim bogus")):
                groups[name] = sim["stamps"][sim["labels"] == label]
        input_figure(args.figure, Classifier(args.model[0], device="cpu").card, groups)
        print(f"[eval] wrote {args.figure}")
    results = []
    for model in args.model:
        r = evaluate(model, sim, real_sn, decam, args.threads)
        r["command"] = "python train/evaluate_hits.py " + " ".join(sys.argv[1:] if argv is None else argv)
        _print(r)
        results.append(r)
    if args.markdown:
        print("| model | sim. accuracy | precision | recall | F1 | ROC AUC | ECE | real SNe recall (all 87 / detected) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(markdown_row(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        print(f"[eval] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
