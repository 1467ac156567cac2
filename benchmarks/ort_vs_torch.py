"""ONNX Runtime vs PyTorch eager: same weights, same batch, same threads, same prepared input.

The PyTorch model is built from ``train.registry`` (the card's model name) and gets
its weights from the ONNX file's initializers (or from ``--checkpoint``); the two
outputs are compared before anything is timed, so both really run the same
network. The two engines then run in alternating rounds over the same batches;
the figure is the ratio of their median rates. Target for ``hits``: >= 3.

    python benchmarks/ort_vs_torch.py --model hits [--batch-size 1024] [--threads 2] [--n 16384]
    python benchmarks/ort_vs_torch.py --model all     # every shipped model
"""

from __future__ import annotations

import time
from typing import Any

import _common
import numpy as np


def torch_model(clf: Any, checkpoint: str | None) -> Any:
    """The registered PyTorch model with the weights of *clf*'s ONNX file, in eval mode."""
    import onnx
    import torch
    from onnx import numpy_helper

    from train.export import Deployable, load_trained
    from train.registry import create_model, get_spec

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(clf.path)).graph.initializer}
    model = Deployable(create_model(clf.name))
    state = model.state_dict()
    missing = [k for k in state if k not in init and not k.endswith("num_batches_tracked")]
    default = _common.ROOT / "runs" / clf.name / "checkpoint.pt"
    if checkpoint or (missing and default.exists()):
        # batch norm is folded into the convolutions by the exporter: take the training checkpoint
        return load_trained(get_spec(clf.name), checkpoint or default).eval()
    if missing:
        raise SystemExit(
            f"{clf.path}: the ONNX initializers do not name all PyTorch weights (e.g. {missing[:3]}; "
            f"batch norm folded by the exporter): pass --checkpoint (default {default} does not exist)"
        )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(init[k])).reshape(v.shape) if k in init else v for k, v in state.items()}
    )
    return model.eval()


def bench_one(name: str, args: Any) -> dict[str, Any]:
    import torch

    from stampclf import Classifier
    from stampclf._bench import synthetic_stamps
    from stampclf.preprocess import prepare_stamps

    clf = Classifier(name, device="cpu", threads=args.threads, batch_size=args.batch_size)
    threads = clf.threads
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    net = torch_model(clf, args.checkpoint)
    raw = synthetic_stamps(args.n, clf.card.shape)
    x = prepare_stamps(raw, clf.card.input, clf.card.preprocessing)[0] if clf.card.kind == "stamp" else raw
    xt = torch.from_numpy(x)
    bs = args.batch_size

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([net(xt[s : s + bs]).numpy() for s in range(0, len(xt), bs)])

    def run_ort() -> np.ndarray:
        return clf._run(x)

    diff = float(np.abs(run_torch() - run_ort()).max())  # also the warm-up of both
    if diff > 1e-4:
        raise SystemExit(f"{name}: ONNX Runtime and PyTorch disagree by {diff:.2e}: not the same weights")
    t_ort, t_torch = [], []
    for _ in range(args.rounds):
        for fn, acc in ((run_ort, t_ort), (run_torch, t_torch)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ort_rate, torch_rate = args.n / _common.median(t_ort), args.n / _common.median(t_torch)
    return {
        f"{name}: onnxruntime stamps/s": ort_rate,
        f"{name}: pytorch eager stamps/s": torch_rate,
        f"{name}: speed-up (ratio)": ort_rate / torch_rate,
        f"{name}: max |p_ort - p_torch|": diff,
        f"{name}: threads, batch": f"{threads}, {bs}",
    }


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=int, default=16_384, help="stamps per round (default 16384)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per engine (default 5)")
    p.add_argument("--checkpoint", default=None, help="load PyTorch weights from this checkpoint instead")
    args = p.parse_args()
    import torch

    from stampclf import list_models

    names = list_models() if args.model == "all" else [args.model]
    figures: dict[str, Any] = {}
    for name in names:
        figures.update(bench_one(name, args))
    _common.report("onnxruntime vs pytorch eager", figures, args, {"torch": torch.__version__})


if __name__ == "__main__":
    main()
