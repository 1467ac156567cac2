"""Result writers: CSV (file or stdout) and HDF5, written atomically.

A file output is written to a temporary file in the target folder and renamed
over the final name only when complete, so an interrupted run never leaves a
truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import sys
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from .._errors import InputError, OutputError
from ._csvtext import _csv_text, text_codes

__all__ = ["ResultWriter", "open_writer", "run_attrs", "OUTPUT_FORMATS", "columns_for"]

OUTPUT_FORMATS = ("csv", "h5")


def columns_for(classes: list[str], extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Output column names for a model with these classes (plus reader-specific *extra* columns at the end)."""
    return ["id", "label", *[f"p_{c}" for c in classes], "status", "model", "model_version", "file", *extra]


# 8,192-row chunks keep a small output small; gzip level 1 (any HDF5 reader has it)
# takes most off at a fraction of inference time
_H5_OPTS: dict[str, Any] = {"chunks": (8192,), "compression": "gzip", "compression_opts": 1, "shuffle": True}


_stdout_writes = 0


def stdout_writes() -> int:
    """How many times writers of this process have printed CSV on stdout: a change tells a
    caller that its run left rows there (what Ctrl-C cannot take back)."""
    return _stdout_writes


#: Longest text value (bytes) a fixed-width HDF5 column takes; a longer one makes the column variable-length
_MAX_FIXED = 1024


