"""HDF5 stamp files: HiTS layout (one dataset per channel) and stacked layout."""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import InputError, StampclfError, check_choice, open_failure
from .._pinned import pin, unpin
from ..preprocess import OK, merge_status, text_column
from ._base import DUPLICATE_ID, InputBatch, duplicate_rows
from ._cutouts import DERIVED_SNR, derive_snr_rows

__all__ = ["HDF5Reader", "LAYOUTS"]

#: Blocks a reader keeps for reuse: the one being filled, one waiting for room in the
#: prefetch queue, the queue's two (`stampclf.classifier`), one on the device thread, one
#: being written, one just written; and one to spare. Only as many as are ever in use at
#: once are made.
_RECYCLED_BLOCKS = 8

LAYOUTS = ("auto", "channels", "stacked")
_ID_NAMES = ("ID", "id", "ids", "candid")
_LABEL_NAMES = ("labels", "label")
_STACKED_NAME = "stamps"
#: the options of `HDF5Reader` as ``stampclf classify`` spells them, for error messages
CLI_HINTS = {"layout": "--layout {}", "channels_last": "--channels-last"}
#: Largest read block (bytes of stamps); larger chunks are read batch by batch.
MAX_BLOCK_BYTES = 64 * 2**20
# what h5py raises on damaged files (truncated, corrupt metadata or chunks)
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _open(path: str) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        failure = open_failure(path, exc)
        if failure is not None:
            raise failure from None
        text = str(exc)
        if "signature" in text or "file signature" in text:
            raise InputError(f"{path}: not an HDF5 file") from None
        if "unable to lock file" in text:  # HDF5's own lock: another process has it open to write
            raise InputError(
                f"{path}: locked by another process that has it open for writing (still being written?); "
                "classify it once it is closed (HDF5_USE_FILE_LOCKING=FALSE reads it anyway, at the risk of "
                "reading it half-written)"
            ) from None
        raise InputError(f"{path}: cannot open as HDF5 (truncated or corrupt: {text})") from None


