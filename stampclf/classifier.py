"""`Classifier`: a model card, an ONNX Runtime session, preprocessing and batching."""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._card import ModelCard, read_card, resolve_threshold
from ._errors import DeviceError, InputError, ModelError, check_choice
from ._registry import resolve_model, shadowing_notice
from ._session import PRECISIONS, BatchRunner, available_memory, cpu_count, create_session, to_fp16
from .io import InputBatch, input_paths, open_inputs
from .io._base import DUPLICATE_ID, duplicate_rows
from .metrics import label_indices
from .preprocess import (
    OK,
    fit_stamps,
    image_to_array,
    merge_status,
    prepare_stamps,
    scale_pixels,
    stamp_status,
    text_column,
)

__all__ = ["Classifier", "Predictions"]

DEFAULT_BATCH_SIZE = 1024
PREPS = ("auto", "host", "device")
_GRAPHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_graphs")


@dataclass
class _RawStatus:
    """Status of raw stamps still to be normalised on the device (see `BatchRunner.submit_raw`)."""

    note: str
    padded: str
    reader: np.ndarray | None  # what the reader noticed, e.g. duplicate ids


@dataclass(eq=False)  # fields are arrays: `==` would be ambiguous; compare them with numpy
class Predictions:
    """Results for a batch of rows, in input order.

    Attributes
    ----------
    ids
        Row ids (from the input, or row numbers).
    labels
        Predicted class name per row; ``""`` where the row failed.
    proba
        ``(n, n_classes)`` probabilities; NaN where the row failed.
    status
        ``"ok"``, ``"flagged: <reason>"`` or ``"failed: <reason>"``.
    true_labels
        Class indices from the input file, when it has labels.
    file
        The input the rows came from: one name, or one per row (image files).
    extra
        Reader-specific columns, e.g. ``object_id`` for alert packets.
    classes, model, model_version
        The model's class names (the columns of ``proba``), name and version: the
        provenance of every row, as in the output files.
    """

    ids: np.ndarray
    labels: np.ndarray
    proba: np.ndarray
    status: np.ndarray
    true_labels: np.ndarray | None = None
    file: str | np.ndarray = ""
    extra: dict[str, np.ndarray] | None = None
    classes: tuple[str, ...] = ()
    model: str = ""
    model_version: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> Predictions:
        """The rows *index* selects (an integer, a slice, indices or a boolean mask), as `Predictions`."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        elif not isinstance(index, slice):
            index = np.asarray(index)
            if index.size == 0:
                index = index.astype(np.intp)  # [] is float64 to numpy
        return Predictions(
            self.ids[index], self.labels[index], self.proba[index], self.status[index],
            None if self.true_labels is None else self.true_labels[index],
            self.file if isinstance(self.file, str) else self._files()[index],
            None if self.extra is None else {k: v[index] for k, v in self.extra.items()},
            self.classes, self.model, self.model_version,
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: Iterable[Predictions]) -> Predictions:
        """One `Predictions` of several in order, e.g. all batches of ``classify_file``.

        ``true_labels`` are kept when every part has them; ``file`` becomes one name per
        row when the parts come from several files.
        """
        parts = list(parts)
        if not parts:
            raise InputError("Predictions.concat: no results to join")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        truth = [p.true_labels for p in parts]
        files = [p.file for p in parts]
        same_file = all(isinstance(f, str) for f in files) and len(set(files)) == 1  # type: ignore[arg-type]
        keys = list(dict.fromkeys(k for p in parts for k in (p.extra or {})))  # every part's, in order

        def extra(p: Predictions, k: str) -> np.ndarray:  # a column a part lacks is empty there, as in the files
            return p.extra[k] if p.extra and k in p.extra else text_column(len(p), "")

        return cls(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.proba for p in parts]),
            np.concatenate([p.status for p in parts]),
            None if any(t is None for t in truth) else np.concatenate(truth),  # type: ignore[arg-type]
            first.file if same_file else np.concatenate([p._files() for p in parts]),
            {k: np.concatenate([extra(p, k) for p in parts]) for k in keys} if keys else None,
            first.classes, first.model, first.model_version,
        )  # fmt: skip

    def _files(self) -> np.ndarray:
        """The input of each row (``file`` is one name for all rows, or one per row)."""
        return text_column(len(self), self.file) if isinstance(self.file, str) else np.asarray(self.file, object)

    def to_dict(self) -> dict[str, np.ndarray]:
        """The rows as named columns, in the order of ``stampclf classify``'s output.

        ``id, label, p_<class>..., status, model, model_version, file`` and the extra
        columns; one array of ``len(self)`` values each.
        """
        n = len(self)
        cols: dict[str, np.ndarray] = {"id": self.ids, "label": self.labels}
        cols.update({f"p_{c}": self.proba[:, k] for k, c in enumerate(self.classes)})
        cols["status"] = self.status
        cols["model"] = text_column(n, self.model)
        cols["model_version"] = text_column(n, self.model_version)
        cols["file"] = self._files()
        cols.update(self.extra or {})
        return cols

    def to_pandas(self) -> Any:
        """`to_dict` as a ``pandas.DataFrame`` (needs pandas, which stampclf itself does not)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Predictions.to_pandas needs pandas (pip install pandas); to_dict() does not") from None
        return pd.DataFrame(self.to_dict())


