"""Classify files into one output: the library call behind ``stampclf classify``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ._errors import InputError, OutputError, StampclfError, check_choice
from .classifier import _NO_LABELS, Classifier, _positive_int, _why_no_labels
from .io import LAYOUTS, input_paths, open_inputs, open_writer, run_attrs
from .preprocess import OK

__all__ = ["RunSummary", "classify_files", "Progress"]


@dataclass
class RunSummary:
    """What a run did.

    Attributes
    ----------
    rows, flagged, failed
        Output rows, and how many of them are flagged or failed.
    seconds
        Wall time of the run.
    files
        Inputs that were classified.
    file_errors
        One line per input that failed or had rows it could not read (``--keep-going``).
    metrics
        The ``--evaluate`` figures (`Classifier.evaluate`), or None.
    output
        The output file, or None (stdout, or nothing written).
    """

    rows: int = 0
    flagged: int = 0
    failed: int = 0
    seconds: float = 0.0
    files: int = 0
    file_errors: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    output: str | None = None


class Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int | None, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.t0, self._last = total, 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        """Count *n* more rows and redraw at most 10 times a second."""
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.done != self.total):
            return
        self._last = now
        rate = self.done / max(now - self.t0, 1e-9)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            line = f"\r[{bar}] {self.done:,}/{self.total:,} {rate:,.0f} rows/s eta {eta:,.0f}s"
        else:
            line = f"\r{self.done:,} rows {rate:,.0f} rows/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _count_rows(groups: list[tuple[list[str], Any]]) -> int | None:
    import h5py

    total = 0
    for paths, opener in groups:
        if getattr(opener, "images", False):
            return None
        if getattr(opener, "error", None):  # cannot be opened: no rows
            continue
        try:
            with h5py.File(paths[0], "r") as f:
                total += max((d.shape[0] for d in f.values() if hasattr(d, "shape") and d.shape), default=0)
        except Exception:  # noqa: BLE001 - only an estimate for the bar; the reader reports real problems
            return None
    return total


def read_path_list(source: str) -> list[str]:
    """Input paths listed in *source*, one per line (``-``: standard input).

    Blank lines and lines starting with ``#`` are skipped; surrounding spaces are
    stripped. For more inputs than a command line holds (``find night/ -name '*.avro'``).
    """
    # a name that is not UTF-8 (Linux names are bytes) is read as os.fsdecode reads it, and opens
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        lines = (stdin.read().decode("utf-8", "surrogateescape") if stdin else sys.stdin.read()).splitlines()
    else:
        try:
            with open(source, encoding="utf-8", errors="surrogateescape") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            raise InputError(f"--files-from {source}: file does not exist") from None
        except OSError as exc:
            raise InputError(f"--files-from {source}: cannot read the list ({exc})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _check_output(output: str | None, paths: list[str]) -> None:
    """Refuse an output path that is one of the inputs (the rename would replace it)."""
    if output in (None, "-") or not os.path.exists(output):
        return
    for p in paths:
        if os.path.exists(p) and os.path.samefile(p, output):
            raise InputError(f"{output}: output would overwrite the input file {p}")


def classify_files(
    clf: Classifier,
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    layout: str = "auto",
    channels_last: bool = False,
    keep_going: bool = False,
    evaluate: bool = False,
    progress: bool | None = None,
) -> RunSummary:
    """Classify every input into one CSV/HDF5 output, written atomically.

    Parameters
    ----------
    clf
        The classifier.
    paths
        HDF5 files, image files or folders of images (or Avro alerts, FITS cut-outs),
        classified in this order; one path or several.
    output
        ``.csv`` or ``.h5`` path; ``None`` or ``"-"`` for CSV on stdout.
    keep_going
        Report a file that cannot be read and go on with the others (the run
        still ends with an error, listed in ``summary.file_errors``); otherwise
        every input is opened (and, with *evaluate*, its labels checked) before
        the first row is classified, and the first bad file stops the run with
        no output. A file that fails
        half-way contributes no rows (file outputs; rows already streamed to
        stdout cannot be taken back). An unreadable image is always kept as a
        ``failed`` row and reported as an input error (exit code 2 in the CLI),
        with or without *keep_going*. When no row could be scored because of
        input errors, no output file is written.
    evaluate
        Compute metrics against the inputs' labels.
    progress
        Show a progress bar (default: when stderr is a terminal).
    """
    paths = input_paths(paths)
    output = None if output is None else os.fsdecode(output)
    if not paths:
        raise InputError("no input files given")
    check_choice("layout", layout, LAYOUTS)
    batch_size = clf.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
    _check_output(output, paths)
    summary = RunSummary(output=output)
    groups = open_inputs(paths, clf.card, layout, channels_last, keep_going)
    bar = Progress(_count_rows(groups) if progress is not False else None, enabled=progress)
    y_true: list[np.ndarray] = []
    y_prob: list[np.ndarray] = []
    t0 = time.perf_counter()
    extra = tuple(dict.fromkeys(c for _g, op in groups for c in getattr(op, "extra_columns", ())))
    attrs = run_attrs(clf.threshold if clf.card.is_binary else None, clf.precision, clf.device, clf.card.weights_sha256)
    writer = open_writer(output, clf.classes, clf.name, clf.version, extra, attrs)
    try:
        if not keep_going:
            _check_inputs(clf, groups, evaluate)
        for group, opener in groups:
            writer.mark()
            rows = flagged = failed = 0
            first_failure: str | None = None
            truth: list[np.ndarray] = []
            prob: list[np.ndarray] = []
            try:
                reader = opener()
                if keep_going and hasattr(reader, "salvage"):
                    reader.salvage = True  # a damaged chunk fails its rows, not the whole file
                labels = "check" if evaluate else "skip"
                if evaluate and keep_going:  # no usable labels: classified all the same, not in the metrics
                    why = _labels_problem(clf, reader)
                    if why is not None:
                        summary.file_errors.append(f"{why}; its rows are classified but not in the metrics")
                        labels = "skip"
                elif evaluate:  # say so now, not after classifying it
                    _require_labels(reader)
                for pred in clf._classify_reader(reader, batch_size, labels):
                    summary.file_errors.extend(row_errors(row_inputs(opener), pred))
                    writer.write(pred.ids, pred.labels, pred.proba, pred.status, pred.file, pred.extra)
                    rows += len(pred)
                    n_flagged, n_failed, first = status_counts(pred.status)
                    flagged, failed = flagged + n_flagged, failed + n_failed
                    first_failure = first_failure or first
                    if evaluate and pred.true_labels is not None:
                        truth.append(pred.true_labels)
                        prob.append(pred.proba)
                    bar.update(len(pred))
                damaged = getattr(reader, "damaged", [])  # rows kept, as failed rows
                summary.file_errors.extend(damaged)
                if not damaged and not row_inputs(opener):  # those report each row that is an input
                    summary.file_errors.extend(unscored_input(group, rows, failed, first_failure))
            except OutputError:
                raise  # the output, not this input, is at fault: --keep-going cannot help
            except StampclfError as exc:
                if not keep_going:
                    raise
                summary.file_errors.append(str(exc))
                if not writer.rollback():
                    summary.file_errors.append(f"{rows} row(s) of the failed input were already written to stdout")
                continue
            summary.files += len(group)
            summary.rows += rows
            summary.flagged += flagged
            summary.failed += failed
            y_true.extend(truth)
            y_prob.extend(prob)
        if evaluate and summary.files and not y_true and not keep_going:  # before the output appears
            raise InputError(f"--evaluate: no labels in {', '.join(paths)} ({_NO_LABELS})")
        finish(writer, summary)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    if evaluate and y_true:
        summary.metrics = clf._evaluate_arrays(np.concatenate(y_true), np.concatenate(y_prob))
    return summary


def _no_labels(reader: Any) -> str:
    """The ``--evaluate`` error line of a reader without (usable) labels."""
    return f"--evaluate: {_why_no_labels(reader)}"


def _require_labels(reader: Any) -> None:
    """Refuse (and close) a reader without labels, for ``--evaluate``."""
    if not reader.has_labels:
        reader.close()
        raise InputError(_no_labels(reader))


def _labels_problem(clf: Classifier, reader: Any) -> str | None:
    """Why *reader*'s labels cannot be used for ``--evaluate`` (as its error line), or None."""
    if not reader.has_labels:
        return _no_labels(reader)
    try:
        clf._check_labels(reader)
    except InputError as exc:
        return str(exc)
    return None