class HDF5Reader:
    """Stream stamps from an HDF5 file in batches.

    Parameters
    ----------
    path
        HDF5 file.
    card_input
        The model card's ``input`` section: ``channels`` and, for the per-channel
        layout, ``hdf5_datasets`` (dataset name of each channel, in order).
    layout
        ``"auto"``, ``"channels"`` (one dataset per channel, e.g. HiTS
        ``temp_images``...) or ``"stacked"`` (``stamps`` of shape (N, C, H, W)).
    channels_last
        The stacked dataset is (N, H, W, C).
    hints
        How the caller spells the *layout* and *channels_last* options in error messages
        (default: ``stampclf classify``'s flags, `CLI_HINTS`).
    """

    def __init__(
        self, path: str, card_input: dict[str, Any], layout: str = "auto", channels_last: bool = False,
        duplicates: np.ndarray | None = None, hints: dict[str, str] | None = None,
    ) -> None:
        self._hints = hints or CLI_HINTS
        check_choice("layout", layout, LAYOUTS)
        self.path = str(path)
        self._fd: int | None = None  # a duplicate of h5py's descriptor (`_own_fd`): direct reads, read-ahead hints
        #: set by the caller (``--keep-going``): unreadable rows become failed rows, listed in `damaged`
        self.salvage = False
        # (channel position, position of the difference channel) when the file has no
        # snr_difference dataset and it is derived from the difference
        self._derive: tuple[int, int] | None = None
        self.damaged: list[str] = []
        #: read the labels beside the rows; a caller with no use for them turns it off, so that
        #: a damaged labels chunk cannot fail rows it does not concern
        self.with_labels = True
        self._reading: str | None = None  # the dataset being read, for error messages
        self._names: dict[int, str] = {}  # h5py asks HDF5 for a name each time (~3 us); asked once a block
        self._scratch: np.ndarray | None = None  # reused read buffer (see _read_block)
        self._blocks: list[np.ndarray] = []  # recycled block arrays (see _block_buffer)
        self._unused = [np.empty(0)]  # an array nothing refers to: the baseline of _block_buffer's count
        #: page-lock the recycled blocks (`stampclf._pinned`): set by a caller that uploads the
        #: batches to a GPU as they are; undone at `close`
        self.pin_blocks = False
        self._file = _open(self.path)
        try:
            self._setup(card_input, layout, channels_last, duplicates)
        except StampclfError:
            self._file.close()
            raise
        except _H5_ERRORS as exc:
            self._file.close()
            raise InputError(f"{self.path}: cannot read HDF5 file (truncated or corrupt: {_one_line(exc)})") from None
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------------------
    def _dataset(self, name: str) -> Any:
        import h5py

        obj = self._file.get(name)
        if obj is None:
            return None
        if not isinstance(obj, h5py.Dataset):
            raise InputError(f"{self.path}: {name!r} is a group, not a dataset")
        return obj

    def _setup(
        self, card_input: dict[str, Any], layout: str, channels_last: bool, duplicates: np.ndarray | None
    ) -> None:
        names: list[str] = list(card_input.get("hdf5_datasets") or card_input["channels"])
        self.channels = list(card_input["channels"])
        h, w = int(card_input["height"]), int(card_input["width"])
        if layout == "auto":
            per_channel = [n for n in names if self._dataset(n) is not None]
            if self._dataset(_STACKED_NAME) is not None:
                if per_channel:  # two sets of stamps: guessing would silently classify one of them
                    raise InputError(
                        f"{self.path}: both a {_STACKED_NAME!r} dataset and per-channel datasets "
                        f"{per_channel}; choose one with {self._hints['layout'].format('stacked')} or "
                        f"{self._hints['layout'].format('channels')}"
                    )
                layout = "stacked"
            elif per_channel:
                layout = "channels"
            else:
                found = ", ".join(sorted(self._file.keys())) or "nothing"
                raise InputError(
                    f"{self.path}: unknown layout: no {_STACKED_NAME!r} dataset and none of "
                    f"{names} (found: {found})"
                )
        self.layout = layout
        if layout == "stacked":
            ds = self._dataset(_STACKED_NAME)
            if ds is None:
                raise InputError(f"{self.path}: dataset {_STACKED_NAME!r} not found")
            if ds.ndim != 4:
                raise InputError(
                    f"{self.path}: dataset {_STACKED_NAME!r} has shape {ds.shape}; expected "
                    f"(N, C, H, W){' channels-last (N, H, W, C)' if channels_last else ''}"
                )
            n_ch = ds.shape[3] if channels_last else ds.shape[1]
            if n_ch != len(self.channels):
                raise InputError(
                    f"{self.path}: dataset {_STACKED_NAME!r} has {n_ch} channel(s) (shape {ds.shape}) "
                    f"but the model needs {len(self.channels)}: {self.channels}"
                    + ("" if channels_last or ds.shape[3] != len(self.channels)
                       else f" (channels-last data? use {self._hints['channels_last']})")
                    + (" (channels-first data? leave out the channels-last option)"
                       if channels_last and ds.shape[1] == len(self.channels) else "")
                )
            self._datasets = [ds]
            self._channels_last = channels_last
            c, hh, ww = (ds.shape[3], *ds.shape[1:3]) if channels_last else ds.shape[1:]
            self._row_shape: tuple[int, ...] = (int(c), int(hh), int(ww))
        else:
            missing = [n for n in names if self._dataset(n) is None]
            at = names.index(missing[0]) if len(missing) == 1 else -1
            diff = self.channels.index("difference") if "difference" in self.channels else -1
            if missing and not (at >= 0 and diff >= 0 and self.channels[at] == "snr_difference"):
                raise InputError(f"{self.path}: missing dataset(s) {missing} for channels {self.channels}")
            if missing:  # as for alert packets: difference / its robust noise, and every row flagged
                self._derive = (at, diff)
                names = [n for n in names if n != missing[0]]
            self._datasets = [self._dataset(n) for n in names]
            lengths = {n: d.shape[0] if d.ndim else 0 for n, d in zip(names, self._datasets, strict=True)}
            if len(set(lengths.values())) > 1:
                raise InputError(f"{self.path}: channel datasets disagree in length: {lengths}")
            for n, d in zip(names, self._datasets, strict=True):
                if d.ndim not in (2, 3):
                    raise InputError(
                        f"{self.path}: dataset {n!r} has shape {d.shape}; expected (N, H, W) or (N, H*W)"
                    )
                if d.ndim == 2 and math.isqrt(d.shape[1]) ** 2 != d.shape[1]:
                    raise InputError(
                        f"{self.path}: dataset {n!r} has shape {d.shape}: {d.shape[1]} pixels per "
                        f"row is not a square stamp (expected {h * w} for {h}x{w})"
                    )
            sizes = {
                n: d.shape[1:] if d.ndim == 3 else (math.isqrt(d.shape[1]),) * 2
                for n, d in zip(names, self._datasets, strict=True)
            }
            if len(set(sizes.values())) > 1:
                raise InputError(f"{self.path}: channel datasets disagree in stamp size: {sizes}")
            self._row_shape = (len(self.channels), *(int(v) for v in next(iter(sizes.values()))))
        for d in self._datasets:
            if d.dtype.kind not in "fiu":
                raise InputError(f"{self.path}: dataset {d.name!r} has dtype {d.dtype}; expected numbers")
        # each dataset's channel in a block (the derived SNR channel has no dataset), and the block's dtype
        at = self._derive[0] if self._derive is not None else len(self._datasets)
        self._slots = [k if k < at else k + 1 for k in range(len(self._datasets))]
        self._direct = [_direct_layout(self._file, d) for d in self._datasets]
        derived = [np.dtype(np.float32)] if self._derive is not None else []
        self._block_dtype = np.result_type(*(d.dtype for d in self._datasets), *derived)
        self.n_rows = int(self._datasets[0].shape[0])
        self._ids = self._find(_ID_NAMES, "ids")
        try:
            self._labels = self._find(_LABEL_NAMES, "labels")
        except InputError as exc:
            # another labelling scheme (one-hot, several per row) is no reason to refuse
            # a file; only --evaluate needs labels, and it says why these are not usable
            self._labels = None
            self.why_no_labels = str(exc).removeprefix(f"{self.path}: ")
        self.has_labels = self._labels is not None
        # Duplicate ids are kept (one output row per input row) but flagged; reading the
        # 1-D id column once is cheap next to the stamps. A caller that scanned it already
        # (Dask: once per input, not once per unit of work) passes the flagged rows.
        self._dup: np.ndarray | None = None
        if duplicates is None:
            self._dup = duplicate_rows(self._ids[()]) if self._ids is not None else None
        elif len(duplicates):
            self._dup = np.zeros(self.n_rows, dtype=bool)
            self._dup[np.asarray(duplicates, dtype=np.int64)] = True

    @property
    def row_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one stamp as the file stores it (before any crop or pad to the model's size)."""
        return self._row_shape

    def duplicate_rows(self) -> np.ndarray:
        """Row numbers whose id appeared in an earlier row (flagged ``duplicate id``)."""
        return np.flatnonzero(self._dup) if self._dup is not None else np.empty(0, np.int64)

    def _find(self, candidates: tuple[str, ...], what: str) -> Any:
        present = [n for n in candidates if n in self._file]
        spellings = [n.lower().rstrip("s") for n in present]  # 'ID', 'id', 'ids' are one name; 'candid' another
        if len(set(spellings)) < len(spellings):  # which one is meant is a guess: refuse rather than pick
            raise InputError(f"{self.path}: several {what} datasets {present}; keep one (read as {what}: {candidates})")
        for name in candidates:
            ds = self._dataset(name)
            if ds is not None:
                if ds.ndim != 1 or ds.shape[0] != self.n_rows:
                    raise InputError(
                        f"{self.path}: {what} dataset {name!r} has shape {ds.shape}; expected "
                        f"({self.n_rows},), one value per stamp"
                    )
                return ds
        return None

    def read_labels(self) -> np.ndarray | None:
        """The whole labels column (1-D, small next to the stamps), or None."""
        if self._labels is None:
            return None
        try:
            return self._labels[()]
        except _H5_ERRORS as exc:
            raise InputError(
                f"{self.path}: cannot read dataset {self._labels.name.lstrip('/')!r} "
                f"(truncated or corrupt HDF5: {_one_line(exc)})"
            ) from None

    # ------------------------------------------------------------------------------
    def read_block(self, start: int, stop: int) -> InputBatch:
        """Rows ``start:stop`` as a batch of raw stamps.

        Raises
        ------
        InputError
            If h5py cannot read the rows (a truncated or corrupt file), naming the file.
        """
        try:
            return self._read_block(start, stop)
        except _H5_ERRORS as exc:
            where = f" of dataset {self._reading.lstrip('/')!r}" if self._reading else ""
            raise InputError(
                f"{self.path}: cannot read rows {start}-{stop - 1}{where} (truncated or corrupt HDF5: {_one_line(exc)})"
            ) from None

    def _read_block(self, start: int, stop: int) -> InputBatch:
        if self.layout == "stacked":
            self._reading = self._name(self._datasets[0])
            block = self._datasets[0][start:stop]
            stamps = np.moveaxis(block, 3, 1) if self._channels_last else block
        else:
            # The block is channel-major, (C, n, H, W): each channel is read straight into its
            # own contiguous slab, and the batch is a (n, C, H, W) view of it. No copy into
            # (N, C) order on the host: host normalisation reads the rows in this order, and
            # the device graph takes channel-major input (`stampclf._session.BatchRunner`).
            # HDF5Reader.batches, 200,000 HiTS stamps: 500,000-720,000 stamps/s against
            # 130,000-210,000 reading into a scratch buffer and copying into (N, C) order.
            # Blocks are recycled (`_block_buffer`): no fresh pages per block.
            n, dtype = stop - start, self._block_dtype
            block = self._block_buffer((self._row_shape[0], n, *self._row_shape[1:]), dtype)
            for k, d, direct in zip(self._slots, self._datasets, self._direct, strict=True):
                self._reading = self._name(d)
                dest = block[k].reshape(n, *d.shape[1:])  # a view: the slab is contiguous
                if d.dtype == dtype:
                    self._read_into(d, direct, start, stop, dest)
                else:  # read as stored, cast by numpy: the same conversion as for arrays in memory
                    part = _read_rows(d, start, stop, self._scratch)
                    self._scratch = part if part.base is None else part.base
                    dest[...] = part
            stamps = block.transpose(1, 0, 2, 3)
            if self._derive is not None:
                at, diff = self._derive
                stamps[:, at] = derive_snr_rows(stamps[:, diff])
        return self._batch(start, stop, stamps)

    def _name(self, ds: Any) -> str:
        """The path of a dataset of this file, asked of HDF5 once."""
        name = self._names.get(id(ds))
        if name is None:
            name = self._names[id(ds)] = ds.name
        return name

    def _read_into(self, ds: Any, direct: tuple[int, int] | None, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` of *ds* into *out* (C-contiguous, the dataset's dtype).

        Where the rows lie in the file as they are in memory (`_direct_layout`), they are
        read with ``os.preadv``, which lets go of the GIL while it copies: h5py holds it
        for the whole of a read, and the writer and inference threads then wait (on a GPU
        the reader and the CSV writer took turns). Elsewhere, and for a chunk never
        written (h5py gives its fill value), h5py reads.
        """
        fd = self._own_fd() if direct is not None and _DIRECT else None
        if fd is None:
            _read_rows(ds, start, stop, out=out)
            return
        rows, row_bytes = direct
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if not rows:  # contiguous: one range
            _pread_exact(fd, buf, ds.id.get_offset() + start * row_bytes)
            return
        # (file offset, first byte in buf, bytes): chunks that follow each other in the file are
        # one read, since each read gives the GIL back and must wait to take it again
        pieces: list[list[int]] = []
        rest = (0,) * (len(ds.shape) - 1)  # not ds.ndim: h5py's takes ~9 us, twice a chunk's lookup
        for c0 in range(start - start % rows, stop, rows):
            a, b = max(start, c0), min(stop, c0 + rows)
            info = ds.id.get_chunk_info_by_coord((c0, *rest))
            if info.byte_offset is None:
                ds.read_direct(out, np.s_[a:b], np.s_[a - start : b - start])
                continue
            offset, first, size = int(info.byte_offset) + (a - c0) * row_bytes, (a - start) * row_bytes, (b - a) * row_bytes
            if pieces and pieces[-1][0] + pieces[-1][2] == offset and pieces[-1][1] + pieces[-1][2] == first:
                pieces[-1][2] += size
            else:
                pieces.append([offset, first, size])
        for offset, first, size in pieces:
            _pread_exact(fd, buf[first : first + size], offset)

    def _own_fd(self) -> int | None:
        """A duplicate of the descriptor h5py opened (None where there is none to have).

        Not the path opened again: a symbolic link retargeted, a file renamed over it or a
        changed working folder would give another file's bytes under this file's ids.
        """
        if self._fd is None:
            self._fd = -1  # other drivers (core, stdio...) have no descriptor of their own: h5py reads
            if self._file.driver == "sec2":
                try:
                    self._fd = os.dup(self._file.id.get_vfd_handle())
                except Exception:  # noqa: BLE001, S110 - e.g. out of descriptors: h5py reads everything
                    pass
        return None if self._fd < 0 else self._fd

    def _block_buffer(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array to fill with a block: a recycled one when nothing refers to it any more.

        Batches are views of their block, and a numpy view holds a reference to the array
        it views, so a block whose only references are this reader's list (and this
        loop's) is one no batch uses: it is safe to overwrite. Otherwise a new array.
        """
        # The references of an array nothing else uses, counted the same way now (a list, the
        # loop variable, getrefcount's argument): the baseline differs between Python
        # versions (3.14 borrows the loop variable's), so it is measured, not assumed.
        for unused in self._unused:
            free = sys.getrefcount(unused)
        for buf in self._blocks:
            # a batch, a view or a consumer anywhere adds a reference
            if buf.shape == shape and buf.dtype == dtype and sys.getrefcount(buf) <= free:
                return buf
        buf = np.empty(shape, dtype)
        if len(self._blocks) < _RECYCLED_BLOCKS:
            self._blocks.append(buf)
            if self.pin_blocks:  # only kept blocks: they live until close() unpins them
                pin(buf)
        return buf

    def _batch(self, start: int, stop: int, stamps: np.ndarray, failed: str | None = None) -> InputBatch:
        """Rows ``start:stop`` with *stamps*: ids, labels and statuses read beside them."""
        if self._ids is not None:
            self._reading = self._name(self._ids)
            ids = self._ids[start:stop]
            if ids.dtype.kind in "SO":
                ids = np.array(
                    [i.decode(errors="replace") if isinstance(i, bytes) else str(i) for i in ids], dtype=object
                )
        else:
            ids = np.arange(start, stop)
        labels = None
        if self._labels is not None and self.with_labels:
            self._reading = self._name(self._labels)
            labels = self._labels[start:stop]
        status = None
        if failed is not None:
            status = text_column(stop - start, f"failed: {failed}")
        elif self._dup is not None and self._dup[start:stop].any():
            status = np.where(self._dup[start:stop], DUPLICATE_ID, OK).astype(object)
        if self._derive is not None and failed is None:
            derived = text_column(stop - start, f"flagged: {DERIVED_SNR}")
            status = derived if status is None else merge_status(status, derived)
        return InputBatch(ids=ids, stamps=stamps, labels=labels, status=status)

    def read_rows(self, start: int, stop: int) -> InputBatch:
        """`read_block`, or with `salvage` set, the block with its unreadable rows as failed rows.

        The block is read again in pieces so that only damaged rows fail: a chunk at a
        time, or for contiguous stamps, in halves down to pieces of `_SALVAGE_ROWS` rows. Each
        damaged range is recorded in `damaged`. Where the ids or labels of those rows
        cannot be read either, the error stands.
        """
        try:
            return self.read_block(start, stop)
        except InputError as exc:
            if not self.salvage:
                raise
            error = exc
        # chunked: pieces that never straddle a chunk of any stamp dataset, on multiples of the
        # gcd of their chunk lengths; a damaged chunk is named whole, whatever rows were asked for
        chunked = math.gcd(*(d.chunks[0] for d in self._datasets if d.chunks))
        pieces = self._chunk_pieces(start, stop, chunked) if chunked else self._halves(start, stop, error)
        out: InputBatch | None = None
        for a, b, part in pieces:
            if isinstance(part, InputError):
                if str(part) not in self.damaged:
                    self.damaged.append(str(part))
                reason = str(part).removeprefix(f"{self.path}: ")
                try:
                    part = self._batch(a, b, np.zeros((b - a, *self._row_shape), np.float32), reason)
                except _H5_ERRORS:
                    raise part from None
            out = part if out is None else _join(out, part)
        assert out is not None
        return out

    def _chunk_pieces(self, start: int, stop: int, step: int) -> list[tuple[int, int, InputBatch | InputError]]:
        """Rows ``start:stop`` read *step* rows at a time; the error of a damaged piece names its whole chunk."""
        bounds = [start, *range((start // step + 1) * step, stop, step), stop]
        pieces: list[tuple[int, int, InputBatch | InputError]] = []
        for a, b in itertools.pairwise(bounds):
            try:
                pieces.append((a, b, self.read_block(a, b)))
            except InputError as exc:
                whole = (a - a % step, min(a - a % step + step, self.n_rows))
                pieces.append((a, b, self._error_of(*whole, exc) if whole != (a, b) else exc))
        return pieces

    def _halves(self, start: int, stop: int, error: InputError) -> list[tuple[int, int, InputBatch | InputError]]:
        """Rows ``start:stop`` (which failed with *error*), read in halves down to failing pieces of
        `_SALVAGE_ROWS` rows; failing pieces next to each other become one, its error naming them all
        (one more read for each such run: never one per merge, which would read a block many times)."""
        pieces = self._bisect(start, stop, error)
        merged: list[tuple[int, int, InputBatch | InputError]] = []
        for failed, run in itertools.groupby(pieces, key=lambda p: isinstance(p[2], InputError)):
            group = list(run)
            if failed and len(group) > 1:
                a, b = group[0][0], group[-1][1]
                group = [(a, b, self._error_of(a, b, group[0][2]))]  # type: ignore[arg-type]
            merged += group
        return merged

    def _bisect(self, start: int, stop: int, error: InputError) -> list[tuple[int, int, InputBatch | InputError]]:
        if stop - start <= _SALVAGE_ROWS:
            return [(start, stop, error)]
        pieces: list[tuple[int, int, InputBatch | InputError]] = []
        for a, b in ((start, (start + stop) // 2), ((start + stop) // 2, stop)):
            try:
                pieces.append((a, b, self.read_block(a, b)))
            except InputError as exc:
                pieces += self._bisect(a, b, exc)
        return pieces

    def _error_of(self, start: int, stop: int, first: InputError) -> InputError:
        """The error of reading rows ``start:stop`` (that failed in part): it names them all; *first*
        when they read this time (an error that came and went: its rows stay failed, as first seen)."""
        try:
            self.read_block(start, stop)
        except InputError as exc:
            return exc
        return first

    def block_rows(self, batch_size: int) -> int:
        """Rows per read: a multiple of the file's chunking, at least *batch_size*.

        A block that would exceed `MAX_BLOCK_BYTES` (huge chunks) falls back to
        *batch_size* rows, so memory stays bounded whatever the file.
        """
        chunk = self._datasets[0].chunks
        rows = chunk[0] if chunk else 1
        block = max(rows, int(math.ceil(batch_size / rows)) * rows)
        row_bytes = sum(_row_bytes(d) for d in self._datasets)
        return block if block * row_bytes <= max(MAX_BLOCK_BYTES, batch_size * row_bytes) else batch_size

    def batches(self, batch_size: int) -> Iterator[InputBatch]:
        """Yield batches of *batch_size* rows (the last may be shorter).

        Rows are read in blocks aligned with the file's chunks (`block_rows`), so
        each compressed chunk is read and decompressed once; batches are views
        sliced from the blocks, with the same boundaries as reading batch by batch.
        """
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        block = self.block_rows(batch_size)
        carry: InputBatch | None = None  # rows left at the end of the previous block
        self._advise(0, block)
        for b0 in range(0, self.n_rows, block):
            self._advise(b0 + block, b0 + 2 * block)
            blk = self.read_rows(b0, min(b0 + block, self.n_rows))
            pos = 0
            if carry is not None:
                pos = min(batch_size - len(carry), len(blk))
                yield _join(carry, _take(blk, 0, pos))
                carry = None
            while pos + batch_size <= len(blk):
                yield _take(blk, pos, pos + batch_size)
                pos += batch_size
            if pos < len(blk):
                carry = _take(blk, pos, len(blk))
        if carry is not None:
            yield carry

    def _advise(self, start: int, stop: int) -> None:
        """Ask the kernel to read rows ``start:stop`` into the page cache, in the background.

        h5py holds the GIL while it reads, so a read that waits for the disk stalls
        the inference threads; with the bytes already cached the read is a memory copy
        (1,000,000 HiTS stamps, 7 GB, cold cache: docs/benchmarks.md). Best effort: a
        no-op where ``posix_fadvise`` or chunk information is not available.
        """
        stop = min(stop, self.n_rows)
        if start >= stop or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = self._own_fd()
            if fd is None:
                return
            for ds in self._datasets:
                for offset, size in _byte_ranges(ds, start, stop):
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        except Exception:  # noqa: BLE001, S110 - only a hint; reading itself reports real errors
            pass

    def close(self) -> None:
        """Close the file.

        While `pin_blocks` is set the blocks are unpinned too (the caller has no upload
        of them in flight); otherwise each is unpinned when it is freed.
        """
        if self.pin_blocks:
            for buf in self._blocks:
                unpin(buf)  # nothing for a block that could not be pinned
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None
        self._file.close()


#: Rows of the smallest piece a contiguous block is halved down to when it fails (`read_rows`):
#: a disk's bad sector then fails a few dozen rows, and a block that fails whole (its ids
#: unreadable too) costs ~2 x rows / 16 reads, not ~4 x rows (each may be a slow I/O error)
_SALVAGE_ROWS = 16


def _row_bytes(ds: Any) -> int:
    """Bytes of one row (first-axis index) of a dataset."""
    return int(ds.dtype.itemsize * math.prod(ds.shape[1:]))


#: Read plain datasets with ``os.preadv`` (`HDF5Reader._read_into`); off (or no preadv, as on
#: Windows): h5py reads everything
_DIRECT = hasattr(os, "preadv")


def _direct_layout(file: Any, ds: Any) -> tuple[int, int] | None:
    """``(rows per chunk, bytes per row)`` when rows of *ds* lie in the file as they do in memory, else None.

    That is: a plain file (default driver, no user block), no filters, a native
    dtype, contiguous (rows per chunk 0) or chunked by whole rows. Only then are
    its bytes at the offsets HDF5 reports the values themselves.
    """
    import h5py

    try:
        if file.driver != "sec2" or file.userblock_size or ds.is_virtual or not ds.dtype.isnative:
            return None
        # the file's type, bit for bit numpy's (not, e.g., 12 bits of precision at an offset)
        if not ds.id.get_type().equal(h5py.h5t.py_create(ds.dtype)):
            return None
        dcpl = ds.id.get_create_plist()
        if dcpl.get_nfilters() or dcpl.get_external_count():
            return None
        layout = dcpl.get_layout()
        if layout == h5py.h5d.CONTIGUOUS and ds.id.get_offset() is not None:
            return 0, _row_bytes(ds)
        if layout == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
            return int(ds.chunks[0]), _row_bytes(ds)
    except Exception:  # noqa: BLE001 - an HDF5 library without these calls: h5py reads
        return None
    return None


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill *buf* from *fd* at *offset*; a file that ends first is an error (truncated)."""
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(f"the file ends before byte {offset + len(buf)}")
        buf, offset = buf[n:], offset + n


def _read_rows(
    ds: Any, start: int, stop: int, scratch: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``start:stop`` of a dataset, read one chunk's rows per h5py call.

    h5py holds the GIL for the whole of a call; several short calls let the
    inference threads pick up their results in between. *out*: a C-contiguous array
    of the rows' shape and the dataset's dtype to read into. *scratch*: a buffer to
    read into when it is large enough (the result is then a view of it, valid until
    reused).
    """
    step = ds.chunks[0] if ds.chunks else max(1, (4 * 2**20) // max(1, _row_bytes(ds)))
    shape = (stop - start, *ds.shape[1:])
    if out is None:
        if scratch is not None and scratch.dtype == ds.dtype and scratch.size >= math.prod(shape):
            out = scratch.reshape(-1)[: math.prod(shape)].reshape(shape)
        elif stop - start <= step:
            return ds[start:stop]
        else:
            out = np.empty(shape, dtype=ds.dtype)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        ds.read_direct(out, np.s_[a:b], np.s_[a - start : b - start])
    return out


def _byte_ranges(ds: Any, start: int, stop: int) -> list[tuple[int, int]]:
    """File byte ranges holding rows ``start:stop`` of a dataset (stored chunks or the contiguous block)."""
    chunks, shape = ds.chunks, ds.shape  # h5py asks HDF5 each time
    if chunks is None:
        offset, row_bytes = ds.id.get_offset(), _row_bytes(ds)
        return [] if offset is None else [(offset + start * row_bytes, (stop - start) * row_bytes)]
    rows = chunks[0]
    if any(c != n for c, n in zip(chunks[1:], shape[1:], strict=True)):
        return []  # chunks split rows: not worth working out
    out: list[tuple[int, int]] = []
    rest = (0,) * (len(shape) - 1)
    for r in range(start - start % rows, stop, rows):
        info = ds.id.get_chunk_info_by_coord((r, *rest))
        if info.byte_offset is not None and info.size:
            offset, size = int(info.byte_offset), int(info.size)
            if out and sum(out[-1]) == offset:  # chunks one after another in the file: one range
                out[-1] = (out[-1][0], out[-1][1] + size)
            else:
                out.append((offset, size))
    return out


def _take(b: InputBatch, start: int, stop: int) -> InputBatch:
    """Rows ``start:stop`` of a batch (views, no copies)."""

    def cut(a: Any) -> Any:
        return None if a is None else a[start:stop]

    extra = None if b.extra is None else {k: v[start:stop] for k, v in b.extra.items()}
    return InputBatch(
        ids=b.ids[start:stop], stamps=cut(b.stamps), x=cut(b.x), labels=cut(b.labels), status=cut(b.status), extra=extra
    )


def _join(a: InputBatch, b: InputBatch) -> InputBatch:
    """Rows of *a* then *b* (the one batch that straddles two blocks)."""

    def cat(x: Any, y: Any) -> Any:
        return None if x is None else np.concatenate([x, y])

    status = None
    if a.status is not None or b.status is not None:
        parts = [s if s is not None else text_column(len(t)) for s, t in ((a.status, a), (b.status, b))]
        status = np.concatenate(parts)
    extra = None
    if a.extra is not None and b.extra is not None:
        extra = {k: np.concatenate([v, b.extra[k]]) for k, v in a.extra.items()}
    return InputBatch(
        ids=np.concatenate([a.ids, b.ids]),
        stamps=cat(a.stamps, b.stamps),
        x=cat(a.x, b.x),
        labels=cat(a.labels, b.labels),
        status=status,
        extra=extra,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__