def _as_column(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Encoded text (numpy ``S``, or integers, written as their digits) as an array h5py writes into a column of *dtype*."""
    if values.dtype.kind in "iu":
        values = _encode(values)
    return np.asarray(values, dtype=dtype if dtype.kind == "S" else object)


def _integer_ids(ids: Any) -> np.ndarray | None:
    """*ids* as int64 when every one is an integer that fits (HDF5 id datasets, alert ``candid``), else None."""
    arr = np.asarray(ids)
    if arr.dtype.kind == "i" or (arr.dtype.kind == "u" and (arr.dtype.itemsize < 8 or not len(arr) or arr.max() < 2**63)):
        return arr.astype(np.int64)
    if arr.dtype.kind == "O" and len(arr):
        values = arr.tolist()  # numpy integers inside an object array stay numpy integers here
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and -(2**63) <= v < 2**63 for v in values):
            return np.array([int(v) for v in values], dtype=np.int64)
    return None


# Text is UTF-8. A file name that is not (Linux names are bytes) comes as lone surrogates
# (os.fsdecode) and is written as its own bytes, as on stdout: a CSV file and an HDF5
# column name the input the way the file system does
_TEXT: dict[str, str] = {"encoding": "utf-8", "errors": "surrogateescape"}


def _utf8(text: str) -> bytes:
    return text.encode(**_TEXT)


def _encode(values: Any) -> np.ndarray:
    """UTF-8 bytes (numpy ``S``) of ``str(v)`` for each value."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype("S")  # digits: the same text as str(), without a Python loop
    if arr.dtype.kind in "OU":
        return np.asarray([_utf8(str(v)) for v in arr.tolist()], dtype="S")
    return np.asarray([_utf8(str(v)) for v in arr], dtype="S")  # numpy's own str(), as in the CSV


def _encode_few(values: Any) -> np.ndarray:
    """`_encode` of labels or statuses (a few distinct texts): each distinct text encoded once."""
    arr = np.asarray(values)
    found = text_codes(arr.ravel()) if arr.dtype.kind in "OU" else None
    if found is None:
        return _encode(arr)
    codes, distinct = found
    return np.array([_utf8(s) for s in distinct] or [b""], dtype="S")[codes].reshape(arr.shape)


def _os_reason(exc: BaseException) -> str:
    """The reason of an OS or HDF5 I/O error, one line (HDF5 puts the OS's message inside its own)."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    return getattr(exc, "strerror", None) or (text.splitlines()[0] if text else repr(exc))


def _discard_h5(h5: Any) -> None:
    """Close an HDF5 file that is being thrown away, whatever state a failed write left it in.

    After a failed write (a full disk) HDF5 cannot flush its metadata on close, and
    the library then crashes the process at exit. The file is discarded anyway, so its
    descriptor is pointed at /dev/null first: the flush succeeds and goes nowhere.
    """
    with contextlib.suppress(Exception):
        fd = h5.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    with contextlib.suppress(Exception):
        h5.close()


def _create_part(path: str, folder: str) -> str:
    """Create an empty hidden ``.part`` file beside *path*, with the permissions the umask gives."""
    import secrets

    for _ in range(100):
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.part")
        try:
            # O_EXCL: never another run's file; mode 0o666 lets the kernel apply the umask
            # (reading the umask means setting it, which is not thread-safe)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except PermissionError:
            raise OutputError(f"{path}: no permission to write in {folder}") from None
        except OSError as exc:
            raise OutputError(f"{path}: cannot write in {folder} ({_os_reason(exc)})") from None
    raise OutputError(f"{path}: cannot create a temporary file in {folder}")


def _format_of(path: str | None) -> str:
    if path is None or path == "-" or path == os.devnull:
        return "csv"
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return "csv"
    if ext in (".h5", ".hdf5"):
        return "h5"
    raise InputError(f"{path}: unknown output format {ext or '(no extension)'!r}; use .csv, .h5 or -")


class ResultWriter:
    """Append prediction batches to CSV or HDF5; `commit` makes the file appear."""

    def __init__(
        self, path: str | None, classes: list[str], model: str, version: str, extra_columns: tuple[str, ...] = (),
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self.attrs = dict(attrs or {})  # run settings, stored as HDF5 file attributes
        # /dev/null (timing a run without keeping its rows) is written directly: never renamed over
        self.path = None if path in (None, "-", os.devnull) else str(path)
        self._devnull = path == os.devnull
        if self.path is not None and os.path.isdir(self.path):
            raise InputError(f"{self.path}: output path is a folder (give a .csv or .h5 file name)")
        self.format = _format_of(path)
        self.classes = list(classes)
        self.extra_columns = tuple(extra_columns)
        self.model, self.version = model, version
        self.rows = 0
        self._mark: int | None = None
        self._mark_rows = 0
        self._mark_id: np.dtype | None = None
        self._tmp: str | None = None
        self._fh: IO[str] | None = None
        self._h5: Any = None
        if self.path is not None:
            folder = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(folder):
                raise OutputError(f"{self.path}: output folder {folder} does not exist")
            self._tmp = _create_part(self.path, folder)
        try:
            if self.format == "csv":
                self._fh = (
                    open(self._tmp, "w", newline="", **_TEXT) if self._tmp  # noqa: SIM115 - closed by commit/abort
                    else open(os.devnull, "w") if self._devnull  # noqa: SIM115
                    else sys.stdout
                )
                self._csv = csv.writer(self._fh, lineterminator="\n")
                # on stdout the header waits for the first row or the commit, so that a run
                # refused before its first row prints nothing that looks like an empty result
                self._header_due = True
                if self._tmp:
                    self._write_header()
            else:
                self._open_h5()
        except OSError as exc:  # e.g. no file locks on a network file system: no stray .part left
            self.abort()
            raise OutputError(f"{self.path}: cannot create the output ({_os_reason(exc)})") from None

    def _write_header(self) -> None:
        global _stdout_writes
        if self._tmp is None and not self._devnull:
            _stdout_writes += 1
        if self._header_due:
            self._csv.writerow(columns_for(self.classes, self.extra_columns))
            self._header_due = False

    def _open_h5(self) -> None:
        import h5py

        # a chunk cache that holds a whole chunk of the widest column: batches fill a chunk
        # in memory and it is compressed once, not read back and recompressed per batch
        self._h5 = h5py.File(self._tmp, "w", rdcc_nbytes=16 << 20)
        self._h5.attrs["model"] = self.model
        self._h5.attrs["model_version"] = self.version
        self._h5.attrs["classes"] = self.classes
        for key, value in self.attrs.items():
            self._h5.attrs[key] = value
        self._proba = [
            self._h5.create_dataset(f"p_{c}", (0,), maxshape=(None,), dtype="f4", **_H5_OPTS) for c in self.classes
        ]
        # text columns are created by the first batch, which sets their width
        self._text: dict[str, tuple[Any, np.dtype]] = {}
        self._text_columns = ("id", "label", "status", "model", "model_version", "file", *self.extra_columns)

    def _write_text(self, name: str, values: np.ndarray) -> None:
        """Append encoded *values* to the text column *name*, widening it when needed.

        Fixed-width UTF-8 instead of HDF5 variable-length strings: those keep every
        value in the file's global heap, outside the compressed chunks (about 35 bytes
        a row per column whatever the text), while null-padded fixed-width values
        compress to almost nothing when they repeat (model, version, file, "ok"). A
        value longer than `_MAX_FIXED` bytes (a long error message) turns its column
        into variable-length strings for good: padding every row to it would cost more.
        """
        import h5py

        width = max(values.dtype.itemsize, 1)
        ds, dtype = self._text.get(name, (None, None))
        if dtype is not None and dtype.kind in "iu":
            width = max(width, 20)  # the digits of any int64 already in the column
        # an integer id column (`_write_ids`) becomes text when the first id that is not an integer comes
        if ds is None or dtype.kind in "iu" or (dtype.kind == "S" and dtype.itemsize < width):
            if width > _MAX_FIXED:
                dtype = h5py.string_dtype("utf-8")
                opts = _H5_OPTS
            else:  # round up so that a column is rewritten only a few times however its values grow
                dtype = h5py.string_dtype("utf-8", max(16, 1 << (width - 1).bit_length()))
                # a wide column gets shorter chunks: a chunk stays within the chunk cache
                opts = {**_H5_OPTS, "chunks": (max(1, min(8192, (1 << 20) // dtype.itemsize)),)}
            tmp = self._h5.create_dataset(f"{name}.widen", (self.rows,), maxshape=(None,), dtype=dtype, **opts)
            for start in range(0, self.rows, 65_536):  # in slices: memory stays flat on a long run
                tmp[start : start + 65_536] = _as_column(ds[start : start + 65_536], dtype)
            if ds is not None:
                del self._h5[name]
            self._h5.move(f"{name}.widen", name)
            ds = self._h5[name]
            self._text[name] = (ds, dtype)
        ds.resize((self.rows + len(values),))
        ds[self.rows :] = _as_column(values, dtype)

    def write(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        proba: np.ndarray,
        status: np.ndarray,
        file: str | Any,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append one batch of rows; *file* is one name or one per row; *extra* fills the extra columns."""
        with self._output_errors():
            self._write(ids, labels, proba, status, file, extra)

    def _write_ids(self, ids: Any) -> None:
        """The id column: int64 while every id is an integer (joins need no parsing), else UTF-8 text."""
        as_int = _integer_ids(ids)
        ds, dtype = self._text.get("id", (None, None))
        if as_int is None or (ds is not None and dtype.kind not in "iu"):
            self._write_text("id", _encode(ids))
            return
        if ds is None:
            ds = self._h5.create_dataset("id", (self.rows,), maxshape=(None,), dtype="i8", **_H5_OPTS)
            self._text["id"] = (ds, ds.dtype)
        ds.resize((self.rows + len(as_int),))
        ds[self.rows :] = as_int

    def _restore_id_type(self) -> None:
        """After a rollback: integer ids that the dropped rows had turned into text are integers again."""
        import h5py

        ds, dtype = self._text.get("id", (None, None))
        then = self._mark_id
        if ds is None or dtype.kind in "iu" or (then is not None and then.kind not in "iu"):
            return
        if then is None:  # no id column at the mark: the next rows make it anew
            del self._h5["id"]
            del self._text["id"]
            return
        tmp = self._h5.create_dataset("id.retype", (self._mark_rows,), maxshape=(None,), dtype="i8", **_H5_OPTS)
        for start in range(0, self._mark_rows, 65_536):  # in slices: memory stays flat
            part = ds[start : start + 65_536]
            tmp[start : start + 65_536] = [int(v) for v in part.tolist()] if h5py.check_string_dtype(ds.dtype) else part
        del self._h5["id"]
        self._h5.move("id.retype", "id")
        self._text["id"] = (self._h5["id"], np.dtype("i8"))

    def _write(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        proba: np.ndarray,
        status: np.ndarray,
        file: str | Any,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        n = len(ids)
        more = [[str(v) for v in (extra or {}).get(c, [""] * n)] for c in self.extra_columns]
        files = [file] * n if isinstance(file, str) else [str(f) for f in file]
        if len(files) != n:
            raise ValueError(f"{len(files)} file names for {n} rows")
        if self._h5 is not None:
            if n == 0:
                return
            # constant columns are encoded once and broadcast
            const = [np.array(_utf8(v)) for v in (self.model, self.version)]
            per_file = np.array(_utf8(file)) if isinstance(file, str) else _encode(files)
            self._write_ids(ids)
            texts = [_encode_few(labels), _encode_few(status), *const, per_file]
            for name, values in zip(self._text_columns[1:], [*texts, *map(_encode, more)], strict=True):
                self._write_text(name, np.broadcast_to(values, (n,)))
            for k, ds in enumerate(self._proba):
                ds.resize((self.rows + n,))
                ds[self.rows :] = proba[:, k]
        else:
            self._write_header()
            # a single file name is a constant field; per-row names are the first varying one
            fixed = [self.model, self.version, file] if isinstance(file, str) else [self.model, self.version]
            varying = more if isinstance(file, str) else [files, *more]
            text = _csv_text(ids, labels, proba, status, fixed, varying, self.classes)
            if text is not None:
                self._fh.write(text)  # type: ignore[union-attr]
            else:  # some field needs CSV quoting: let the csv module do it
                fmt = [[("" if not np.isfinite(v) else f"{v:.7g}") for v in row] for row in proba.tolist()]
                self._csv.writerows(
                    [str(i), str(lab), *p, str(s), self.model, self.version, f, *e]
                    for i, lab, p, s, f, *e in zip(ids, labels, fmt, status, files, *more, strict=True)
                )
        self.rows += n

    def mark(self) -> None:
        """Remember the current end of the output; `rollback` returns to it."""
        with self._output_errors():
            self._mark_here()

    def _mark_here(self) -> None:
        # the id column's type: the rows of a failed input may have turned integer ids into text
        self._mark_id = self._text.get("id", (None, None))[1] if self._h5 is not None else None
        if self._fh is not None and self._tmp:
            self._fh.flush()
            self._mark = self._fh.tell()
        else:
            self._mark = None
        self._mark_rows = self.rows

    def rollback(self) -> bool:
        """Drop the rows written since `mark` (e.g. of an input that failed half-way).

        Returns False when that is impossible (CSV on stdout: those rows are already out).
        """
        with self._output_errors():
            return self._rollback()

    def _rollback(self) -> bool:
        if self._h5 is not None:
            for name in self._h5:
                self._h5[name].resize((self._mark_rows,))
            self._restore_id_type()
        elif self._tmp and self._fh is not None and self._mark is not None:
            self._fh.flush()
            self._fh.seek(self._mark)
            self._fh.truncate()
        elif self.rows != self._mark_rows and not self._devnull:
            return False
        self.rows = self._mark_rows
        return True

    def commit(self) -> None:
        """Finish the output and move it under its final name."""
        with self._output_errors():
            self._commit()

    @contextlib.contextmanager
    def _output_errors(self) -> Iterator[None]:
        """A failed write (disk full, read-only file system) as one line naming the output."""
        try:
            yield
        except BrokenPipeError:
            raise  # stdout's reader went away (e.g. `| head`): the CLI ends quietly
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for some failed flushes
            raise OutputError(f"{self.path or 'stdout'}: cannot write the output ({_os_reason(exc)})") from None

    def _commit(self) -> None:
        if self._h5 is not None:
            for name in self._text_columns:  # an output without rows still has every column
                if name not in self._h5:
                    self._write_text(name, np.empty(0, "S1"))
            # flush first: a failure (disk full) then leaves the file open for `abort` to
            # discard safely; one inside close() leaves HDF5 unable to close it at all
            self._h5.flush()
            self._h5.close()
            self._h5 = None
        if self._fh is not None:
            self._write_header()
            self._fh.flush()
            if self._tmp:
                os.fsync(self._fh.fileno())
            if self._tmp or self._devnull:
                self._fh.close()
            self._fh = None
        if self._tmp:
            os.replace(self._tmp, self.path)  # type: ignore[arg-type]
            self._tmp = None

    def abort(self) -> None:
        """Drop the partial output; the final name is left untouched."""
        try:
            if self._h5 is not None:
                _discard_h5(self._h5)
            if self._fh is not None and (self._tmp or self._devnull):
                with contextlib.suppress(OSError):  # a full disk fails the flush too: the file goes anyway
                    self._fh.close()
        finally:
            self._h5 = self._fh = None
            if self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def open_writer(
    path: str | None, classes: list[str], model: str, version: str, extra_columns: tuple[str, ...] = (),
    attrs: dict[str, Any] | None = None,
) -> ResultWriter:
    """A `ResultWriter` for *path* (``None`` or ``"-"``: CSV on stdout); *attrs* go into an HDF5 output's attributes."""
    return ResultWriter(path, classes, model, version, extra_columns, attrs)


def run_attrs(
    threshold: float | None, precision: str, device: str, weights_sha256: str | None = None
) -> dict[str, Any]:
    """The settings that decide an output's labels, for its HDF5 attributes.

    *threshold* is None for multiclass models (labels are the most probable class);
    *weights_sha256* (the card's) tells two models of one name and version apart.
    """
    from .. import __version__

    out: dict[str, Any] = {"stampclf_version": __version__, "precision": precision, "device": device}
    if weights_sha256:
        out["model_weights_sha256"] = weights_sha256
    if threshold is not None:
        out["threshold"] = float(threshold)
    return out