#: Copies of a batch a file run holds at once (the block read, the one preprocessed, the one
#: being inferred; measured: hits, a 200,000-row batch, 2.5 times its float32 bytes)
_BATCH_COPIES = 3


def _check_batch_memory(batch_size: int, reader: Any, model_shape: Sequence[int]) -> None:
    """Refuse a batch that cannot fit in memory, before the first read (rather than the kernel's OOM kill)."""
    rows = min(batch_size, reader.n_rows) if getattr(reader, "n_rows", None) is not None else batch_size
    shape = tuple(getattr(reader, "row_shape", None) or model_shape)
    need = _BATCH_COPIES * rows * 4 * int(np.prod(shape))
    free = available_memory()
    if free is not None and need > free:
        raise InputError(
            f"batch size {batch_size:,}: {rows:,} rows of {reader.path} ({' x '.join(map(str, shape))} float32 a row) "
            f"take about {need / 2**30:.1f} GiB at once, more than the {free / 2**30:.1f} GiB of memory available; "
            "give a smaller batch size"
        )


#: How long a stopped consumer waits for its reader thread to finish the block in hand.
_JOIN_SECONDS = 2.0


def _prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run *items* in a reader thread, at most *depth* ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def offer(item: Any) -> bool:
        # never block for good: a consumer that stopped early sets `stop` and reads no more
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            offer(exc)

    thread = threading.Thread(target=work, name="stampclf-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # wait for the thread (its current block: milliseconds): left running, it may be inside
        # h5py while the interpreter exits after an error or a closed stdout, and h5py's lock
        # then hangs or crashes the shutdown (seen: `| head -1` hung or ended with SIGSEGV).
        # Bounded, so that Ctrl-C is not held up by a read that hangs (a network file system).
        if thread is not threading.current_thread():
            thread.join(timeout=_JOIN_SECONDS)


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, depth: int = 0) -> Iterator[Any]:
    """``fn`` over *items* in *workers* threads; results in input order, at most *depth* in flight.

    numpy releases the GIL in the preprocessing kernels (partition, arcsinh), so a
    few threads scale where the GPU leaves the CPU cores idle.
    """
    depth = depth or 2 * workers
    pending: collections.deque[Any] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stampclf-prep") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _gpu_only(precision: str, cuda_graph: bool, where: str) -> None:
    """Refuse the GPU-only options on a CPU (fp16 is slower there and less accurate)."""
    if precision == "fp16":
        raise DeviceError(f"precision fp16 is for GPUs (on a CPU it is slower than fp32); {where}")
    if cuda_graph:
        raise DeviceError(f"CUDA graphs need a GPU; {where}")


_NO_LABELS = "expected a 'labels' dataset in HDF5, or images in folders named after the model's classes"


def _why_no_labels(reader: Any) -> str:
    """``no labels in <input> (<why>)``, for a reader without usable labels."""
    return f"no labels in {reader.path} ({getattr(reader, 'why_no_labels', None) or _NO_LABELS})"


def _positive_int(name: str, value: Any) -> int:
    """*value* as an int of at least 1 (numpy integers too); `InputError` naming *name* otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r}: expected an integer of at least 1")
    return int(value)


def _check_ids(ids: Any, n: int) -> np.ndarray:
    """*ids* as an array, refused unless there is one per row."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise InputError(f"ids: shape {ids.shape} for {n} stamps (need one id per stamp)")
    return ids


