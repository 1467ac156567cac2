"""The fast paths give the same answers as the plain ones.

Chunk-aligned HDF5 blocks, padded fixed-shape batches, the prefetch queue and the
preprocessing pool, the vectorised CSV writer, and (with a GPU) IOBinding, CUDA graphs.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import HITS_INPUT, make_stamps, write_hits_h5

from stampclf import Classifier
from stampclf._errors import InputError
from stampclf._session import BatchRunner, _bucket, create_session
from stampclf.classifier import _ordered_map, _prefetch
from stampclf.io import HDF5Reader
from stampclf.io._writers import ResultWriter
from stampclf.preprocess import _median_rows_inplace, channel_major, normalise


# --- preprocessing --------------------------------------------------------------------
@pytest.mark.parametrize("width", [441, 440, 1, 2, 9])
def test_partition_median_is_numpy_median(width: int) -> None:
    rng = np.random.default_rng(width)
    rows = rng.normal(0, 1, (50, width)).astype(np.float32)
    rows[::3] = np.round(rows[::3])  # ties
    expected = np.median(rows, axis=1)
    got = _median_rows_inplace(rows.copy())
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_robust_asinh_matches_the_formula() -> None:
    x = make_stamps(40, seed=5)
    x[3, 1] = 7.0  # constant channel: MAD 0, falls back to std, then to 1
    x[4, 2, :10] = 0.0
    flat = x.reshape(-1, 441).astype(np.float64)
    med = np.median(flat, axis=1, keepdims=True)
    sig = np.median(np.abs(flat - med), axis=1, keepdims=True) * 1.4826
    std = flat.std(axis=1, keepdims=True)
    sig = np.where(sig > 0, sig, std)
    sig = np.where(sig > 0, sig, 1.0)
    expected = np.arcsinh((flat - med) / (sig * 0.5)).reshape(x.shape)
    got = normalise(x, {"method": "robust_asinh", "softening": 0.5})
    assert got.dtype == np.float32
    assert np.allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("method", ["robust_asinh", "minmax", "none"])
@pytest.mark.parametrize("extra", [0, 3])  # a whole channel-major block; part of one
def test_normalise_gives_the_same_numbers_in_either_memory_order(method: str, extra: int) -> None:
    x = make_stamps(40, seed=7)
    x[3, 1] = 7.0
    x[5, 2, :4] = np.nan
    x[6, 0, 0, 0] = 3e38
    block = np.zeros((4, 40 + extra, 21, 21), np.float32)
    block[:, :40] = x.transpose(1, 0, 2, 3)
    view = block.transpose(1, 0, 2, 3)[:40]
    assert channel_major(view) and not channel_major(x)
    spec = {"method": method, "softening": 0.5}
    with np.errstate(over="ignore", invalid="ignore"):
        want, got = normalise(x, spec), normalise(view, spec)
    np.testing.assert_array_equal(got, want)
    if method != "none":
        assert got.flags.c_contiguous  # (N, C) order, as the model takes it


def test_normalise_takes_any_pixel_axes_after_n_and_c() -> None:
    x = make_stamps(6, seed=8)
    spec = {"method": "robust_asinh", "softening": 0.5}
    want = normalise(x, spec)
    np.testing.assert_array_equal(normalise(x.reshape(6, 4, 441), spec), want.reshape(6, 4, 441))
    np.testing.assert_array_equal(normalise(x.reshape(6, 4, 3, 7, 21), spec), want.reshape(6, 4, 3, 7, 21))


def test_channel_datasets_are_read_channel_major(tmp_path: Path) -> None:
    x = make_stamps(30, seed=9)
    path = write_hits_h5(tmp_path / "cm.h5", stamps=x, chunks=(10, 21, 21))
    reader = HDF5Reader(str(path), HITS_INPUT)
    got = list(reader.batches(10))
    assert all(channel_major(b.stamps) for b in got)  # each channel read into its own slab, no copy
    np.testing.assert_array_equal(np.concatenate([b.stamps for b in got]), x)
    reader.close()


def test_mixed_dtype_channels_cast_as_numpy_does(tmp_path: Path, tiny_model_path: Path) -> None:
    stamps = make_stamps(6, seed=10)
    x = stamps.astype(np.float64)
    x[2, 1, 0, 0] = 1e300  # beyond float32: inf when cast, then the NaN policy
    datasets = {"temp_images": np.round(x[:, 0] * 10).astype(np.int16), "sci_images": x[:, 1]}
    path = write_hits_h5(tmp_path / "mixed.h5", stamps=stamps, datasets=datasets)
    reader = HDF5Reader(str(path), HITS_INPUT)
    (batch,) = list(reader.batches(10))
    assert batch.stamps.dtype == np.float64 and batch.stamps[2, 1, 0, 0] == 1e300
    np.testing.assert_array_equal(batch.stamps[:, 0], np.round(x[:, 0] * 10))
    reader.close()
    (pred,) = list(Classifier(tiny_model_path, device="cpu").classify_file(path))
    assert pred.status[2] == "flagged: 1 non-finite pixels replaced" and set(pred.status[[0, 1, 3, 4, 5]]) == {"ok"}


# --- HDF5 blocks ------------------------------------------------------------------------
def _naive(reader: HDF5Reader, bs: int) -> list:
    return [reader.read_block(s, min(s + bs, reader.n_rows)) for s in range(0, reader.n_rows, bs)]


@pytest.mark.parametrize("chunks", [None, (5, 21, 21), (64, 21, 21), (1, 21, 21)])
@pytest.mark.parametrize("bs", [1, 7, 16, 100])
def test_chunk_aligned_blocks_give_the_same_batches(tmp_path: Path, chunks: tuple | None, bs: int) -> None:
    ids = np.arange(77) % 60  # duplicate ids: the reader flags them via status
    path = write_hits_h5(tmp_path / "c.h5", n=77, seed=6, chunks=chunks, ids=ids)
    reader = HDF5Reader(str(path), HITS_INPUT)
    block = reader.block_rows(bs)
    assert block >= bs
    if chunks:
        assert block % chunks[0] == 0
    got, want = list(reader.batches(bs)), _naive(reader, bs)
    assert [len(b) for b in got] == [len(b) for b in want]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.ids, w.ids)
        assert np.array_equal(g.stamps, w.stamps)
        assert np.array_equal(g.labels, w.labels)
        gs = g.status if g.status is not None else np.full(len(g), "ok", dtype=object)
        ws = w.status if w.status is not None else np.full(len(w), "ok", dtype=object)
        assert list(gs) == list(ws)
    reader.close()


def _h5py_batches(path: Path, bs: int, monkeypatch: pytest.MonkeyPatch) -> list:
    """What the reader gives when h5py reads everything."""
    with monkeypatch.context() as mp:
        mp.setattr("stampclf.io._hdf5._DIRECT", False)
        reader = HDF5Reader(str(path), HITS_INPUT)
        out = [b.stamps.copy() for b in reader.batches(bs)]
        reader.close()
    return out


@pytest.mark.parametrize(
    ("options", "direct"),
    [({}, True), ({"chunks": (10, 21, 21)}, True), ({"chunks": (7, 21, 21)}, True),
     ({"chunks": (10, 21, 21), "compression": "gzip"}, False), ({"chunks": (10, 7, 21)}, False),
     ({"dtype": ">f4"}, False), ({"fillvalue": 7.0, "chunks": (10, 21, 21), "unwritten": True}, True)],
)  # fmt: skip
def test_plain_datasets_are_read_past_h5py_with_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict, direct: bool
) -> None:
    import h5py

    x = make_stamps(53, seed=21)
    options = dict(options)
    unwritten, dtype = options.pop("unwritten", False), options.pop("dtype", "<f4")
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        for c, name in enumerate(HITS_INPUT["hdf5_datasets"]):
            d = f.create_dataset(name, (53, 21, 21), dtype, **options)
            if unwritten:  # chunks 2 and 4 never written: h5py gives the fill value there
                d[:20], d[30:40], d[50:] = x[:20, c], x[30:40, c], x[50:, c]
            else:
                d[...] = x[:, c]
    reader = HDF5Reader(str(path), HITS_INPUT)
    assert all((d is not None) == direct for d in reader._direct), reader._direct
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a[2]) or real(*a))
    got = [b.stamps for b in reader.batches(16)]
    assert bool(reads) == direct
    want = _h5py_batches(path, 16, monkeypatch)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    if not unwritten:
        np.testing.assert_array_equal(np.concatenate(got), x)
    else:
        assert (np.concatenate(got)[[20, 29, 40, 49]] == 7.0).all()
    reader.close()


def test_chunks_that_follow_each_other_in_the_file_are_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_hits_h5(tmp_path / "seq.h5", n=60, seed=5, chunks=(10, 21, 21))  # each dataset written whole
    reader = HDF5Reader(str(path), HITS_INPUT)
    sizes: list[int] = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: sizes.append(len(bufs[0])) or real(fd, bufs, off))
    got = np.concatenate([b.stamps for b in reader.batches(30)])  # blocks of 30 rows: 3 chunks each
    assert sizes == [30 * 441 * 4] * 8  # 2 blocks x 4 datasets, one read each
    np.testing.assert_array_equal(got, np.concatenate(_h5py_batches(path, 30, monkeypatch)))
    reader.close()


def test_a_plain_dataset_cut_short_is_a_read_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_hits_h5(tmp_path / "short.h5", n=40, seed=3, chunks=(10, 21, 21))
    reader = HDF5Reader(str(path), HITS_INPUT)
    monkeypatch.setattr(os, "preadv", lambda *a: 0)  # the file ends here (as a file truncated after opening)
    with pytest.raises(InputError, match=r"short\.h5: cannot read rows 0-19 of dataset 'temp_images' \(truncated or corrupt HDF5: the file ends before byte"):
        list(reader.batches(16))
    reader.close()


def test_pinned_blocks_are_the_kept_ones_and_are_unpinned_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stampclf.io._hdf5 as h5mod
    from stampclf import _pinned

    if _pinned._cudart() is None:  # no CUDA runtime loaded in this process (a GPU test may have loaded one)
        assert not _pinned.pin(np.zeros(10, np.float32))  # nothing pinned, no error
    pinned: list[int] = []
    monkeypatch.setattr(h5mod, "pin", lambda a: pinned.append(id(a)) or True)
    monkeypatch.setattr(h5mod, "unpin", lambda a: pinned.remove(id(a)))
    path = write_hits_h5(tmp_path / "p.h5", n=200, seed=4, chunks=(10, 21, 21))
    reader = HDF5Reader(str(path), HITS_INPUT)
    reader.pin_blocks = True
    kept = list(reader.batches(10))  # every batch held: a new block each time, the first few kept
    assert sorted(pinned) == sorted(id(b) for b in reader._blocks) and len(pinned) == h5mod._RECYCLED_BLOCKS
    reader.close()
    assert pinned == [] and len(kept) == 20
    # pinned blocks are recycled like any other: being pinned is no use of them
    reader = HDF5Reader(str(path), HITS_INPUT)
    reader.pin_blocks = True
    for _ in reader.batches(10):
        pass
    assert len(reader._blocks) <= 2 and len(pinned) == len(reader._blocks)
    reader.close()
    assert pinned == []


def test_huge_chunks_fall_back_to_batch_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stampclf.io._hdf5 as h5mod

    path = write_hits_h5(tmp_path / "big.h5", n=40, seed=7, chunks=(40, 21, 21))
    monkeypatch.setattr(h5mod, "MAX_BLOCK_BYTES", 10 * 4 * 441 * 4)  # 10 rows
    reader = HDF5Reader(str(path), HITS_INPUT)
    assert reader.block_rows(8) == 8  # a 40-row chunk would exceed the cap
    assert [len(b) for b in reader.batches(8)] == [8] * 5
    reader.close()


# --- fixed batch shape ------------------------------------------------------------------
def test_bucket_sizes() -> None:
    assert [_bucket(n, 1024) for n in (1, 2, 3, 100, 128, 129, 1000, 1024)] == [1, 2, 4, 128, 128, 256, 1024, 1024]
    assert _bucket(5, 4) == 4


def test_padded_batches_give_identical_results(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu", batch_size=64, threads=1)
    x = np.ascontiguousarray(make_stamps(150, seed=8))
    ref = clf.session.run(None, {"stamps": x})[0]  # one unpadded call
    shapes: list[tuple] = []
    real_run = clf.session.run

    class Spy:
        def run(self, out, feed):  # noqa: ANN001, ANN202
            shapes.append(feed["stamps"].shape)
            return real_run(out, feed)

    runner = BatchRunner(clf._info, 64, clf.card.shape, 2)
    runner.session = Spy()
    got = runner(x)
    assert np.array_equal(got, ref)
    assert [s[0] for s in shapes] == [64, 64, 32]  # the 22-row tail padded to 32
    assert np.array_equal(runner(x[:3]), ref[:3])
    assert shapes[-1][0] == 4


class _SpySession:
    """Records the batch shapes a session is run with."""

    def __init__(self, session: object, shapes: list[tuple], fail: bool = False) -> None:
        self.session, self.shapes, self.fail = session, shapes, fail

    def run(self, out, feed):  # noqa: ANN001, ANN201
        self.shapes.append(feed["stamps"].shape)
        if self.fail:
            raise RuntimeError("replica failed")
        return self.session.run(out, feed)


def test_cpu_replicas_give_identical_results(tiny_model_path: Path) -> None:
    x = np.ascontiguousarray(make_stamps(200, seed=12))
    one = Classifier(tiny_model_path, device="cpu", batch_size=64, threads=1)
    ref = one.session.run(None, {"stamps": x})[0]
    runner = BatchRunner(Classifier(tiny_model_path, device="cpu", threads=3)._info, 64, one.card.shape, 2)
    assert runner.parallel == 3
    shapes: list[tuple] = []
    runner._start_replicas()
    runner._replicas = [_SpySession(r, shapes) for r in runner._replicas]
    assert np.array_equal(runner(x), ref)
    # 64-row batches over 3 sessions: 22-row pieces, raised to the 32-row floor; tail padded
    assert sorted(s[0] for s in shapes) == [32] * 7 and len(shapes) == 7
    runner.close()
    assert runner._pool is None


def test_small_calls_stay_on_the_main_session(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu", batch_size=64, threads=2)
    x = make_stamps(40, seed=13)  # fewer than 2 x 32 rows
    p = clf.predict_proba(x)
    assert clf._runner is not None and clf._runner._replicas == []
    assert np.array_equal(p, Classifier(tiny_model_path, device="cpu", threads=1).predict_proba(x))


def test_replica_error_reaches_the_caller(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu", batch_size=64, threads=2)
    runner = BatchRunner(clf._info, 64, clf.card.shape, 2)
    runner._start_replicas()
    runner._replicas = [_SpySession(r, [], fail=True) for r in runner._replicas]
    with pytest.raises(RuntimeError, match="replica failed"):
        runner(make_stamps(100, seed=14))
    runner.close()


def test_pipelined_file_stream_matches_one_session(tmp_path: Path, tiny_model_path: Path) -> None:
    # 2 sessions in the background, one batch in flight while the previous is handed out
    h5 = write_hits_h5(tmp_path / "s.h5", 300, seed=15)
    preds = {}
    for threads in (1, 2):
        clf = Classifier(tiny_model_path, device="cpu", batch_size=64, threads=threads)
        parts = list(clf.classify_file(h5))
        assert [len(p.ids) for p in parts] == [64, 64, 64, 64, 44]
        preds[threads] = (np.concatenate([p.ids for p in parts]), np.concatenate([p.proba for p in parts]))
    assert clf._runner is not None and len(clf._runner._replicas) == 2
    assert np.array_equal(preds[1][0], preds[2][0]) and len(set(preds[2][0].tolist())) == 300  # same order
    assert np.array_equal(preds[1][1], preds[2][1])


def test_batch_size_change_rebuilds_the_runner(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu", batch_size=8)
    x = make_stamps(20, seed=9)
    a = clf.predict_proba(x)
    clf.batch_size = 3
    assert np.array_equal(clf.predict_proba(x), a)
    assert clf._runner is not None and clf._runner.batch_size == 3


# --- prefetch and pool ------------------------------------------------------------------
def test_device_bound_runner_is_safe_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's one set of bound buffers, shared by threads (a Dask worker), with a fake ORT."""
    import threading
    import time

    import onnxruntime as ort

    from stampclf._session import BatchRunner, SessionInfo

    class Value:  # stands in for an OrtValue on the device
        def __init__(self, a: np.ndarray) -> None:
            self.a = a.copy()

        @classmethod
        def ortvalue_from_numpy(cls, a: np.ndarray, *_: object) -> Value:
            return cls(a)

        @classmethod
        def ortvalue_from_shape_and_type(cls, shape: tuple, dtype: object, *_: object) -> Value:
            return cls(np.zeros(shape, dtype))

        def update_inplace(self, a: np.ndarray) -> None:
            self.a[...] = a

        def numpy(self) -> np.ndarray:
            return self.a.copy()

    class Binding:
        def bind_ortvalue_input(self, _name: str, v: Value) -> None:
            self.x = v

        def bind_ortvalue_output(self, _name: str, v: Value) -> None:
            self.y = v

    class Session:
        def get_inputs(self) -> list:
            return [type("I", (), {"name": "x"})]

        get_outputs = get_inputs

        def io_binding(self) -> Binding:
            return Binding()

        def run_with_iobinding(self, b: Binding) -> None:
            time.sleep(0.0005)  # a kernel: the GIL is free, another thread may upload now
            b.y.a[:, 0] = b.x.a.reshape(len(b.x.a), -1)[:, 0]

    monkeypatch.setattr(ort, "OrtValue", Value)
    runner = BatchRunner(SessionInfo(Session(), "cuda", None, 1), 8, (1, 2, 2), 1)
    wrong = []

    def work(v: float) -> None:
        x = np.full((8, 1, 2, 2), v, np.float32)
        wrong.extend(int((runner(x)[:, 0] != v).any()) for _ in range(100))

    threads = [threading.Thread(target=work, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wrong) == 200 and sum(wrong) == 0


def test_reader_recycles_only_blocks_that_no_batch_uses(tmp_path: Path) -> None:
    stamps = make_stamps(100, seed=3)
    path = write_hits_h5(tmp_path / "a.h5", stamps=stamps, chunks=(8, 21, 21))
    kept = list(HDF5Reader(str(path), HITS_INPUT).batches(10))  # a consumer holding every batch
    np.testing.assert_array_equal(np.concatenate([b.stamps for b in kept]), stamps)
    reader = HDF5Reader(str(path), HITS_INPUT)
    real, reused = reader._block_buffer, []

    def spy(shape: tuple[int, ...], dtype: object) -> np.ndarray:
        pool = [id(b) for b in reader._blocks]  # ids, not references: a reference would pin them
        buf = real(shape, dtype)
        reused.append(id(buf) in pool)
        return buf

    reader._block_buffer = spy  # type: ignore[method-assign]
    rows = [b.stamps.copy() for b in reader.batches(10)]  # each batch dropped as the next comes
    np.testing.assert_array_equal(np.concatenate(rows), stamps)
    assert len(reused) > 3 and sum(reused) >= len(reused) // 2  # blocks were recycled, and rows stayed right


def test_prefetch_keeps_order_and_bounds_read_ahead() -> None:
    produced: list[int] = []

    def items():  # noqa: ANN202
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for i in _prefetch(items(), depth=2):
        time.sleep(0.002)
        assert len(produced) <= i + 4  # at most depth queued + one in hand + one being put
        seen.append(i)
    assert seen == list(range(20))


def test_prefetch_reraises_reader_errors() -> None:
    def items():  # noqa: ANN202
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(_prefetch(items()))


def test_prefetch_reader_stops_when_the_consumer_does() -> None:
    before = {t.ident for t in threading.enumerate()}
    gen = _prefetch(iter(range(2)), depth=1)  # the end marker waits behind a full queue
    assert next(gen) == 0
    time.sleep(0.2)
    readers = [t for t in threading.enumerate() if t.name == "stampclf-reader" and t.ident not in before]
    assert readers and all(t.is_alive() for t in readers)
    gen.close()
    # close() waited for it: a reader left inside h5py at interpreter exit hangs or crashes the shutdown
    assert not any(t.is_alive() for t in readers)


def test_a_stopped_consumer_waits_for_a_hung_reader_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    import stampclf.classifier as classifier_mod

    monkeypatch.setattr(classifier_mod, "_JOIN_SECONDS", 0.2)

    def items():  # noqa: ANN202 - a read that hangs (a network file system)
        yield 0
        time.sleep(3)
        yield 1

    gen = _prefetch(items(), depth=1)
    assert next(gen) == 0
    t0 = time.perf_counter()
    gen.close()  # Ctrl-C must not wait for the hung read
    assert time.perf_counter() - t0 < 1.5


@pytest.mark.parametrize("workers", [1, 3])
def test_a_file_is_closed_only_after_its_reader_threads_stopped(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    h5 = write_hits_h5(tmp_path / "r.h5", n=400, seed=4)
    alive_at_close: list[list[str]] = []
    real = HDF5Reader.close
    before = {t.ident for t in threading.enumerate()}  # other tests' threads may still be winding down

    def close(self: HDF5Reader) -> None:
        mine = [t for t in threading.enumerate() if t.ident not in before]
        alive_at_close.append([t.name for t in mine if t.name.startswith("stampclf-")])
        real(self)

    monkeypatch.setattr(HDF5Reader, "close", close)
    clf = Classifier(tiny_model_path, device="cpu", threads=1)
    clf.prep_workers = workers  # 1: one reader thread; 3: a reader thread and a preprocessing pool
    for _ in clf.classify_file(str(h5), batch_size=16):
        break  # a consumer that stops early
    assert alive_at_close == [[]]


@pytest.mark.parametrize("workers", [1, 3])
def test_ordered_map_keeps_order_and_bounds_in_flight(workers: int) -> None:
    lock = threading.Lock()
    active = [0, 0]  # now, max

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.003 * ((i * 7) % 3))  # finish out of order
        with lock:
            active[0] -= 1
        return i * i

    assert list(_ordered_map(work, iter(range(30)), workers)) == [i * i for i in range(30)]
    assert active[1] <= workers


def test_ordered_map_reraises_and_stops() -> None:
    def work(i: int) -> int:
        if i == 5:
            raise RuntimeError("boom")
        return i

    with pytest.raises(RuntimeError, match="boom"):
        list(_ordered_map(work, iter(range(100)), 2))


@pytest.mark.parametrize("workers", [1, 2])
def test_classify_file_with_pool_matches_in_memory(tiny_model_path: Path, tmp_path: Path, workers: int) -> None:
    stamps = make_stamps(203, seed=10)
    stamps[5, 0, 0, 0] = np.nan
    path = write_hits_h5(tmp_path / "p.h5", stamps=stamps, chunks=(50, 21, 21))
    clf = Classifier(tiny_model_path, device="cpu", batch_size=32)
    clf.prep_workers = workers
    preds = list(clf.classify_file(path))
    proba = np.concatenate([p.proba for p in preds])
    status = np.concatenate([p.status for p in preds])
    ref = clf.classify(stamps)
    assert np.array_equal(proba, ref.proba)
    assert list(status) == list(ref.status)
    assert list(np.concatenate([p.ids for p in preds])) == list(range(1000, 1203))


# --- CSV writer -----------------------------------------------------------------------
def test_fast_csv_equals_csv_module(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    proba = rng.random((50, 2)).astype(np.float32)
    proba[3] = np.nan
    proba[4] = [0.0, 1.0]
    proba[5] = [1e-9, 3.4e38]
    ids = np.arange(50)
    labels = np.where(proba[:, 1] > 0.5, "real", "bogus").astype(object)
    labels[3] = ""
    status = np.full(50, "ok", dtype=object)
    status[3] = "failed: 441 of 1764 pixels not finite"
    status[7] = "flagged: resized 25x25->21x21; 3 non-finite pixels replaced"

    def reference(path: Path, ids_: np.ndarray, file: str) -> list[list[str]]:
        rows = [["id", "label", "p_bogus", "p_real", "status", "model", "model_version", "file"]]
        for i, lab, p, s in zip(ids_, labels, proba.tolist(), status, strict=True):
            ps = ["" if not np.isfinite(v) else f"{v:.7g}" for v in p]
            rows.append([str(i), str(lab), *ps, str(s), "m", "1.0", file])
        return rows

    for ids_, file in ((ids, "plain.h5"), (np.array([f"id,{i}" for i in ids], dtype=object), 'a "quoted", name.h5')):
        out = tmp_path / "o.csv"
        with ResultWriter(str(out), ["bogus", "real"], "m", "1.0") as w:
            w.write(ids_[:20], labels[:20], proba[:20], status[:20], file)
            w.write(ids_[20:], labels[20:], proba[20:], status[20:], file)
        with open(out, newline="") as fh:
            assert list(csv.reader(fh)) == reference(out, ids_, file)


# --- CUDA -----------------------------------------------------------------------------
def _cuda_ok() -> bool:
    try:
        import onnxruntime as ort
        from conftest import build_model_bytes

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        return create_session(build_model_bytes(), "cuda").device == "cuda"
    except Exception:  # noqa: BLE001 - any failure means: no usable CUDA here
        return False


_CUDA = _cuda_ok()
gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_iobinding_matches_cpu(tiny_model_path: Path, cuda_graph: bool) -> None:
    x = make_stamps(300, seed=12)
    ref = Classifier(tiny_model_path, device="cpu", batch_size=128).predict_proba(x)
    clf = Classifier(tiny_model_path, device="cuda", batch_size=128, cuda_graph=cuda_graph)
    assert clf.device == "cuda" and clf.session.get_providers()[0] == "CUDAExecutionProvider"
    got = clf.predict_proba(x)
    # H100-class GPUs run convolutions in TF32 by default: differences of ~1e-5 (measured)
    assert np.allclose(got, ref, atol=1e-4)
    assert np.array_equal(clf.predict_proba(x[:7]), got[:7])  # padded tail: same rows, same numbers
    assert clf._runner is not None and clf._runner._binding is not None


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
def test_cuda_graph_fixes_the_batch_size(tiny_model_path: Path) -> None:
    from stampclf import DeviceError

    clf = Classifier(tiny_model_path, device="cuda", batch_size=32, cuda_graph=True)
    x = make_stamps(40, seed=15)
    p = clf.predict_proba(x)
    assert np.array_equal(clf.predict_proba(x), p)  # graph replay: same numbers
    clf.close()  # the buffers the captured graph points at must survive it
    assert np.array_equal(clf.predict_proba(x), p)
    clf.batch_size = 16
    with pytest.raises(DeviceError, match="fixed by the captured CUDA graph"):
        clf.predict_proba(x)


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
def test_fp16_close_to_fp32(tiny_model_path: Path) -> None:
    pytest.importorskip("onnxconverter_common")
    x = make_stamps(100, seed=13)
    ref = Classifier(tiny_model_path, device="cuda").predict_proba(x)
    half = Classifier(tiny_model_path, device="cuda", precision="fp16").predict_proba(x)
    assert np.allclose(half, ref, atol=1e-2)


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_prep_on_gpu_matches_host(tiny_model_path: Path, cuda_graph: bool) -> None:
    x = make_stamps(300, seed=16)
    x[:20, :, :3] = np.nan
    x[20:25, 0] = 0.0
    ref = Classifier(tiny_model_path, device="cpu", batch_size=128).classify(x)
    clf = Classifier(tiny_model_path, device="cuda", batch_size=128, cuda_graph=cuda_graph)
    assert clf.prep == "device"  # auto on CUDA
    got = clf.classify(x)
    assert list(got.status) == list(ref.status)
    assert np.allclose(got.proba, ref.proba, atol=1e-4)  # TF32 on H100-class GPUs


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
def test_prep_on_gpu_of_a_file_matches_host(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stampclf import Predictions

    x = make_stamps(300, seed=18)
    x[:20, :, :3] = np.nan
    h5 = write_hits_h5(tmp_path / "g.h5", stamps=x, chunks=(64, 21, 21))
    ref = Predictions.concat(list(Classifier(tiny_model_path, device="cpu", batch_size=128).classify_file(h5)))
    import stampclf.io._hdf5 as h5mod

    pinned: list[bool] = []
    real_pin = h5mod.pin
    monkeypatch.setattr(h5mod, "pin", lambda a: pinned.append(real_pin(a)) or pinned[-1])
    clf = Classifier(tiny_model_path, device="cuda", batch_size=128)
    got = Predictions.concat(list(clf.classify_file(h5)))
    assert clf._runner is not None and clf._runner._cm is not None  # the reader's channel-major blocks went up as read
    assert pinned and all(pinned)  # page-locked through the CUDA runtime ONNX Runtime loaded
    assert list(got.status) == list(ref.status)
    assert np.allclose(got.proba, ref.proba, atol=1e-4)  # TF32 on H100-class GPUs


@gpu
@pytest.mark.skipif(not _CUDA, reason="no usable CUDA execution provider on this machine")
@pytest.mark.parametrize("method", ["robust_asinh", "minmax", "robust_asinh_cnhw", "minmax_cnhw"])
def test_prep_graph_nodes_run_on_the_gpu(tmp_path: Path, method: str) -> None:
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    graph = Path(__file__).resolve().parents[1] / "stampclf" / "_graphs" / f"{method}.onnx"
    sess = ort.InferenceSession(str(graph), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = make_stamps(256, seed=17)
    x[:10, :, :2] = np.nan
    if method.endswith("_cnhw"):
        x = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
    sess.run(None, {"stamps": x, "softening": np.array(1.0, np.float32), "fill": np.array(0.0, np.float32)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    on_cpu = {e["args"].get("op_name") for e in events
              if e.get("cat") == "Node" and e.get("args", {}).get("provider") == "CPUExecutionProvider"}  # fmt: skip
    # shape arithmetic may run on the CPU; nothing that touches the pixels may
    assert not on_cpu & {"TopK", "GatherElements", "Log", "Sqrt", "Sign", "Where", "ReduceSum", "ReduceMax",
                         "ReduceMin", "Abs", "IsNaN", "IsInf", "Mul", "Div", "Add", "Not", "Or", "Transpose"}, on_cpu  # fmt: skip


# --- bench and benchmark helpers ----------------------------------------------------------
@pytest.mark.parametrize("prep", ["host", "device"])
def test_bench_command_prints_rates(tiny_model_path: Path, prep: str) -> None:
    from typer.testing import CliRunner

    from stampclf.cli import app

    args = ["bench", "-m", str(tiny_model_path), "--device", "cpu", "--n", "300", "-b", "64", "--prep", prep]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("model tiny v0.0.1 (fp32) on cpu") and f"prep on {prep}" in lines[0]
    assert f"(preprocessing on {prep} + model)" in r.output
    for what in ("model only, in memory:", "classify, in memory:", "classify, HDF5 -> CSV:"):
        line = next(x for x in lines if x.startswith(what))
        assert float(line.split(what)[1].split("rows/s")[0].replace(",", "")) > 0
    assert "of in memory" in lines[-1]


def test_flop_count_of_a_known_graph(tiny_model_path: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        ce = importlib.import_module("compute_efficiency")
    finally:
        sys.path.pop(0)
    per_row, by_op = ce.count_flops(str(tiny_model_path), 8)
    assert per_row == 2 * 4 * 2  # Gemm (1 x 4) @ (4 x 2); pooling and softmax are not counted
    assert by_op == {"Gemm": 16.0}


@pytest.mark.parametrize("workers", [1, 2])
def test_large_in_memory_classify_streams_with_identical_results(tiny_model_path: Path, workers: int) -> None:
    from stampclf.preprocess import prepare_stamps

    stamps = make_stamps(230, seed=14)
    stamps[7, :3] = np.nan  # failed row (75 % of pixels)
    stamps[9, 0, 0, 0] = np.inf  # flagged row
    ids = np.arange(230) % 200  # duplicates flagged
    clf = Classifier(tiny_model_path, device="cpu", batch_size=16)  # 230 rows > 2 batches: streamed
    clf.prep_workers = workers
    got = clf.classify(stamps, ids)
    x, status = prepare_stamps(stamps, clf.card.input, clf.card.preprocessing)
    ref = clf.session.run(None, {"stamps": x})[0]
    ok = np.array([not s.startswith("failed") for s in status])
    assert np.array_equal(got.proba[ok], ref[ok]) and np.isnan(got.proba[~ok]).all()
    assert got.status[7].startswith("failed") and got.labels[7] == ""
    assert got.status[9].startswith("flagged") and "non-finite" in got.status[9]
    assert "duplicate id" in got.status[205] and "duplicate id" not in got.status[5]
    small = Classifier(tiny_model_path, device="cpu", batch_size=4096).classify(stamps, ids)  # one piece
    assert np.array_equal(got.proba, small.proba, equal_nan=True)
    assert list(got.status) == list(small.status) and list(got.labels) == list(small.labels)


@pytest.mark.parametrize("case", ["plain", "odd probabilities", "text ids", "quoting", "percent and extra"])
def test_csv_text_is_what_csv_writer_writes(case: str) -> None:
    from stampclf.io._csvtext import _csv_text

    rng = np.random.default_rng(len(case))
    n = 300
    ids: np.ndarray = np.arange(n) * 7
    proba = rng.random((n, 3)).astype(np.float32)
    proba[::13, 0] = rng.random(len(proba[::13])).astype(np.float32) * 1e-6  # exponent notation
    labels = np.array(["real", "bogus", "x"] * 100, dtype=object)
    status = np.array(["ok"] * n, dtype=object)
    fixed, more = ["hits", "1.1.0", "f.h5"], []
    if case == "odd probabilities":
        proba[5] = np.nan
        proba[9, 1] = np.inf
    if case == "text ids":
        ids = np.array([f"cand{i}" if i % 2 else i for i in range(n)], dtype=object)
    if case == "quoting":
        status[3] = 'flagged: a, "b"'
    if case == "percent and extra":
        fixed = ["hits", "1.1.0", "/data/100%/f.h5"]
        more = [[f"e{i}" for i in range(n)]]
    text = _csv_text(ids, labels, proba, status, fixed, more)
    if case == "quoting":
        assert text is None  # the writer then quotes through csv.writer itself
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for i in range(n):
        p = ["" if not np.isfinite(v) else f"{v:.7g}" for v in proba[i].tolist()]
        w.writerow([ids[i], labels[i], *p, status[i], *fixed, *(m[i] for m in more)])
    assert text == buf.getvalue()


class _FakeCudart:
    """The two CUDA runtime calls `stampclf._pinned` makes, recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.registered: set[int] = set()
        self.errors_cleared = 0
        self.fail = fail

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        if self.fail:
            return 1
        self.registered.add(ptr)
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.registered.remove(ptr)
        return 0

    def cudaGetLastError(self) -> int:  # noqa: N802
        self.errors_cleared += 1
        return 0


def test_pinned_memory_is_unregistered_by_unpin_or_when_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from stampclf import _pinned

    lib = _FakeCudart()
    monkeypatch.setattr(_pinned, "_cudart", lambda: lib)
    a, b = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    assert _pinned.pin(a) and _pinned.pin(b) and not _pinned.pin(a)  # twice: no
    assert not _pinned.pin(b[10:])  # a view: its memory is b's
    assert lib.registered == {a.ctypes.data, b.ctypes.data}
    _pinned.unpin(a)
    _pinned.unpin(a)  # a second time: nothing
    assert lib.registered == {b.ctypes.data}
    del b  # freed while pinned: unregistered first
    gc.collect()
    assert lib.registered == set() and _pinned._pinned == {}
    failing = _FakeCudart(fail=True)
    monkeypatch.setattr(_pinned, "_cudart", lambda: failing)
    assert not _pinned.pin(a) and failing.errors_cleared == 1  # the runtime's last error is not left set


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_pixels_come_from_the_file_h5py_opened(tmp_path: Path) -> None:
    a = write_hits_h5(tmp_path / "a.h5", n=40, seed=1, chunks=(10, 21, 21))
    b = write_hits_h5(tmp_path / "b.h5", n=40, seed=2, chunks=(10, 21, 21))
    link = tmp_path / "current.h5"
    link.symlink_to(a)
    reader = HDF5Reader(str(link), HITS_INPUT)
    link.unlink()
    link.symlink_to(b)  # retargeted after opening (a pipeline's "current" file)
    got = np.concatenate([x.stamps for x in reader.batches(16)])
    reader.close()
    want = HDF5Reader(str(a), HITS_INPUT)
    np.testing.assert_array_equal(got, np.concatenate([x.stamps for x in want.batches(16)]))
    want.close()


def test_a_type_not_stored_as_numpy_lays_it_out_is_read_by_h5py(tmp_path: Path) -> None:
    import h5py

    t = h5py.h5t.STD_U16LE.copy()
    t.set_precision(12)
    t.set_offset(4)  # 12 bits at bit 4: h5py shows uint16, the bytes are not the values
    path = tmp_path / "bits.h5"
    values = np.arange(40 * 441, dtype=np.uint16).reshape(40, 21, 21) % 4096
    with h5py.File(path, "w") as f:
        for name in HITS_INPUT["hdf5_datasets"]:
            space = h5py.h5s.create_simple((40, 21, 21))
            h5py.h5d.create(f.id, name.encode(), t, space)
            f[name][...] = values
    reader = HDF5Reader(str(path), HITS_INPUT)
    assert reader._direct == [None] * 4
    got = np.concatenate([x.stamps for x in reader.batches(16)])
    reader.close()
    np.testing.assert_array_equal(got[:, 0], values)


def test_one_device_thread_whatever_the_threads_that_submit(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    class Slow(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, *a: Any, **k: Any) -> None:
            time.sleep(0.05)  # a slow start: the other threads arrive meanwhile
            super().__init__(*a, **k)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Slow)
    clf = Classifier(tiny_model_path, device="cpu", batch_size=8, threads=1)
    runner = clf._runner_now()
    runner.background = True
    made = []
    real = runner._later

    def spy(fn, x):  # noqa: ANN001, ANN202
        out = real(fn, x)
        made.append(id(runner._device_thread))
        return out

    runner._later = spy  # type: ignore[method-assign]
    x = make_stamps(8, seed=3).astype(np.float32)
    threads = [threading.Thread(target=lambda: runner.submit(x)()) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 1 and len(made) == 8
    runner.drain()
    clf.close()
    runner.drain()  # after close: nothing to wait for, no error


@pytest.mark.parametrize("stop_after", [None, 1])  # the whole file; a consumer that stops after one batch
def test_pinned_blocks_are_unpinned_only_after_the_last_upload(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: int | None
) -> None:
    """The CUDA path's order (pin, uploads on the device thread, drain, unpin), run on the CPU."""
    import stampclf.io._hdf5 as h5mod

    events: list[str] = []
    monkeypatch.setattr(h5mod, "pin", lambda a: events.append("pin") or True)
    monkeypatch.setattr(h5mod, "unpin", lambda a: events.append("unpin"))
    h5 = write_hits_h5(tmp_path / "in.h5", stamps=make_stamps(100, seed=8), chunks=(10, 21, 21))
    clf = Classifier(tiny_model_path, device="cpu", prep="device", batch_size=10, threads=1)
    runner = clf._runner_now()
    runner.background = True
    real = runner._run_raw

    def slow_upload(x: Any) -> Any:
        time.sleep(0.3)  # still uploading when the consumer stops (and the reader thread has ended)
        out = real(x)
        events.append("upload")
        return out

    runner._run_raw = slow_upload  # type: ignore[method-assign]
    monkeypatch.setattr(clf, "device", "cuda")  # what turns pinning on
    stream = clf.classify_file(h5)
    got = [next(stream)] if stop_after else list(stream)
    stream.close()
    clf.close()  # the device thread's last piece of work ends before this returns
    assert "pin" in events and "unpin" in events and "upload" in events
    last_upload = max(i for i, e in enumerate(events) if e == "upload")
    assert min(i for i, e in enumerate(events) if e == "unpin") > last_upload, events
    assert events.count("pin") == events.count("unpin")
    assert sum(len(p) for p in got) == (10 if stop_after else 100)


def test_an_interrupted_drain_leaves_unpinning_to_the_blocks_and_still_closes_the_file(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stampclf.io._hdf5 as h5mod

    events: list[str] = []
    monkeypatch.setattr(h5mod, "pin", lambda a: events.append("pin") or True)
    monkeypatch.setattr(h5mod, "unpin", lambda a: events.append("unpin"))
    closed: list[bool] = []
    real_close = h5mod.HDF5Reader.close
    monkeypatch.setattr(h5mod.HDF5Reader, "close", lambda self: closed.append(True) or real_close(self))
    h5 = write_hits_h5(tmp_path / "in.h5", stamps=make_stamps(60, seed=8), chunks=(10, 21, 21))
    clf = Classifier(tiny_model_path, device="cpu", prep="device", batch_size=10, threads=1)
    runner = clf._runner_now()
    runner.background = True

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "drain", interrupted)  # Ctrl-C while waiting for the device thread
    monkeypatch.setattr(clf, "device", "cuda")  # what turns pinning on
    stream = clf.classify_file(h5)
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.close()
    assert closed == [True]  # the file is closed all the same
    assert "pin" in events and "unpin" not in events  # an upload may still read them: their finalizers unpin
    clf.close()
