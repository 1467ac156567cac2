"""ONNX Runtime sessions: provider choice, threads, and quiet fallback to CPU."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from ._errors import DeviceError, ModelError

__all__ = ["SessionInfo", "create_session", "cpu_count", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass
class SessionInfo:
    """A created session and what it runs on."""

    session: Any
    device: str  # "cuda" or "cpu"
    notice: str | None  # one line to show the user when auto fell back to CPU
    threads: int


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _gpu_present() -> bool:
    # Cheap check before loading hundreds of MB of CUDA libraries on a CPU-only box.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/dev/dxg"))


def _options(threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def create_session(
    model: bytes,
    device: str = "auto",
    threads: int | None = None,
    source: str = "model",
    cuda_options: dict[str, Any] | None = None,
) -> SessionInfo:
    """Create an inference session on the requested device.

    Parameters
    ----------
    model
        Serialised ONNX model.
    device
        ``"auto"`` (CUDA if it really loads, else CPU with a notice), ``"cpu"`` or ``"cuda"``.
    threads
        Intra-op threads; default: the CPUs in this process's affinity mask.
    source
        Name of the model in error messages.
    cuda_options
        Extra CUDA execution provider options.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if threads is not None and threads < 1:
        raise DeviceError(f"threads must be at least 1, got {threads}")
    import onnxruntime as ort

    n_threads = threads or cpu_count()
    opts = _options(n_threads)
    notice: str | None = None
    if device in ("auto", "cuda"):
        reason = _cuda_unusable_reason(ort)
        if reason is None:
            cuda = dict(cudnn_conv_algo_search="EXHAUSTIVE", do_copy_in_default_stream="1")
            cuda.update(cuda_options or {})
            ort.set_default_logger_severity(4)  # CUDA load failures are reported by us, once
            try:
                sess = _make(ort, model, opts, [(_CUDA, cuda), _CPU], source)
            finally:
                ort.set_default_logger_severity(2)
            if sess.get_providers()[0] == _CUDA:
                return SessionInfo(sess, "cuda", None, n_threads)
            reason = "the CUDA execution provider failed to load (CUDA/cuDNN libraries missing?)"
        if device == "cuda":
            raise DeviceError(f"--device cuda: CUDA cannot be used: {reason}")
        notice = f"device auto: {reason}; running on CPU"
    sess = _make(ort, model, opts, [_CPU], source)
    return SessionInfo(sess, "cpu", notice, n_threads)


def _cuda_unusable_reason(ort: Any) -> str | None:
    if _CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    if not _gpu_present():
        return "no GPU found"
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # finds CUDA/cuDNN shipped as NVIDIA pip packages
        except Exception:  # noqa: BLE001, S110 - best effort; the session check below decides
            pass
    return None


def _make(ort: Any, model: bytes, opts: Any, providers: list[Any], source: str) -> Any:
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelError(f"{source}: ONNX Runtime cannot load the model: {msg}") from None
