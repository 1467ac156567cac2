"""ONNX Runtime sessions: provider choice, threads, and quiet fallback to CPU."""

from __future__ import annotations

import glob
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import DeviceError, ModelError

__all__ = ["SessionInfo", "BatchRunner", "create_session", "cpu_count", "available_memory", "to_fp16", "DEVICES", "PRECISIONS"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16")

_CUDA = "CUDAExecutionProvider"
_MIN_PIECE = 32  # fewer rows per single-thread session: thread hand-off costs more than it gains
# Input bytes per CPU session call, at most: ONNX Runtime's memory arena grows with the rows of
# a call (hits, --batch-size 16,384 in one call: 3.5 GB RSS against 0.5 GB), and throughput is
# flat from ~128 to ~2,000 hits rows a call, then falls (cache); a larger batch is several calls
_CPU_CALL_BYTES = 8 << 20
_CPU = "CPUExecutionProvider"


@dataclass
class SessionInfo:
    """A created session and what it runs on."""

    session: Any
    device: str  # "cuda" or "cpu"
    notice: str | None  # one line to show the user when auto fell back to CPU
    threads: int
    model: bytes = b""  # the serialised graph, for single-thread CPU replicas
    source: str = "model"


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory this process may still take (Linux: ``MemAvailable``, within a cgroup's limit); None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            free = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:  # a container's limit (cgroup v2), where there is one
        with open("/sys/fs/cgroup/memory.max") as fh, open("/sys/fs/cgroup/memory.current") as cur:
            limit = fh.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(cur.read()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


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
    # Idle intra-op threads sleep instead of spinning: with batch-sized runs spinning
    # gains nothing, and it steals the cores the reader/preprocessing thread needs
    # (measured: ~20 % faster end to end on a busy 2-core machine).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def create_session(
    model: bytes,
    device: str = "auto",
    threads: int | None = None,
    source: str = "model",
    cuda_options: dict[str, Any] | None = None,
    cuda_graph: bool = False,
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
    cuda_graph
        Capture the CUDA graph on the first run and replay it (needs `BatchRunner`'s
        fixed shape and bound buffers; ignored on CPU).
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if threads is not None and threads < 1:
        raise DeviceError(f"threads must be at least 1, got {threads}")
    import onnxruntime as ort

    _quiet(ort)
    n_threads = threads or cpu_count()
    opts = _options(n_threads)
    notice: str | None = None
    if device in ("auto", "cuda"):
        reason = _cuda_unusable_reason(ort)
        if reason is None:
            # EXHAUSTIVE search pays off because BatchRunner keeps one fixed batch shape
            cuda = dict(cudnn_conv_algo_search="EXHAUSTIVE", do_copy_in_default_stream="1")
            if cuda_graph:
                cuda["enable_cuda_graph"] = "1"
            cuda.update(cuda_options or {})
            ort.set_default_logger_severity(4)  # CUDA load failures are reported by us, once
            try:
                sess = _make(ort, model, opts, [(_CUDA, cuda), _CPU], source)
            finally:
                ort.set_default_logger_severity(3)
            if sess.get_providers()[0] == _CUDA:
                return SessionInfo(sess, "cuda", None, n_threads, model, source)
            reason = "the CUDA execution provider failed to load (CUDA/cuDNN libraries missing?)"
        if device == "cuda":
            raise DeviceError(f"device cuda: CUDA cannot be used: {reason}")
        if _gpu_present():  # a GPU it could not use is worth a line; a CPU node is what auto expects
            notice = f"device auto: {reason}; running on CPU"
    sess = _make(ort, model, opts, [_CPU], source)
    return SessionInfo(sess, "cpu", notice, n_threads, model, source)


def _quiet(ort: Any) -> None:
    """ONNX Runtime's own warnings off stderr (errors reach the user as ours, one line each).

    e.g. a service account without a writable home gets a warning about telemetry
    state on every run; stampclf sends no telemetry either way.
    """
    ort.set_default_logger_severity(3)
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()


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


def to_fp16(model: bytes, source: str = "model") -> bytes:
    """The model with float16 weights and arithmetic, float32 inputs and outputs kept.

    Needs the optional ``onnx`` and ``onnxconverter-common`` packages. Use it only
    where an accuracy check has accepted it (see ``benchmarks/gpu_bench.py``): on
    CPU, float16 is slower than float32.
    """
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError:
        raise DeviceError(
            "--precision fp16 needs the packages onnx and onnxconverter-common (pip install onnxconverter-common)"
        ) from None
    try:
        proto = onnx.load_from_string(model)
        half = float16.convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        raise ModelError(f"{source}: cannot convert to float16: {exc}") from None
    return half.SerializeToString()


def _bucket(n: int, batch_size: int) -> int:
    """Padded length of a short batch: the next power of two, at most *batch_size*.

    A long run's last batch therefore costs at most twice its rows, and a small
    call pads to one of a few sizes (each planned once) instead of a full batch.
    """
    return min(batch_size, 1 << max(0, n - 1).bit_length())


class BatchRunner:
    """Run a session over float32 ``(N, C, H, W)`` input in fixed-shape batches.

    CPU: plain ``session.run`` on at most `_CPU_CALL_BYTES` of input a call (a larger
    batch is several calls: memory stays flat); a short batch is zero-padded to `_bucket`
    rows so that only a few input shapes (and their memory plans) ever occur. With ``threads``
    > 1 and enough rows, the rows are split over that many single-thread sessions run
    side by side (data parallelism): for small convolutional nets this keeps every core
    busy, where ONNX Runtime's intra-op threads idle between small kernels (measured on
    the 2-core machine, `hits`: 21,700 vs 16,100 stamps/s; docs/benchmarks.md). Calls
    with fewer rows run on the one multi-threaded session, so latency is unchanged.

    CUDA: inputs and outputs are bound once to device buffers of shape
    ``(batch_size, ...)`` with IOBinding; each call copies one batch in, runs and
    copies the probabilities out, every time at the same shape (cuDNN's algorithm
    search and an optional CUDA graph are done once). Rows are independent, so
    padding does not change any row's result.

    With *prep* (a session of a ``stampclf/_graphs`` normalisation graph), `submit_raw`
    uploads raw stamps, normalises them on the device straight into the model's bound
    input and runs the model: only the probabilities and two small ``(N, C)`` arrays
    come back. That path binds buffers on either device (one CPU session then). With
    *prep_cm*, the graph's channel-major variant, a batch that views channel-major
    memory (`stampclf.preprocess.channel_major`: the HDF5 reader's) is uploaded in that
    layout, without a host copy when it is a whole block.
    """

    def __init__(
        self,
        info: SessionInfo,
        batch_size: int,
        row_shape: tuple[int, ...],
        n_out: int,
        prep: SessionInfo | None = None,
        prep_args: dict[str, float] | None = None,
        prep_cm: SessionInfo | None = None,
    ) -> None:
        if batch_size < 1:
            raise DeviceError(f"batch size must be at least 1, got {batch_size}")
        self.info = info
        self.session = info.session
        self.batch_size = int(batch_size)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.row_shape = tuple(int(d) for d in row_shape)
        row_bytes = 4 * math.prod(self.row_shape)
        # rows a CPU call: never more than a batch (a small batch is not padded up), at least a piece
        self.cpu_rows = min(self.batch_size, max(_MIN_PIECE, _CPU_CALL_BYTES // max(row_bytes, 1)))
        self.n_out = int(n_out)
        self.device = info.device
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"  # bound buffers live there (tests: the CPU)
        self.prep = prep
        self.prep_cm = prep_cm if prep is not None else None
        self._prep_args = dict(prep_args or {})
        self._cm: tuple[Any, Any, Any] | None = None  # channel-major (raw buffer, host stage, binding), made on first use
        self._binding: Any = None
        self._bound_lock = threading.Lock()
        self.parallel = info.threads if self.device == "cpu" else 1
        self._replicas: list[Any] = []
        self._pool: Any = None
        # CUDA: one thread of its own uploads and runs while the caller writes the previous
        # batch (ONNX Runtime lets go of the GIL while it runs); on a GPU, CSV formatting and
        # inference took turns in one thread (py-spy)
        self.background = self.device == "cuda"
        self._device_thread: Any = None
        self._last: Any = None  # the device thread's latest piece of work (see drain)
        self._thread_lock = threading.Lock()
        if self.device == "cuda" or prep is not None:
            self._bind()

    def _bind(self) -> None:
        import numpy as np
        import onnxruntime as ort

        dev = self._ort_device  # the same code on either device: tests run the chained graphs on the CPU
        shape = (self.batch_size, *self.row_shape)
        self._stage = np.zeros(shape, dtype=np.float32)  # host buffer for padded short batches
        # buffers of their own (on the CPU, ortvalue_from_numpy would share _stage's memory)
        self._x_dev = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, dev, 0)
        self._y_dev = ort.OrtValue.ortvalue_from_shape_and_type((self.batch_size, self.n_out), np.float32, dev, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, self._x_dev)
        binding.bind_ortvalue_output(self.output_name, self._y_dev)
        self._binding = binding
        if self.prep is None:
            return
        # raw stamps in, model input out into the model's own input buffer: no host round trip
        rows = (self.batch_size, self.row_shape[0])
        self._raw_dev = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, dev, 0)
        self._bad_dev = ort.OrtValue.ortvalue_from_shape_and_type(rows, np.int64, dev, 0)
        self._const_dev = ort.OrtValue.ortvalue_from_shape_and_type(rows, np.bool_, dev, 0)
        self._scalars = []  # held here: the binding must never outlive the buffers it points at
        for name in ("softening", "fill"):
            value = np.array(self._prep_args.get(name, 1.0 if name == "softening" else 0.0), dtype=np.float32)
            self._scalars.append(ort.OrtValue.ortvalue_from_numpy(value, dev, 0))
        self._prep_binding = self._bind_prep(self.prep, self._raw_dev)

    def _bind_prep(self, prep: SessionInfo, raw: Any) -> Any:
        """A binding of a normalisation graph: *raw* in, the model's bound input and the two (N, C) arrays out."""
        binding = prep.session.io_binding()
        binding.bind_ortvalue_input("stamps", raw)
        for name, value in zip(("softening", "fill"), self._scalars, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output("x", self._x_dev)
        binding.bind_ortvalue_output("bad", self._bad_dev)
        binding.bind_ortvalue_output("constant", self._const_dev)
        return binding

    def _channel_major(self) -> tuple[Any, Any, Any]:
        """The channel-major raw buffer, its host stage and binding (callers hold the lock)."""
        if self._cm is None:
            import numpy as np
            import onnxruntime as ort

            assert self.prep_cm is not None
            shape = (self.row_shape[0], self.batch_size, *self.row_shape[1:])
            raw = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self._ort_device, 0)
            self._cm = (raw, np.zeros(shape, np.float32), self._bind_prep(self.prep_cm, raw))
        return self._cm

    def warmup(self) -> None:
        """One full batch of zeros: plans, cuDNN search and graph capture happen here, not in timed runs."""
        import numpy as np

        zeros = np.zeros((self.batch_size, *self.row_shape), dtype=np.float32)
        self(zeros)
        if self.prep is not None:
            self.submit_raw(zeros)()
        if self.prep_cm is not None:  # the HDF5 reader's channel-major batches
            c, *hw = self.row_shape
            self.submit_raw(np.zeros((c, self.batch_size, *hw), np.float32).transpose(1, 0, 2, 3))()

    def run_bound(self, raw: bool = False) -> None:
        """Run once on whatever the bound device input holds (benchmarks: device-resident input).

        *raw*: the bound raw stamps through the normalisation graph first.
        """
        with self._bound_lock:
            if raw:
                self.prep.session.run_with_iobinding(self._prep_binding)
            self.session.run_with_iobinding(self._binding)

    def _piece_rows(self, n: int) -> int:
        """Rows per single-thread piece for a call of *n* rows; 0: run on the one session."""
        if self.parallel < 2 or n < self.parallel * _MIN_PIECE:
            return 0
        return max(_MIN_PIECE, min(-(-min(n, self.batch_size) // self.parallel), self.cpu_rows))

    def _start_replicas(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import onnxruntime as ort

        self._replicas = [
            _make(ort, self.info.model, _options(1), [_CPU], self.info.source) for _ in range(self.parallel)
        ]
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="stampclf-cpu")

    def _start_parallel(self, x: Any, out: Any, piece: int) -> list[Any]:
        import numpy as np

        if not self._replicas:
            self._start_replicas()
        starts = list(range(0, len(x), piece))

        def work(j: int) -> None:
            sess = self._replicas[j]
            for start in starts[j :: self.parallel]:
                chunk = np.ascontiguousarray(x[start : start + piece], dtype=np.float32)
                m = len(chunk)
                if m < piece:  # the tail: the same shape as the other pieces
                    chunk = np.concatenate([chunk, np.zeros((piece - m, *chunk.shape[1:]), np.float32)])
                out[start : start + m] = sess.run([self.output_name], {self.input_name: chunk})[0][:m]

        return [self._pool.submit(work, j) for j in range(min(self.parallel, len(starts)))]

    def submit(self, x: Any) -> Callable[[], Any]:
        """Start inference of *x*; the returned function waits and gives the probabilities.

        On CPU with several sessions, and on CUDA (`background`), the work runs in the
        background, so a caller can write the previous batch's results meanwhile;
        elsewhere it runs here, now.
        """
        import numpy as np

        piece = self._piece_rows(len(x)) if self.device == "cpu" else 0  # CPU: bound buffers are prep's only
        if not piece:
            return self._later(self._run_here, x)
        out = np.empty((len(x), self.n_out), dtype=np.float32)
        futures = self._start_parallel(x, out, piece)

        def result() -> Any:
            for f in futures:
                f.result()  # re-raises a worker's error here
            return out

        return result

    def _later(self, fn: Callable[[Any], Any], x: Any) -> Callable[[], Any]:
        """``fn(x)`` on the device thread (`background`), else now; the returned function gives its result."""
        if not self.background:
            done = fn(x)
            return lambda: done
        with self._thread_lock:  # one device thread, also when several threads (Dask tasks) submit
            if self._device_thread is None:
                from concurrent.futures import ThreadPoolExecutor

                self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="stampclf-device")
            self._last = self._device_thread.submit(fn, x)
            return self._last.result  # re-raises its error in the caller

    def drain(self) -> None:
        """Wait until the device thread has finished what it was given (one thread: in order)."""
        from concurrent.futures import wait

        last = self._last
        if last is not None:
            wait([last])

    def close(self) -> None:
        """Stop the worker threads (also done at interpreter exit)."""
        for pool in (self._pool, self._device_thread):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._device_thread = self._last = None
        self._replicas = []

    def __call__(self, x: Any) -> Any:
        """Probabilities for *x*, waiting for them (see `submit`)."""
        return self.submit(x)()

    def submit_raw(self, x: Any) -> Callable[[], tuple[Any, Any, Any]]:
        """Normalise raw stamps with the device graph, then infer, chained on the device.

        *x*: ``(N, *row_shape)`` float32 raw pixels at the model's size (`fit_stamps`).
        The returned function gives ``(probabilities, bad, constant)``; ``bad`` and
        ``constant`` are the ``(N, C)`` arrays that `stamp_status` turns into statuses.
        """
        if self.prep is None:
            raise DeviceError("this runner has no device preprocessing graph")
        return self._later(self._run_raw, x)

    def _run_raw(self, x: Any) -> tuple[Any, Any, Any]:
        import numpy as np

        from .preprocess import channel_major

        # A channel-major batch (the HDF5 reader's) goes to the graph's variant for it: no host
        # copy when it is a whole block, one per channel slab otherwise. One row is the same
        # bytes either way: it goes there too, so that a file's 1-row tail does not bring the
        # other graph's session (and its memory arena) into a run.
        cm = self.prep_cm is not None and (len(x) == 1 or channel_major(x))
        n = len(x)
        out = np.empty((n, self.n_out), dtype=np.float32)
        bad = np.empty((n, self.row_shape[0]), dtype=np.int64)
        constant = np.empty((n, self.row_shape[0]), dtype=bool)
        for start in range(0, n, self.batch_size):
            part = x[start : start + self.batch_size]
            m = len(part)
            with self._bound_lock:
                if cm:
                    raw, stage, binding = self._channel_major()
                    self._upload(raw, part.transpose(1, 0, 2, 3), stage, axis=1)
                    self.prep_cm.session.run_with_iobinding(binding)  # type: ignore[union-attr]
                else:
                    self._upload(self._raw_dev, part)
                    self.prep.session.run_with_iobinding(self._prep_binding)
                self.session.run_with_iobinding(self._binding)
                out[start : start + m] = self._y_dev.numpy()[:m]
                bad[start : start + m] = self._bad_dev.numpy()[:m]
                constant[start : start + m] = self._const_dev.numpy()[:m]
        return out, bad, constant

    def _upload(self, target: Any, chunk: Any, stage: Any = None, axis: int = 0) -> None:
        """*chunk* into a bound device buffer, zero-padded along *axis* to the batch (callers hold the lock).

        A short chunk is copied once, straight into the host stage (any layout, any dtype).
        """
        import numpy as np

        m = chunk.shape[axis]
        if m == self.batch_size:
            target.update_inplace(np.ascontiguousarray(chunk, dtype=np.float32))
            return
        stage = self._stage if stage is None else stage
        lead = (slice(None),) * axis
        stage[(*lead, slice(None, m))] = chunk
        stage[(*lead, slice(m, None))] = 0.0
        target.update_inplace(stage)

    def _run_here(self, x: Any) -> Any:
        import numpy as np

        n = len(x)
        out = np.empty((n, self.n_out), dtype=np.float32)
        bs = self.batch_size if self._binding is not None else self.cpu_rows  # bound buffers hold a batch
        for start in range(0, n, bs):
            chunk = np.ascontiguousarray(x[start : start + bs], dtype=np.float32)
            m = len(chunk)
            if self._binding is not None:
                # one set of device buffers: calls from several threads (a Dask worker's
                # tasks share its Classifier) must not interleave upload, run and download
                with self._bound_lock:
                    self._upload(self._x_dev, chunk)
                    self.session.run_with_iobinding(self._binding)
                    out[start : start + m] = self._y_dev.numpy()[:m]
                continue
            if m < bs:
                padded = np.zeros((_bucket(m, bs), *chunk.shape[1:]), dtype=np.float32)
                padded[:m] = chunk
                chunk = padded
            out[start : start + m] = self.session.run([self.output_name], {self.input_name: chunk})[0][:m]
        return out