def _check_inputs(clf: Classifier, groups: list[tuple[list[str], Any]], evaluate: bool) -> None:
    """Open every input once before classifying any.

    A bad file (unreadable, wrong shape; for ``--evaluate``: no labels, or labels
    that are not the model's classes) late in a night's list then fails the run at
    once, before any row is written.
    """
    for _paths, opener in groups:
        reader = opener()
        try:
            if evaluate:
                _require_labels(reader)
                clf._check_labels(reader)
        finally:
            reader.close()


def status_counts(status: Any) -> tuple[int, int, str | None]:
    """``(flagged, failed, first failed status)`` of a batch; only rows that are not ``ok`` are looked at one by one."""
    arr = np.asarray(status, dtype=object)
    others = [str(s) for s in arr[arr != OK].tolist()]
    failed = [s for s in others if s.startswith("failed")]
    return sum(s.startswith("flagged") for s in others), len(failed), failed[0] if failed else None


def unscored_input(paths: list[str], rows: int, failed: int, first: str | None) -> list[str]:
    """The error line of an input of which no row could be scored (none otherwise).

    Such an input is an error, as an unreadable image is: its failed rows stay in the output.
    """
    if rows and failed == rows:
        return [f"{', '.join(paths)}: none of its {rows} row(s) could be scored (e.g. {first})"]
    return []


#: Readers whose every row is an input of its own (`row_inputs`).
ROW_INPUTS = ("images", "fits_stamps")


def row_inputs(opener: Any) -> str:
    """``"images"`` or ``"fits_stamps"`` when each row of the opener's reader is an input of its own, else ``""``."""
    if getattr(opener, "images", False):
        return "images"
    return "fits_stamps" if getattr(opener, "fits_channels", False) else ""


def row_errors(kind: str, pred: Any) -> list[str]:
    """Input errors of a batch whose rows are inputs of their own (`row_inputs`); their rows stay, ``failed``.

    An image that cannot be read, or a stamp of per-channel FITS files that cannot be
    scored (a channel missing), is kept in the output as a failed row *and* reported as
    an input error, so the run ends with exit code 2 but nothing is dropped, wherever
    it stands among the other inputs.
    """
    if kind == "images":  # the status names the image
        return [str(s)[len("failed: ") :] for s in pred.status if str(s).startswith("failed")]
    if kind == "fits_stamps":
        return [
            f"{f}: stamp {i!r} could not be scored ({s})"
            for i, f, s in zip(pred.ids, pred._files(), pred.status, strict=True) if str(s).startswith("failed")
        ]  # fmt: skip
    return []


def finish(writer: Any, summary: RunSummary) -> None:
    """Commit the output, unless nothing at all could be scored because of input errors.

    An output with no scored row (every input failed, or one unreadable image) would
    look like a result; the errors already say what happened.
    """
    if summary.file_errors and summary.rows == summary.failed:  # on stdout: not even the header
        writer.abort()
        summary.output = None
    else:
        writer.commit()
