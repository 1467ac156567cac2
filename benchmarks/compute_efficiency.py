"""Compute efficiency: achieved FLOP/s of a model as a fraction of numpy's float32 matrix-product rate.

FLOPs are counted from the ONNX graph: Conv, ConvTranspose, Gemm and MatMul nodes
(2 x multiply-adds), with every tensor shape from ``onnx.shape_inference`` at the
benchmark's batch size. Rotations, pooling, activations and softmax are not
counted (they move data). The model's rate is `Classifier`'s inference on prepared
input; numpy's rate is a square float32 matrix product with the same number of
threads. Both are measured in alternating rounds in one run; the figure is the
ratio of the medians. Target for ``hits``: >= 0.5.

    python benchmarks/compute_efficiency.py --model hits [--threads 2] [--batch-size 1024]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import _common


def _threads_from_argv() -> None:
    # BLAS reads its thread count at import: set it before numpy is imported
    if "--threads" in sys.argv:
        n = sys.argv[sys.argv.index("--threads") + 1]
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n


_threads_from_argv()

import numpy as np  # noqa: E402


def count_flops(model_path: str, batch: int) -> tuple[float, dict[str, float]]:
    """FLOPs per row of the graph (Conv/Gemm/MatMul), and the total per op type."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(model_path)
    inp = model.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    dim0.ClearField("dim_param")
    dim0.dim_value = batch
    model = shape_inference.infer_shapes(model, strict_mode=True)
    g = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)

    def shape(name: str) -> list[int]:
        s = shapes.get(name)
        if s is None or any(d < 0 for d in s):
            raise SystemExit(f"{model_path}: shape inference left {name!r} unknown: cannot count FLOPs")
        return s

    by_op: dict[str, float] = {}
    for node in g.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shape(node.input[1])  # (Cout, Cin/group, kh, kw) or (Cin, Cout/group, ...) for transpose
            out = shape(node.output[0])
            macs = float(np.prod(out)) * float(np.prod(w[1:]))
            if node.op_type == "ConvTranspose":
                macs = float(np.prod(shape(node.input[0]))) * float(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = shape(node.input[0])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            macs = float(np.prod(shape(node.output[0]))) * k
        elif node.op_type == "MatMul":
            k = shape(node.input[0])[-1]
            macs = float(np.prod(shape(node.output[0]))) * k
        else:
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + 2.0 * macs
    return sum(by_op.values()) / batch, {k: v / batch for k, v in by_op.items()}


def matmul_rate(n: int = 2048) -> float:
    """FLOP/s of one float32 (n x n) @ (n x n) product."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    t0 = time.perf_counter()
    a @ b
    return 2.0 * n**3 / (time.perf_counter() - t0)


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=int, default=16_384, help="stamps per model round (default 16384)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args()

    from stampclf import Classifier
    from stampclf._bench import synthetic_stamps
    from stampclf.preprocess import prepare_stamps

    clf = Classifier(args.model, device="cpu", threads=args.threads, batch_size=args.batch_size)
    flops, by_op = count_flops(str(clf.path), args.batch_size)
    raw = synthetic_stamps(args.n, clf.card.shape)
    x = prepare_stamps(raw, clf.card.input, clf.card.preprocessing)[0] if clf.card.kind == "stamp" else raw
    clf._run(x[: args.batch_size])  # warm-up
    matmul_rate(args.matmul_size)
    t_model, r_mm = [], []
    for _ in range(args.rounds):
        r_mm.append(matmul_rate(args.matmul_size))
        t0 = time.perf_counter()
        clf._run(x)
        t_model.append(time.perf_counter() - t0)
    rate = args.n / _common.median(t_model)
    achieved, peak = rate * flops, _common.median(r_mm)
    figures: dict[str, Any] = {
        "MFLOP per stamp (Conv/Gemm/MatMul)": flops / 1e6,
        **{f"  of which {k}, MFLOP": v / 1e6 for k, v in by_op.items()},
        "model stamps/s": rate,
        "model achieved GFLOP/s": achieved / 1e9,
        "numpy float32 matmul GFLOP/s": peak / 1e9,
        "efficiency (ratio)": achieved / peak,
        "threads, batch": f"{clf.threads}, {args.batch_size}",
    }
    _common.report("compute efficiency", figures, args)


if __name__ == "__main__":
    main()
