"""Scale-out on a Dask cluster: many files (or a Dask array of stamps) over many workers.

Work is split into units: an HDF5 file into row ranges of ``chunk_rows``, a list
of image files into runs of ``chunk_rows`` files, an Avro alert file or a group of
FITS files into one unit each; a Dask array by its chunks along the first axis.
The model file is read and checked once on the client and its bytes are
broadcast to every worker (``client.scatter(..., broadcast=True)``); each worker
builds the ONNX Runtime session once per model and reuses it for every unit.
Results come back in input order and go through the same `ResultWriter` as a
single-process run, so the output is the same file, row for row.

Needs ``dask[distributed]`` (``pip install 'stampclf[dask]'``); importing this
module does not import Dask.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._card import read_card, resolve_threshold
from ._errors import InputError, StampclfError, check_choice
from ._registry import resolve_model
from ._run import ROW_INPUTS, RunSummary, finish, row_errors, row_inputs, status_counts, unscored_input
from .classifier import PREPS, Classifier, Predictions
from .io import LAYOUTS, HDF5Reader, InputBatch, input_kind, input_paths, open_inputs, open_writer, run_attrs

__all__ = ["classify_dask", "predict_dask", "DEFAULT_CHUNK_ROWS"]

#: Rows (or image files) per unit of work.
DEFAULT_CHUNK_ROWS = 16_384

# --- worker side --------------------------------------------------------------------------
_CLASSIFIERS: dict[tuple[Any, ...], Classifier] = {}
_LOCK = threading.Lock()


def _cache_dir() -> str:
    """This user's own folder for model files in the temp folder (mode 0700), made on first use.

    The temp folder is shared with other local users: a file there that anyone could
    have put in place is never used. A folder of that name that is not this user's
    own, private directory (someone else's, a link, open to others) is passed over
    for a fresh private folder.
    """
    base = tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(base, f"stampclf-{uid if uid is not None else 'models'}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return tempfile.mkdtemp(prefix="stampclf-")
    st = os.lstat(path)
    if uid is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077):
        return tempfile.mkdtemp(prefix="stampclf-")  # mode 0700, this process's own
    return path


def _sha256_of(path: str) -> str | None:
    """The sha256 of a file's bytes, or None where it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _model_file(data: bytes, sha: str) -> str:
    """The model bytes as a file in this user's private cache folder, reused only if its sha256 is *sha*.

    Written atomically (a private ``.part`` file, mode 0600, renamed into place), so a
    worker never reads a half-written file; a file that is there with other bytes
    (damaged, or not written by us) is replaced.
    """
    folder = _cache_dir()
    path = os.path.join(folder, f"model-{sha}.onnx")
    if _sha256_of(path) != sha:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model-", suffix=".part")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def _worker_classifier(data: bytes, sha: str, options: dict[str, Any]) -> Classifier:
    """This worker's classifier for a model, made on first use and kept."""
    key = (sha, *sorted(options.items()))
    clf = _CLASSIFIERS.get(key)
    if clf is None:
        with _LOCK:
            clf = _CLASSIFIERS.get(key)
            if clf is None:
                # verify=True: the sha256 of the weights is checked again on the worker
                clf = Classifier(_model_file(data, sha), **options)
                _CLASSIFIERS[key] = clf
    return clf


class _RowRange:
    """Rows ``start:stop`` of an HDF5 file, as a reader."""

    has_labels = False

    def __init__(self, reader: HDF5Reader, start: int, stop: int) -> None:
        self.path, self._reader, self._start, self._stop = reader.path, reader, start, stop
        self.n_rows = stop - start
        self.has_labels = reader.has_labels

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        for s in range(self._start, self._stop, batch_size):
            yield self._reader.read_rows(s, min(s + batch_size, self._stop))  # salvages as the reader is set

    def close(self) -> None:
        self._reader.close()


@dataclass
class _Unit:
    """One task: an input (index into the run's inputs) and what part of it."""

    index: int
    kind: str  # "hdf5", "images", "fits_stamps" (per-channel FITS files), "group" (alerts, other FITS), "array"
    paths: list[str]
    start: int = 0
    stop: int = 0
    error: str = ""  # the client could not read this input (keep_going)
    # rows flagged as a duplicate id by the client's scan of the whole input (hdf5: row numbers
    # in the file; images: positions in this unit's paths)
    dups: Any = None


class _Ready:
    """A finished result that needs no task (an input the client already found bad)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _empty(clf: Classifier, file: str) -> Predictions:
    return clf._provenance(Predictions(
        np.empty(0, object), np.empty(0, object), np.empty((0, len(clf.classes)), np.float32), np.empty(0, object),
        file=file,
    ))  # fmt: skip


def _score_unit(data: bytes, sha: str, options: dict[str, Any], settings: dict[str, Any], unit: _Unit) -> Any:
    """Run one unit on a worker; returns Predictions, or ``("error", message)`` when asked to keep going."""
    try:
        clf = _worker_classifier(data, sha, options)
        batch = settings["batch_size"] or clf.batch_size
        if unit.kind == "hdf5":
            hdf5 = HDF5Reader(
                unit.paths[0], clf.card.input, settings["layout"], settings["channels_last"], duplicates=unit.dups
            )
            hdf5.salvage = settings["keep_going"]  # a damaged chunk fails its rows, as in a local run
            hdf5.with_labels = False  # no --evaluate on Dask
            reader: Any = _RowRange(hdf5, unit.start, unit.stop)
        elif unit.kind == "images":
            from .io import ImageReader

            reader = ImageReader(
                unit.paths, clf.card.preprocessing, clf.card.shape, classes=clf.card.classes, duplicates=unit.dups
            )
        else:
            (_, opener), *rest = open_inputs(unit.paths, clf.card, settings["layout"], settings["channels_last"])
            if rest:  # the client grouped these paths as one reader; the worker must agree
                raise InputError(f"{unit.paths[0]}: inputs grouped differently on the worker")
            reader = opener()
        preds = list(clf._classify_reader(reader, batch, "skip"))  # no --evaluate on Dask
        result = Predictions.concat(preds) if preds else _empty(clf, getattr(reader, "path", unit.paths[0]))
        damaged = getattr(getattr(reader, "_reader", None), "damaged", None)
        return ("salvaged", result, list(damaged)) if damaged else result
    except StampclfError as exc:
        if settings["keep_going"]:
            return ("error", str(exc))
        raise


def _score_block(data: bytes, sha: str, options: dict[str, Any], block: np.ndarray, offset: int) -> Predictions:
    """Classify one chunk of a Dask array of stamps; ids are global row numbers."""
    clf = _worker_classifier(data, sha, options)
    pred = clf.classify(np.asarray(block))
    pred.ids = np.arange(offset, offset + len(pred))
    pred.file = "dask-array"
    return pred


# --- client side --------------------------------------------------------------------------
def _plan(
    paths: list[str], card: Any, layout: str, channels_last: bool, chunk_rows: int, keep_going: bool
) -> list[_Unit]:
    """Split inputs into units, in input order (the client must be able to read the files)."""
    units: list[_Unit] = []
    for index, (group, opener) in enumerate(open_inputs(paths, card, layout, channels_last, keep_going)):
        failing = getattr(opener, "error", None)
        if failing is not None:  # keep_going: missing, or of no known kind
            units.append(_Unit(index, "error", list(group), error=str(failing)))
            continue
        if getattr(opener, "images", False):
            reader = opener()  # lists the files (each row's file column is its own path)
            files, flagged = reader.files, reader.duplicate_rows()  # the same image twice, across tasks too
            reader.close()
            for s in range(0, len(files), chunk_rows):
                mine = flagged[np.searchsorted(flagged, s) : np.searchsorted(flagged, s + chunk_rows)] - s
                units.append(_Unit(index, "images", files[s : s + chunk_rows], dups=mine))
        elif input_kind(group[0]) == "hdf5":
            try:
                reader = opener()  # HDF5: count rows here, read them on the workers
            except StampclfError as exc:
                if not keep_going:
                    raise
                units.append(_Unit(index, "error", list(group), error=str(exc)))
                continue
            try:
                n = reader.n_rows
                # duplicate ids: the reader scanned the id column once, here; each unit gets its rows
                flagged = reader.duplicate_rows() if hasattr(reader, "duplicate_rows") else np.empty(0, np.int64)
            finally:
                reader.close()
            for s in range(0, max(n, 1), chunk_rows):
                e = min(s + chunk_rows, n)
                mine = flagged[np.searchsorted(flagged, s) : np.searchsorted(flagged, e)]
                units.append(_Unit(index, "hdf5", group, s, e, dups=mine))
        else:
            units.append(_Unit(index, row_inputs(opener) or "group", list(group)))
    return units


def _load_model(client: Any, model: Any) -> tuple[Any, str, Any]:
    path = resolve_model(model)
    card, data = read_card(path, verify=True)
    sha = hashlib.sha256(data).hexdigest()
    # One copy per worker, sent once; tasks refer to it by key.
    future = client.scatter(data, broadcast=True, hash=False)
    return card, sha, future


def _ordered(client: Any, submit: Any, items: list[Any], window: int) -> Iterator[tuple[Any, Any]]:
    """Submit ``submit(item)`` for every item, at most *window* in flight; yield results in order."""
    pending: collections.deque[tuple[Any, Any]] = collections.deque()
    it = iter(items)
    for item in it:
        pending.append((item, submit(item)))
        if len(pending) >= window:
            break
    while pending:
        item, fut = pending.popleft()
        try:
            result = fut.result()
        except BaseException:
            client.cancel([f for _, f in pending if not isinstance(f, _Ready)])
            raise
        del fut  # the cluster lets go of this result now, not at the end of the run
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, submit(nxt)))
        yield item, result


def _window(client: Any) -> int:
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that does not answer: a modest default
        threads = 4
    return max(4, 4 * threads)


def classify_dask(
    client: Any,
    inputs: Any,
    model: str | os.PathLike[str] = "hits",
    output: str | os.PathLike[str] | None = None,
    *,
    batch_size: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: str = "cpu",
    threads: int = 1,
    threshold: float | str | None = None,
    layout: str = "auto",
    channels_last: bool = False,
    keep_going: bool = False,
    precision: str = "fp32",
    prep: str = "auto",
) -> RunSummary:
    """Classify files (or a Dask array of stamps) on a Dask cluster into one output.

    Parameters
    ----------
    client
        A ``dask.distributed.Client``.
    inputs
        Paths (HDF5, Avro alerts, FITS, images, folders), readable at the same path
        from the client and every worker; or a Dask array ``(N, C, H, W)`` of raw
        stamps in the card's channel order (ids are row numbers).
    model
        Shipped model name or ``.onnx`` path, read on the client; its bytes are
        sent to each worker once.
    output
        ``.csv`` or ``.h5``; ``None`` or ``"-"`` for CSV on stdout. Written on the
        client, atomically, with the same columns as `classify_files`.
    batch_size
        Rows per inference call on the workers (default: the classifier's).
    chunk_rows
        Rows of an HDF5 file (or image files) per task.
    device, threads, threshold, precision, prep
        Per worker `Classifier`: ``threads`` intra-op threads (default 1: run one
        single-threaded worker process per core); ``prep="auto"``: each worker
        normalises stamps on its GPU when it runs on one, else on its CPU.
    keep_going
        Report an input that cannot be read and go on; its rows are left out.

    Returns
    -------
    RunSummary
        Rows, flagged/failed counts, file errors, seconds.
    """
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be at least 1, got {chunk_rows}")
    check_choice("layout", layout, LAYOUTS)
    output = None if output is None else os.fsdecode(output)
    t0 = time.perf_counter()
    card, sha, data = _load_model(client, model)
    threshold = resolve_threshold(card, threshold)  # before any task: every worker would fail the same way
    # batch_size None: each worker's Classifier takes the card's default
    options = _worker_options(device, threads, threshold, batch_size, precision, prep)
    summary = RunSummary(output=output)
    if _is_dask_array(inputs):
        results: Iterator[tuple[Any, Any]] = _array_results(client, inputs, data, sha, options)
        extra: tuple[str, ...] = ()
        n_paths: list[int] = []  # one input
    else:
        paths = input_paths(inputs)
        if not paths:
            raise InputError("no input files given")
        groups = open_inputs(paths, card, layout, channels_last, keep_going)
        n_paths = [len(g) for g, _ in groups]  # paths given per reader, as a local run counts them
        extra = tuple(dict.fromkeys(c for _g, op in groups for c in getattr(op, "extra_columns", ())))
        units = _plan(paths, card, layout, channels_last, chunk_rows, keep_going)
        settings = {
            "batch_size": batch_size,
            "layout": layout,
            "channels_last": channels_last,
            "keep_going": keep_going,
        }

        def submit(u: _Unit) -> Any:
            if u.kind == "error":
                return _Ready(("error", u.error))
            return client.submit(_score_unit, data, sha, options, settings, u, pure=False)

        results = _ordered(client, submit, units, _window(client))
    classes = list(card.classes)
    thr = (card.threshold if threshold is None else threshold) if card.is_binary else None
    attrs = run_attrs(thr, precision, f"{device} (requested of the Dask workers)", card.weights_sha256)
    writer = open_writer(output, classes, card.name, card.version, extra, attrs)
    try:
        current, failed_input, n_given = -1, False, 0
        tally = RunSummary()  # the current input's counts: added when it is complete, not if it fails

        def settle() -> None:
            if current >= 0 and not failed_input:
                if not tally.file_errors and current in unit_paths:  # as in a local run
                    tally.file_errors += unscored_input(unit_paths[current], tally.rows, tally.failed, first_failure)
                summary.files += n_given
                summary.rows += tally.rows
                summary.flagged += tally.flagged
                summary.failed += tally.failed
                summary.file_errors.extend(tally.file_errors)

        first_failure: str | None = None
        unit_paths: dict[int, list[str]] = {}
        for unit, res in results:
            if unit.index != current:
                settle()
                current, failed_input, tally, first_failure = unit.index, False, RunSummary(), None
                writer.mark()
                n_given = n_paths[unit.index] if n_paths else 1
            if failed_input:
                continue
            if isinstance(res, tuple) and res[0] == "salvaged":  # rows kept, the damaged ranges reported
                tally.file_errors.extend(e for e in res[2] if e not in tally.file_errors)  # once per input
                res = res[1]
            if isinstance(res, tuple):  # ("error", message) of a unit, keep_going
                failed_input = True
                summary.file_errors.append(res[1])
                if not writer.rollback():
                    summary.file_errors.append(f"rows of {res[1].split(':')[0]} were already written to stdout")
                continue
            tally.file_errors.extend(row_errors(unit.kind, res))  # as in a local run
            writer.write(res.ids, res.labels, res.proba, res.status, res.file, res.extra)
            tally.rows += len(res)
            n_flagged, n_failed, first = status_counts(res.status)
            tally.flagged, tally.failed = tally.flagged + n_flagged, tally.failed + n_failed
            first_failure = first_failure or first
            if unit.kind not in ROW_INPUTS:  # those report each row that is an input
                unit_paths.setdefault(unit.index, unit.paths)
        settle()
        finish(writer, summary)
    except BaseException:
        writer.abort()
        raise
    summary.seconds = time.perf_counter() - t0
    return summary


def _is_dask_array(obj: Any) -> bool:
    return type(obj).__module__.startswith("dask.array") and hasattr(obj, "to_delayed")


def _array_results(client: Any, stamps: Any, data: Any, sha: str, options: dict[str, Any]) -> Iterator[Any]:
    if stamps.ndim != 4:
        raise InputError(f"dask array: expected 4 axes (N, C, H, W), got shape {stamps.shape}")
    # one task per chunk of rows: every chunk holds whole stamps
    stamps = stamps.rechunk({1: -1, 2: -1, 3: -1})
    # Nothing is computed yet: each unit's graph computes its block and scores it, so only
    # the units in flight hold stamps on the cluster (the block is dropped once scored).
    from dask import delayed

    blocks = list(stamps.to_delayed().ravel())
    offsets = np.concatenate([[0], np.cumsum(stamps.chunks[0])[:-1]]).astype(int)
    items = [_Unit(0, "array", [], int(o), int(o) + int(n)) for o, n in zip(offsets, stamps.chunks[0], strict=True)]
    todo = dict(zip((id(i) for i in items), blocks, strict=True))
    del blocks
    score = delayed(_score_block, pure=False)

    def submit(u: _Unit) -> Any:
        return client.compute(score(data, sha, options, todo.pop(id(u)), u.start))

    yield from _ordered(client, submit, items, _window(client))


def predict_dask(
    client: Any,
    stamps: Any,
    model: str | os.PathLike[str] = "hits",
    *,
    batch_size: int | None = None,
    device: str = "cpu",
    threads: int = 1,
    threshold: float | str | None = None,
    precision: str = "fp32",
    prep: str = "auto",
) -> Predictions:
    """Classify a Dask array of raw stamps ``(N, C, H, W)`` on the cluster; results in memory.

    Returns one `Predictions` (ids are row numbers), in row order; options as `classify_dask`.
    """
    if not _is_dask_array(stamps):
        raise InputError(f"predict_dask: expected a dask array, got {type(stamps).__name__}")
    card, sha, data = _load_model(client, model)
    threshold = resolve_threshold(card, threshold)  # before any task: every worker would fail the same way
    options = _worker_options(device, threads, threshold, batch_size, precision, prep)
    preds = [res for _, res in _array_results(client, stamps, data, sha, options)]
    if not preds:
        return Predictions(np.empty(0, int), np.empty(0, object), np.empty((0, len(card.classes)), np.float32),
                           np.empty(0, object), file="dask-array", classes=tuple(card.classes), model=card.name,
                           model_version=card.version)  # fmt: skip
    return Predictions.concat(preds)


def _worker_options(
    device: str, threads: int, threshold: Any, batch_size: int | None, precision: str, prep: str
) -> dict[str, Any]:
    """The keyword arguments of each worker's `Classifier` (a bad *prep* fails here, before any task)."""
    check_choice("prep", prep, PREPS)
    return {"device": device, "threads": threads, "threshold": threshold, "batch_size": batch_size,
            "precision": precision, "prep": prep}  # fmt: skip


def connect(address: str) -> Any:
    """A ``dask.distributed.Client`` for ``--scheduler``: an address, or ``local[:N]`` for a local cluster of N processes."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("--scheduler needs Dask: pip install 'stampclf[dask]'") from None
    if address == "local" or address.startswith("local:"):
        n = address.partition(":")[2]
        if n and (not n.isdigit() or int(n) < 1):
            raise InputError(f"--scheduler {address}: expected local or local:N (N >= 1 workers)")
        from ._session import cpu_count

        workers = int(n) if n else cpu_count()
        return _local_client(Client, workers)
    try:
        return Client(address, timeout=10)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(f"--scheduler {address}: cannot connect ({exc.__class__.__name__}: {exc})") from None


def _local_client(client_cls: Any, workers: int) -> Any:
    """A client with its own local cluster of *workers* single-threaded processes, shut down when it closes.

    Ctrl-C goes to the whole process group. The worker processes are started with
    SIGINT ignored (`_start_ignoring_sigint`), so only this process is interrupted;
    it then closes the cluster without Dask's log lines of workers leaving and tasks
    cancelled.
    """

    class LocalClient(client_cls):  # type: ignore[misc, valid-type]
        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
            if exc_type is not None and not issubclass(exc_type, Exception):  # KeyboardInterrupt, SystemExit
                with _quiet_close():
                    return super().__exit__(exc_type, exc, tb)
            return super().__exit__(exc_type, exc, tb)

    def make() -> Any:
        # silence_logs: this cluster's log lines (memory use, a slow event loop, workers
        # and scheduler closing in either order) are not this command's: what goes wrong
        # in a task reaches the client as an exception. A cluster of your own logs as usual.
        # The scheduler's HTTP server (metrics) on a free local port, not 8787, which another
        # cluster on this machine may hold (Dask would warn on stderr and move).
        return LocalClient(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.CRITICAL,
        )  # fmt: skip

    return _start_ignoring_sigint(make, workers)


def _start_ignoring_sigint(make: Any, workers: int) -> Any:
    """``make()`` (a client that starts *workers* worker processes), the processes started with SIGINT ignored.

    A process inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt
    handler. So SIGINT is ignored here while ``make()``, in a thread, spawns the
    worker processes (a fraction of a second), and handled again while they start up:
    a Ctrl-C then interrupts, and the cluster is closed once it is up. With another
    multiprocessing start method than Dask's default ``spawn`` (no ``spawn_main``
    children to see), SIGINT stays ignored until the cluster is up. Outside the main
    thread (no signals to set) this is just ``make()``.
    """
    if threading.current_thread() is not threading.main_thread():
        return make()
    import psutil  # a dependency of distributed

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: interrupted, it can take a running thread for finished

    def run() -> None:
        try:
            box["client"] = make()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    def spawned() -> int:
        n = 0
        for p in me.children():
            with contextlib.suppress(psutil.Error):
                n += p.pid not in before and "spawn_main" in " ".join(p.cmdline())  # exec'd: it has its own signals
        return n

    thread = threading.Thread(target=run, name="stampclf-local-cluster", daemon=True)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        thread.start()
        while not done.wait(0.01) and spawned() < workers:
            pass
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    try:
        done.wait()
    except BaseException:  # interrupted while the workers start: close the cluster when it is up
        with _quiet_close():
            done.wait()
            if "client" in box:
                box["client"].close()
        raise
    if "error" in box:
        raise box["error"]
    return box["client"]


@contextlib.contextmanager
def _quiet_close() -> Iterator[None]:
    """Closing a cluster after an interrupt: no log records in this process, and a second Ctrl-C does not cut it short.

    (Cut short, the cluster is closed again at exit, with tracebacks.)
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(level)
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