def _flag_duplicate_ids(ids: np.ndarray | None, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers for missing *ids*; rows whose id repeats an earlier row's flagged ``duplicate id``.

    A flag only: it never changes which rows are scored.
    """
    if ids is None:
        return np.arange(len(status)), status
    dup = duplicate_rows(ids)
    if dup.any():
        status = merge_status(status, np.where(dup, DUPLICATE_ID, OK).astype(object))
    return ids, status


class Classifier:
    """Classify stamps or images with a shipped or local ONNX model.

    Parameters
    ----------
    model
        A shipped model name (see `stampclf.list_models`) or a path to an ``.onnx`` file.
    device
        ``"auto"`` (CUDA when it really works, else CPU), ``"cpu"`` or ``"cuda"``.
    threads
        CPU threads for inference; default: the CPUs this process may use.
    batch_size
        Rows per inference call; default: the card's ``input.default_batch_size`` (sized at
        export so that one batch's largest intermediate tensor stays under 256 MB), else 1024.
    threshold
        Decision threshold on the positive class (binary models): a number in [0, 1] or
        the name of an operating point of the card (``card.operating_points``, e.g.
        ``"fpr_1pct"``); default: the card's. Settable later (``clf.threshold = 0.9``).
    verify
        Check the weights against the card's sha256 when loading.
    precision
        ``"fp32"`` (default) or ``"fp16"`` (converted on load; needs ``onnxconverter-common``;
        for GPUs, and only where an accuracy check accepted it).
    cuda_graph
        On CUDA, capture and replay a CUDA graph of the fixed-shape batch.
    prep
        Where stamps are normalised: ``"host"`` (numpy, `stampclf.preprocess`),
        ``"device"`` (an ONNX graph chained to the model on the inference device: on a
        GPU only pixels go over the bus and the CPU only reads) or ``"auto"`` (device on
        CUDA, host on CPU, where numpy is faster). Both give the same statuses and, to
        float rounding, the same numbers. Stamp models only.

    Attributes
    ----------
    card
        The model card (`stampclf.ModelCard`): classes, channels, input size,
        preprocessing, threshold, operating points, metrics, provenance.
    name, version, classes
        From the card; every result carries them (`Predictions.model`, ...).
    path
        The ONNX file.
    device, threads, batch_size, threshold, precision, prep
        What the session runs with (``batch_size`` and ``threshold`` can be set).
    notice
        One line worth telling the user (e.g. a name that resolved to other weights
        than the shipped model's), or None.

    Examples
    --------
    >>> clf = Classifier("hits")                     # doctest: +SKIP
    >>> clf.predict_proba(stamps)[:, clf.classes.index("real")]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "hits",
        device: str = "auto",
        threads: int | None = None,
        batch_size: int | None = None,
        threshold: float | str | None = None,
        verify: bool = True,
        precision: str = "fp32",
        cuda_graph: bool = False,
        prep: str = "auto",
    ) -> None:
        check_choice("prep", prep, PREPS)
        check_choice("precision", precision, PRECISIONS)
        for name, value in (("batch_size", batch_size), ("threads", threads)):
            if value is not None:
                _positive_int(name, value)
        if not isinstance(model, (str, os.PathLike)):
            raise InputError(f"model={model!r}: give a shipped model's name or the path of an .onnx file")
        resolve_threshold(None, threshold)  # the range, before the model is read
        self.path = resolve_model(model)
        self.card: ModelCard
        self.card, data = read_card(self.path, verify=verify)
        resolve_threshold(self.card, threshold)
        self.precision = precision
        if device == "cpu":
            _gpu_only(precision, cuda_graph, "device cpu")
        if precision == "fp16":
            data = to_fp16(data, source=str(self.path))
        info = create_session(data, device, threads, source=str(self.path), cuda_graph=cuda_graph)
        if info.device == "cpu":
            _gpu_only(precision, cuda_graph, f"device {device} runs on the CPU here")
        self._cuda_graph = cuda_graph
        self._info = info
        self._runner: BatchRunner | None = None  # made on first use, at the current batch size
        self._runner_lock = threading.Lock()
        self._prep_notice: str | None = None
        self._prep_info = self._prep_session(prep, threads)
        self.prep = "device" if self._prep_info is not None else "host"
        # Preprocessing threads for file streams: on CPU the inference threads own the
        # cores (one reader/preprocessing thread overlaps); on CUDA the cores are free for
        # numpy, unless the device normalises (then a pool would only hold batches in memory).
        self.prep_workers = 1 if info.device == "cpu" or self._prep_info else max(1, min(cpu_count() - 1, 8))
        self.session = info.session
        self.device = info.device
        over = (
            f"{threads} threads are more than the {cpu_count()} CPU(s) this process may use (slower, not faster)"
            if threads and info.device == "cpu" and threads > cpu_count() else None
        )
        # shadowing: a model name that resolved to other weights than the shipped model of that name
        self.notice = "; ".join(n for n in (shadowing_notice(model, self.path), info.notice, self._prep_notice, over) if n) or None
        self.threads = info.threads
        hint = self.card.input.get("default_batch_size", DEFAULT_BATCH_SIZE)
        if isinstance(hint, bool) or not isinstance(hint, int) or hint < 1:
            raise ModelError(f"{self.path}: card input.default_batch_size {hint!r} is not a positive integer")
        self.batch_size = batch_size or hint
        self.threshold = threshold  # type: ignore[assignment]  # the setter resolves names and checks
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        self._check_graph()
        self._positive = (
            self.card.classes.index(self.card.positive_class) if self.card.positive_class else None
        )

    def _prep_session(self, prep: str, threads: int | None) -> tuple[Any, Any] | None:
        """Sessions of the device normalisation graph and of its channel-major variant (None if
        that file is absent), when *prep* and the card call for them."""
        method = self.card.preprocessing.get("normalisation", {}).get("method", "none")
        graph = os.path.join(_GRAPHS, f"{method}.onnx")
        usable = self.card.kind == "stamp" and os.path.isfile(graph)
        if prep == "device" and not usable:
            what = f"normalisation {method!r}" if self.card.kind == "stamp" else f"{self.card.kind} preprocessing"
            raise InputError(f"prep device: model {self.name!r} has {what}, which runs on the host only")
        if prep == "host" or not usable or (prep == "auto" and self._info.device != "cuda"):
            return None
        sessions = []
        for path in (graph, os.path.join(_GRAPHS, f"{method}_cnhw.onnx")):
            if not os.path.isfile(path):
                sessions.append(None)
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                sessions.append(create_session(data, self._info.device, threads, source=path))
            except (DeviceError, ModelError) as exc:
                if prep == "device":
                    raise
                self._prep_notice = f"prep auto: normalising on the host ({exc})"
                return None
        return sessions[0], sessions[1]

    def _check_graph(self) -> None:
        """The graph's fixed input/output sizes must agree with the card (else ORT fails mid-run)."""
        got_in = self.session.get_inputs()[0].shape
        got_out = self.session.get_outputs()[0].shape
        want_in, want_out = ("N", *self.card.shape), ("N", len(self.card.classes))
        for got, want, what in ((got_in, want_in, "input"), (got_out, want_out, "output")):
            fixed = [
                (g, w) for g, w in zip(got, want, strict=False) if isinstance(g, int) and isinstance(w, int) and g != w
            ]
            if len(got) != len(want) or fixed:
                raise ModelError(
                    f"{self.path}: graph {what} shape {got} does not match the model card (expects {list(want)})"
                )

    # --- card views --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Model name from the card."""
        return self.card.name

    @property
    def version(self) -> str:
        """Model version from the card."""
        return self.card.version

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the probability columns."""
        return list(self.card.classes)

    def __repr__(self) -> str:
        return f"Classifier({self.name!r} v{self.version}, device={self.device!r}, classes={self.classes})"

    def close(self) -> None:
        """Stop the CPU worker threads and drop their sessions (also done at interpreter exit).

        The classifier stays usable: a later call starts them again. Not while another
        thread is classifying with it. With a captured CUDA graph the device buffers are
        kept: the graph holds their addresses.
        """
        with self._runner_lock:
            if self._runner is not None:
                self._runner.close()
                if not self._graph_captured():
                    self._runner = None

    def _graph_captured(self) -> bool:
        return self._cuda_graph and self.device == "cuda" and self._runner is not None

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- core --------------------------------------------------------------------------
    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._submit(x)()

    def _runner_now(self) -> BatchRunner:
        # fixed batch shape (short batches padded), IOBinding on CUDA: see BatchRunner
        with self._runner_lock:  # threads' first calls at once must not make two sets of buffers
            return self._runner_locked()

    def _runner_locked(self) -> BatchRunner:
        if self._runner is None or self._runner.batch_size != self.batch_size:
            if self._graph_captured():
                # the captured graph holds the old buffers' addresses: replaying it would be wrong
                raise DeviceError(
                    f"batch size {self._runner.batch_size} is fixed by the captured CUDA graph; "
                    "create a new Classifier for another batch size"
                )
            if self._runner is not None:
                self._runner.close()
            spec = self.card.preprocessing
            args = {
                "softening": float(spec.get("normalisation", {}).get("softening", 1.0)),
                "fill": float(spec.get("nan_policy", {}).get("fill", 0.0)),
            }
            prep, prep_cm = self._prep_info or (None, None)
            self._runner = BatchRunner(
                self._info, self.batch_size, self.card.shape, len(self.card.classes), prep, args, prep_cm
            )
        return self._runner

    def _submit(self, x: np.ndarray) -> Callable[[], np.ndarray]:
        return self._runner_now().submit(x)

    def _decide(self, proba: np.ndarray) -> np.ndarray:
        if self.card.is_binary:
            other = 1 - self._positive
            idx = np.where(proba[:, self._positive] >= self.threshold, self._positive, other)
        else:
            idx = proba.argmax(axis=1)
        return np.asarray(self.card.classes, dtype=object)[idx]

    def _prepare(self, batch: InputBatch, what: str) -> tuple[np.ndarray, Any]:
        if batch.x is not None:
            status = batch.status if batch.status is not None else text_column(len(batch))
            return batch.x, status
        return self._prepare_stamps(batch.stamps, what, batch.status)  # type: ignore[arg-type]

    def _prepare_stamps(self, stamps: Any, what: str = "stamps", reader: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """Model input and status; with device prep, raw stamps and a `_RawStatus` to finish later."""
        if self._prep_info is not None:
            x, note, padded = fit_stamps(stamps, self.card.input, self.card.preprocessing, what)
            return x, _RawStatus(note, padded, reader)
        x, status = prepare_stamps(stamps, self.card.input, self.card.preprocessing, what)
        if reader is not None:  # what the reader noticed, e.g. duplicate ids
            status = merge_status(status, reader)
        return x, status

    def _predict_prepared(self, x: np.ndarray, status: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(proba, labels, status)`` of prepared rows (status: an array, or a `_RawStatus`)."""
        return self._wait(self._start(x, status))

    def _predict_stream(
        self, stream: Iterable[tuple[Any, np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]:
        """``(tag, x, status)`` -> ``(tag, proba, labels, status)`` in order, one batch in flight.

        The next batch runs through the model while the caller handles this one (writes
        its rows); CPU sessions run in the background, see `BatchRunner.submit`.
        """
        pending: tuple[Any, Callable[[], tuple[np.ndarray, np.ndarray]]] | None = None
        for tag, x, status in stream:
            started = (tag, self._start(x, status))
            if pending is not None:
                yield (pending[0], *self._wait(pending[1]))
            pending = started
        if pending is not None:
            yield (pending[0], *self._wait(pending[1]))

    def _wait(
        self, started: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(proba, labels, status)`` once a `_start` is done."""
        proba, status = started()
        return (*self._finish(proba, status), status)

    def _start(self, x: np.ndarray, status: Any) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Inference of prepared rows, started; call the result to wait for probabilities and statuses."""
        if isinstance(status, _RawStatus):
            return self._start_raw(x, status)
        if not len(x):
            empty = np.empty((0, len(self.card.classes)), np.float32)
            return lambda: (empty, status)
        wait = self._submit(x)
        return lambda: (wait(), status)

    def _start_raw(self, x: np.ndarray, raw: _RawStatus) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """`_start` for raw stamps normalised on the device: statuses from what the graph found."""
        wait = self._runner_now().submit_raw(x)  # no rows: empty arrays

        def done() -> tuple[np.ndarray, np.ndarray]:
            proba, bad, constant = wait()
            status = stamp_status(bad, constant, raw.note, raw.padded, self.card.input, self.card.preprocessing)
            if raw.reader is not None:
                status = merge_status(status, raw.reader)
            return proba, status

        return done

    def _finish(self, proba: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels from probabilities; failed rows get NaN and no label.

        A row whose probabilities are not finite (a model fed extreme values) is
        marked failed in *status*, in place, rather than labelled.
        """
        for i in np.flatnonzero(~np.isfinite(proba).all(axis=1)).tolist():
            if not status[i].startswith("failed"):
                status[i] = "failed: model output not finite"
        failed = np.zeros(len(status), dtype=bool)
        for i in np.flatnonzero(status != OK).tolist():  # most rows are "ok": look only at the others
            failed[i] = status[i].startswith("failed")
        labels = self._decide(proba) if len(proba) else np.empty(0, dtype=object)
        if failed.any():
            proba[failed] = np.nan
            labels[failed] = ""
        return proba, labels

    def classify(
        self, stamps: np.ndarray | Sequence[Any], ids: np.ndarray | None = None, *, preprocessed: bool = False
    ) -> Predictions:
        """Classify in-memory rows.

        Parameters
        ----------
        stamps
            Stamp models: raw stamps ``(N, C, H, W)`` in the card's channel order
            (``card.channels``), any linear pixel unit and numeric dtype; one stamp needs
            the batch axis (``stamp[None]``). Image models: a list of Pillow images
            (resized, cropped and scaled as the card says, like files) or uint8 pixels
            already at the input size, ``(N, C, H, W)`` or ``(N, H, W, C)``.
        ids
            One id per row (default: row numbers); a repeated id is flagged ``duplicate id``.
        preprocessed
            *stamps* is model input already (float32 ``(N, *card.shape)``, preprocessed
            as the card says): it goes to the model as it is.

        Returns
        -------
        Predictions
            One row per input row, in order, with the model's name and version.
        """
        if ids is not None:
            ids = _check_ids(ids, len(stamps) if hasattr(stamps, "__len__") else -1)
        if preprocessed:
            x = self._model_input(stamps)
            status = text_column(len(x))
        elif self.card.kind != "stamp":
            x = self._image_input(stamps)
            status = text_column(len(x))
        elif isinstance(stamps, (list, tuple)) and any(hasattr(i, "getbands") for i in stamps):
            raise InputError(f"model {self.name!r} classifies stamps {self.card.shape} in the channels "
                             f"{self.card.channels}, not images")
        elif isinstance(stamps, np.ndarray) and stamps.ndim == 4 and len(stamps) > 2 * self.batch_size:
            x = None  # large array: preprocess batch by batch, overlapped with inference
            proba, labels, status = self._classify_in_batches(stamps)
        else:
            x, status = self._prepare_stamps(stamps)
        if x is not None:
            proba, labels, status = self._predict_prepared(x, status)
        ids, status = _flag_duplicate_ids(ids, status)
        return self._provenance(Predictions(ids, labels, proba, status))

    @property
    def batch_size(self) -> int:
        """Rows per inference call (files are streamed in batches of this many rows)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = _positive_int("batch_size", value)

    @property
    def threshold(self) -> float:
        """Decision threshold on the positive class (two-class cards with a ``positive_class``)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | str | None) -> None:
        resolved = resolve_threshold(self.card, value)  # a name, a range or a multi-class card: checked
        self._threshold = self.card.threshold if resolved is None else resolved

    def _provenance(self, pred: Predictions) -> Predictions:
        """*pred* with this model's classes, name and version."""
        pred.classes, pred.model, pred.model_version = tuple(self.classes), self.name, self.version
        return pred

    def _image_input(self, images: Any) -> np.ndarray:
        """Model input from Pillow images or uint8 pixels at the input size."""
        c, h, w = self.card.shape
        spec = self.card.preprocessing
        if hasattr(images, "getbands"):
            raise InputError("images: one Pillow image given; pass a list of images")
        if isinstance(images, (list, tuple)) and images and all(hasattr(i, "getbands") for i in images):
            arrays = []
            for k, img in enumerate(images):
                try:
                    a = image_to_array(img, spec)  # the file reader's own steps
                except (OSError, ValueError) as exc:
                    raise InputError(f"images[{k}]: cannot preprocess ({exc.__class__.__name__}: {exc})") from None
                if a.shape != (c, h, w):
                    raise InputError(f"images[{k}]: preprocessing gives shape {a.shape}, model needs {(c, h, w)}")
                arrays.append(a)
            return np.stack(arrays)
        if isinstance(images, (list, tuple)) and any(hasattr(i, "getbands") for i in images):
            raise InputError("images: a list that mixes Pillow images with other things; give one kind")
        try:
            arr = np.asarray(images)
        except ValueError as exc:  # ragged lists
            raise InputError(f"images: not an array of images ({exc})") from None
        if arr.ndim == 3 and arr.dtype == np.uint8:
            raise InputError(
                f"images: uint8 pixels of shape {arr.shape}; expected a batch (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}): "
                "one image needs a batch axis (image[None]); grey images can be given as Pillow images"
            )
        if arr.ndim == 4 and arr.dtype == np.uint8:  # pixels: only the scaling is left to do
            if arr.shape[1:] == (h, w, c) and arr.shape[1:] != (c, h, w):
                arr = arr.transpose(0, 3, 1, 2)
            if arr.shape[1:] != (c, h, w):
                raise InputError(
                    f"images: uint8 pixels of shape {arr.shape}; model {self.name!r} takes (N, {c}, {h}, {w}) or "
                    f"(N, {h}, {w}, {c}); resize/crop first (stampclf.preprocess.image_to_uint8) or pass Pillow images"
                )
            return scale_pixels(arr, spec)
        if arr.dtype.kind in "US" or (arr.dtype == object and len(arr) and isinstance(arr.flat[0], (str, os.PathLike))):
            raise InputError("images: file names given; classify files with classify_file(paths)")
        if arr.size == 0:
            raise InputError(f"images: none given (shape {arr.shape})")
        if arr.dtype.kind == "f":  # 0-255 or 0-1? and scaled or not? guessing would give confident nonsense
            raise InputError(
                f"images: float pixels ({arr.dtype}, values {np.nanmin(arr):.3g} to {np.nanmax(arr):.3g}); give uint8 "
                f"pixels (0-255) or Pillow images, or preprocessed=True if this is model input already "
                f"(stampclf.preprocess.image_to_array)"
            )
        raise InputError(f"images: dtype {arr.dtype}; give Pillow images or uint8 pixels (N, {h}, {w}, {c})")

    def _model_input(self, x: Any) -> np.ndarray:
        """*x* checked as model input: float ``(N, *card.shape)``."""
        arr = np.asarray(x)
        if arr.dtype.kind != "f" or arr.ndim != 4 or arr.shape[1:] != tuple(self.card.shape):
            raise InputError(
                f"preprocessed input: expected float32 of shape (N, {', '.join(map(str, self.card.shape))}), "
                f"got {arr.dtype} {arr.shape}"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _classify_in_batches(self, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`classify` of a large array: the same rows and numbers, in bounded memory.

        Batches are preprocessed in a background thread (a pool on CUDA) while the
        previous batch runs through the model, as for files.
        """
        bs = self.batch_size

        def prep(start: int) -> tuple[np.ndarray, Any]:
            return self._prepare_stamps(stamps[start : start + bs])

        starts = range(0, len(stamps), bs)
        if self.prep_workers <= 1:
            stream = _prefetch(map(prep, starts))
        else:
            stream = _ordered_map(prep, starts, self.prep_workers)
        tagged = ((None, x, status) for x, status in stream)
        parts = [(proba, labels, status) for _, proba, labels, status in self._predict_stream(tagged)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def predict_proba(self, stamps: np.ndarray | Sequence[Any], *, preprocessed: bool = False) -> np.ndarray:
        """Class probabilities ``(N, n_classes)`` in the order of ``classes``; NaN rows could not be scored.

        *stamps* and *preprocessed* as in `classify`.
        """
        return self.classify(stamps, preprocessed=preprocessed).proba

    def predict(self, stamps: np.ndarray | Sequence[Any], *, preprocessed: bool = False) -> np.ndarray:
        """Predicted class names; ``""`` for rows that could not be scored.

        Two-class cards with a ``positive_class``: that class where its probability is
        at least ``threshold``; other cards: the most probable class. *stamps* and
        *preprocessed* as in `classify`.
        """
        return self.classify(stamps, preprocessed=preprocessed).labels

    def classify_file(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        batch_size: int | None = None,
        layout: str = "auto",
        channels_last: bool = False,
        labels: str = "auto",
    ) -> Iterator[Predictions]:
        """Stream predictions for files, batch by batch, in input order.

        Reading and preprocessing run in a background thread, overlapped with inference.

        Parameters
        ----------
        path
            One path or a list: HDF5 stamp files, Avro alert files, FITS cut-outs, image
            files or folders of images (searched recursively), as ``stampclf classify`` takes.
        batch_size
            Rows per inference call (default: ``self.batch_size``).
        layout, channels_last
            HDF5 layout: ``"auto"``, ``"channels"`` or ``"stacked"``; stacked stamps stored
            ``(N, H, W, C)``.
        labels
            The input's labels as ``Predictions.true_labels`` (class indices): ``"auto"``
            keeps them when all are this model's classes and leaves them out (None)
            otherwise; ``"check"`` raises `InputError` saying why they cannot be used (as
            ``--evaluate`` does); ``"skip"`` never reads them.

        Returns
        -------
        Iterator[Predictions]
            One per batch (a batch never spans two inputs), read as it is consumed; the
            arguments are checked at once. See `evaluate` for metrics, `Predictions.concat`
            for one result.
        """
        if labels not in ("auto", "check", "skip"):  # checked now, not when the first batch is asked for
            raise InputError(f"labels={labels!r}: choose 'auto', 'check' or 'skip'")
        size = self.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
        paths = input_paths(path)
        return self._classify_paths(paths, size, layout, channels_last, labels)

    def _classify_paths(
        self, paths: list[str], batch_size: int, layout: str, channels_last: bool, labels: str
    ) -> Iterator[Predictions]:
        for _group, opener in open_inputs(paths, self.card, layout, channels_last):
            reader = opener()
            if labels == "check":
                if not reader.has_labels:
                    reader.close()
                    raise InputError(_why_no_labels(reader))
                try:
                    self._check_labels(reader)
                except InputError:
                    reader.close()
                    raise
            yield from self._classify_reader(reader, batch_size, labels)

    def evaluate(self, predictions: Predictions | Iterable[Predictions]) -> dict[str, Any]:
        """The figures ``stampclf classify --evaluate`` prints, of results with true labels.

        Rows that failed are counted as ``unscored``, not scored; accuracy, precision,
        recall, F1, ROC AUC, per-class figures and the confusion matrix are of
        the rest (`stampclf.metrics.summary`; two-class cards: of ``positive_class`` at
        ``threshold``, others: macro averages).

        Raises
        ------
        InputError
            When no result carries true labels (``classify_file(..., labels="check")`` says why).
        """
        preds = [predictions] if isinstance(predictions, Predictions) else list(predictions)
        labelled = [p for p in preds if p.true_labels is not None]
        if not preds:
            raise InputError("evaluate: no results")
        if len(labelled) < len(preds):  # figures of part of the rows would pass for figures of all of them
            first = next(p for p in preds if p.true_labels is None)
            where = first.file if isinstance(first.file, str) else first.file[0] if len(first.file) else "?"
            raise InputError(f"evaluate: results of {where} have no true labels "
                             "(classify_file(..., labels='check') says why)")
        return self._evaluate_arrays(
            np.concatenate([p.true_labels for p in labelled]), np.concatenate([p.proba for p in labelled])  # type: ignore[misc]
        )

    def _evaluate_arrays(self, y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
        """Metrics of scored rows (failed rows, NaN probabilities, are counted, not scored)."""
        from . import metrics

        ok = np.isfinite(proba).all(axis=1)
        pred = np.array([self.classes.index(c) for c in self._decide(proba[ok])], dtype=np.int64)
        out = metrics.summary(y_true[ok], proba[ok], pred, self.classes, self._positive)
        out["unscored"] = int((~ok).sum())
        if self.card.is_binary:  # multiclass labels use no threshold
            out["threshold"] = self.threshold
        return out

    def _classify_reader(self, reader: Any, batch_size: int, labels: str = "auto") -> Iterator[Predictions]:
        """Predictions of one open reader, with its labels as ``true_labels`` according to *labels*.

        ``"check"`` (evaluation): labels that are not this model's classes are an error;
        ``"skip"``: not read (the caller has no use for them); ``"auto"``: kept when the
        whole input's labels are this model's classes, else left out (another labelling
        scheme is no reason to refuse a file).
        """
        what = reader.path
        _check_batch_memory(batch_size, reader, self.card.shape)
        use_labels = labels == "check" or (labels == "auto" and self._labels_fit(reader))
        if not use_labels and hasattr(reader, "with_labels"):
            reader.with_labels = False

        def prepared() -> Iterator[tuple[InputBatch, np.ndarray, np.ndarray]]:
            for batch in reader.batches(batch_size):
                x, status = self._prepare(batch, what)
                yield batch, x, status

        def prepare_one(batch: InputBatch) -> tuple[InputBatch, np.ndarray, np.ndarray]:
            x, status = self._prepare(batch, what)
            return batch, x, status

        runner = self._runner_now() if self.device == "cuda" and self.prep == "device" else None
        # its blocks go up as they lie: DMA, no staging. Not while a CUDA graph may be being
        # captured on the device thread: page-locking from the reader thread meanwhile could
        # break the capture
        if runner is not None and hasattr(reader, "pin_blocks") and not self._cuda_graph:
            reader.pin_blocks = True
        if self.prep_workers <= 1:  # one thread reads and preprocesses ahead of inference
            stream = _prefetch(prepared())
        else:  # one thread reads, a pool preprocesses
            stream = _ordered_map(prepare_one, _prefetch(reader.batches(batch_size)), self.prep_workers)
        try:
            for batch, proba, labels, status in self._predict_stream(stream):
                file = batch.files if batch.files is not None else what
                yield self._provenance(Predictions(
                    batch.ids, labels, proba, status, self._label_index(batch.labels, what) if use_labels else None,
                    file, batch.extra,
                ))
        finally:
            drained = False
            try:
                stream.close()  # its threads first: the file must not be closed under a read
                if runner is not None:
                    runner.drain()  # and no upload of its (pinned) blocks in flight
                drained = True
            finally:
                if not drained and getattr(reader, "pin_blocks", False):
                    # interrupted (Ctrl-C) with an upload maybe in flight: each block is unpinned
                    # when it is freed instead, after the device thread has let go of it
                    reader.pin_blocks = False
                reader.close()

    def _check_labels(self, reader: Any) -> None:
        """Raise `InputError` unless the reader's whole labels column (if any) is this model's classes."""
        read = getattr(reader, "read_labels", None)
        if read is not None:  # image folders: class names by construction; alerts: no labels
            self._label_index(read(), reader.path)

    def _labels_fit(self, reader: Any) -> bool:
        try:
            self._check_labels(reader)
        except InputError:
            return False
        return True

    def _label_index(self, labels: np.ndarray | None, what: str) -> np.ndarray | None:
        return None if labels is None else label_indices(labels, self.card.classes, what)


ProgressCallback = Callable[[int], None]
