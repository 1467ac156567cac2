"""Build the ONNX graphs that normalise stamps on the inference device.

``stampclf/preprocess.py`` (numpy) is the reference: training uses it, and the CPU
runtime uses it. On a GPU the per-stamp median/MAD in numpy is what limits end-to-end
throughput (docs/benchmarks.md), so the runtime can instead run these graphs on the
device, chained to the model without a copy through host memory. They compute the
same numbers (tests/test_device_prep.py checks them against ``prepare_stamps``,
including masked and constant stamps).

Each graph takes ``stamps`` (N, C, H, W) float32, raw pixels at the model's size, with
NaN/inf allowed, and the card's parameters as scalar inputs (``softening``, ``fill``);
its ``_cnhw`` variant takes ``stamps`` channel-major, (C, N, H, W), as the HDF5 reader
reads them (one dataset per channel, no copy into (N, C) order on the host). Both give

- ``x``: the model input (normalised, non-finite values replaced by ``fill``);
- ``bad``: (N, C) int64, non-finite values per stamp channel after normalisation;
- ``constant``: (N, C) bool, a channel of one value after the fill.

From ``bad`` and ``constant`` the runtime builds the same per-row status as
``prepare_stamps``. Regenerate the shipped files with ``python train/prep_graph.py``
(needs ``onnx``); the runtime only reads them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CUDA_OPS", "METHODS", "build", "graph_name", "main"]

OPSET = 18
METHODS = ("robust_asinh", "minmax")
OUT_DIR = Path(__file__).resolve().parents[1] / "stampclf" / "_graphs"
_MAD_TO_SIGMA = 1.4826  # as stampclf.preprocess
#: Ops with a kernel in ONNX Runtime's CUDA provider (its docs/OperatorKernels.md); a node of
#: another op runs on the CPU, its tensors copied off the GPU and back (``Asinh`` has none).
CUDA_OPS = frozenset({
    "Abs", "Add", "And", "Cast", "Div", "Equal", "Gather", "GatherElements", "Greater", "IsInf", "IsNaN", "Log",
    "Max", "Min", "Mul", "Not", "Or", "ReduceMax", "ReduceMin", "ReduceSum", "Reshape", "Shape", "Sign",
    "Sqrt", "Sub", "TopK", "Transpose", "Where",
})  # fmt: skip


class _Graph:
    """A few helpers over onnx.helper: each op returns the name of its (first) output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: object, dtype: type, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs: object) -> str:
        outs = [self.name(hint or kind.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(kind, list(inputs), outs, **attrs))
        return outs[0]


def _median_of_finite(g: _Graph, values: str, count: str, length: str) -> str:
    """Median along the last axis of the first *count* entries of ascending-sorted *values*.

    As numpy: the middle element for an odd count, the float mean of the two middle ones
    for an even count; 0 where the count is 0.
    """
    zero_i, one_i, two_i = g.const(0, np.int64), g.const(1, np.int64), g.const(2, np.int64)
    last = g.op("Sub", length, one_i)
    lo_i = g.op("Max", g.op("Div", g.op("Sub", count, one_i), two_i), zero_i)
    hi_i = g.op("Min", g.op("Div", count, two_i), last)
    lo = g.op("GatherElements", values, lo_i, axis=2)
    hi = g.op("GatherElements", values, hi_i, axis=2)
    mean = g.op("Div", g.op("Add", lo, hi), g.const(2.0, np.float32))
    odd = g.op("Equal", g.op("Sub", count, g.op("Mul", g.op("Div", count, two_i), two_i)), one_i)  # no int Mod
    med = g.op("Where", odd, lo, mean)
    return g.op("Where", g.op("Greater", count, zero_i), med, g.const(0.0, np.float32))


def _asinh(g: _Graph, y: str) -> str:
    """``asinh(y)`` from ops that every execution provider has, to a few float32 ulps.

    ONNX Runtime's CUDA provider has no ``Asinh`` kernel: the node would run on the CPU,
    with the whole tensor copied off the GPU and back for it. So, with ``a = |y|``,
    ``sign(y) * log1p(a + a^2 / (1 + sqrt(1 + a^2)))`` (which keeps tiny values: a
    plain ``log(a + sqrt(a^2 + 1))`` rounds |y| < 6e-8 to 0), with ``log1p(u)`` as
    ``u * log(w) / (w - 1)``, ``w = 1 + u`` (Goldberg's form: exact where ``w`` rounds to
    1); and ``log(a) + ln 2`` where ``a^2`` would overflow.
    """
    f32 = np.float32
    one = g.const(1.0, f32)
    a = g.op("Abs", y)
    sq = g.op("Mul", a, a)
    u = g.op("Add", a, g.op("Div", sq, g.op("Add", one, g.op("Sqrt", g.op("Add", sq, one)))))
    w = g.op("Add", one, u)
    wm1 = g.op("Sub", w, one)
    exact = g.op("Equal", wm1, g.const(0.0, f32))
    # the division's operand is made 1 where w - 1 is 0: no 0/0 to be discarded by Where
    log1p = g.op("Where", exact, u, g.op("Div", g.op("Mul", u, g.op("Log", w)), g.op("Where", exact, one, wm1)))
    large = g.op("Add", g.op("Log", a), g.const(np.log(2.0), f32))
    magnitude = g.op("Where", g.op("Greater", a, g.const(2.0**60, f32)), large, log1p)
    return g.op("Mul", g.op("Sign", y), magnitude)


def graph_name(method: str, channel_major: bool = False) -> str:
    """File name of a graph in ``stampclf/_graphs`` (the runtime's names)."""
    return f"{method}{'_cnhw' if channel_major else ''}.onnx"


def build(method: str, channel_major: bool = False) -> onnx.ModelProto:
    """The device-side normalisation graph for one card ``normalisation.method``.

    *channel_major*: the input is (C, N, H, W) (see the module's docstring).
    """
    if method not in METHODS:
        raise ValueError(f"no device graph for normalisation {method!r}; have {METHODS}")
    g = _Graph()
    f32 = np.float32
    stamps = g.op("Transpose", "stamps", perm=[1, 0, 2, 3]) if channel_major else "stamps"
    shape = g.op("Shape", stamps)
    flat = g.op("Reshape", stamps, g.const([0, 0, -1], np.int64))  # (N, C, P)
    length = g.op("Gather", g.op("Shape", flat), g.const([2], np.int64), axis=0)  # [P]
    finite = g.op("Not", g.op("Or", g.op("IsNaN", flat), g.op("IsInf", flat)))
    count = g.op("ReduceSum", g.op("Cast", finite, to=TensorProto.INT64), g.const([2], np.int64), keepdims=1)
    inf = g.const(np.inf, f32)
    some = g.op("Greater", count, g.const(0, np.int64))
    if method == "robust_asinh":
        ascending = {"axis": 2, "largest": 0, "sorted": 1}
        values = g.op("TopK", g.op("Where", finite, flat, inf), length, outputs=2, **ascending)
        centre = _median_of_finite(g, values, count, length)
        dev = g.op("Abs", g.op("Sub", flat, centre))
        mad = _median_of_finite(g, g.op("TopK", g.op("Where", finite, dev, inf), length, outputs=2, **ascending),
                                count, length)
        sigma = g.op("Mul", mad, g.const(_MAD_TO_SIGMA, f32))
        # MAD 0 (half the pixels one value, e.g. a zero-filled mask): the standard deviation
        zero_f = g.const(0.0, f32)
        n_f = g.op("Max", g.op("Cast", count, to=TensorProto.FLOAT), g.const(1.0, f32))
        kept = g.op("Where", finite, flat, zero_f)
        mean = g.op("Div", g.op("ReduceSum", kept, g.const([2], np.int64), keepdims=1), n_f)
        sq = g.op("Where", finite, g.op("Mul", g.op("Sub", flat, mean), g.op("Sub", flat, mean)), zero_f)
        std = g.op("Sqrt", g.op("Div", g.op("ReduceSum", sq, g.const([2], np.int64), keepdims=1), n_f))
        sigma = g.op("Where", g.op("Greater", sigma, zero_f), sigma, std)
        one_f = g.const(1.0, f32)
        usable = g.op("And", g.op("And", some, g.op("Greater", sigma, zero_f)),
                      g.op("Not", g.op("IsInf", sigma)))
        sigma = g.op("Where", usable, sigma, one_f)  # rows without a finite pixel: centre 0, sigma 1
        scale = g.op("Mul", sigma, "softening")
        out = _asinh(g, g.op("Div", g.op("Sub", flat, centre), scale))
    else:
        lo = g.op("ReduceMin", g.op("Where", finite, flat, inf), g.const([2], np.int64), keepdims=1)
        hi = g.op("ReduceMax", g.op("Where", finite, flat, g.const(-np.inf, f32)), g.const([2], np.int64), keepdims=1)
        zero_f = g.const(0.0, f32)
        lo, hi = g.op("Where", some, lo, zero_f), g.op("Where", some, hi, zero_f)
        span = g.op("Where", g.op("Greater", hi, lo), g.op("Sub", hi, lo), g.const(1.0, f32))
        out = g.op("Div", g.op("Sub", flat, lo), span)
    bad = g.op("Or", g.op("IsNaN", out), g.op("IsInf", out))
    g.nodes.append(helper.make_node("ReduceSum", [g.op("Cast", bad, to=TensorProto.INT64), g.const([2], np.int64)],
                                    ["bad"], keepdims=0))
    filled = g.op("Where", bad, "fill", out)
    g.nodes.append(helper.make_node("Equal", [g.op("ReduceMax", filled, g.const([2], np.int64), keepdims=0),
                                              g.op("ReduceMin", filled, g.const([2], np.int64), keepdims=0)],
                                    ["constant"]))
    g.nodes.append(helper.make_node("Reshape", [filled, shape], ["x"]))
    dims = ["N", "C", "H", "W"]
    graph = helper.make_graph(
        g.nodes,
        f"stampclf_prep_{method}{'_cnhw' if channel_major else ''}",
        [
            helper.make_tensor_value_info("stamps", TensorProto.FLOAT, ["C", "N", "H", "W"] if channel_major else dims),
            helper.make_tensor_value_info("softening", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("fill", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("bad", TensorProto.INT64, ["N", "C"]),
            helper.make_tensor_value_info("constant", TensorProto.BOOL, ["N", "C"]),
        ],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stampclf")
    model.ir_version = 8  # readable by every onnxruntime the runtime admits (>= 1.20)
    off_gpu = {n.op_type for n in model.graph.node} - CUDA_OPS
    if off_gpu:
        raise ValueError(f"ops without a CUDA kernel in the {method} graph: {sorted(off_gpu)}")
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    """Write ``stampclf/_graphs/<method>.onnx`` for every method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder (default: the runtime's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for method in METHODS:
        for channel_major in (False, True):
            path = args.out / graph_name(method, channel_major)
            path.write_bytes(build(method, channel_major).SerializeToString())
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
