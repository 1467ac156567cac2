"""Scale-out on Dask: results equal the single-process run, row for row, in input order."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import damage_chunk, make_stamps, write_hits_h5
from typer.testing import CliRunner

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from stampclf import Classifier, InputError, Predictions, classify_files  # noqa: E402
from stampclf import _dask as sdask  # noqa: E402
from stampclf.cli import app  # noqa: E402

BATCH = 4


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded workers in this process (fast to start; tasks still go through the scheduler)."""
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield cluster, client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two HDF5 files (one with duplicate ids, unchunked and chunked) and an alert file."""
    from test_alerts import ZTF_SCHEMA, triplet, write_avro, ztf_record

    folder = tmp_path_factory.mktemp("dask_inputs")
    a = write_hits_h5(folder / "a.h5", 23, seed=1)
    ids = np.arange(17) + 5000
    ids[9] = ids[3]  # flagged "duplicate id" must survive the split into chunks
    b = write_hits_h5(folder / "b.h5", 17, seed=2, layout="stacked", ids=ids, chunks=(4, 4, 21, 21))
    records = [ztf_record(i, triplet(i, (63, 63))) for i in range(6)]
    records[2]["cutoutScience"]["stampData"] = b"\xff\xd8\xff\xe0 not fits"
    c = write_avro(folder / "c.avro", ZTF_SCHEMA, records, "snappy")
    return [str(a), str(b), str(c)]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _single(model: Path, paths: list[str], out: Path, **kw) -> None:
    clf = Classifier(model, device="cpu", threads=1, batch_size=BATCH)
    classify_files(clf, paths, str(out), BATCH, progress=False, **kw)


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
def test_files_equal_single_process(cluster, inputs, tiny_model_path: Path, tmp_path: Path, suffix: str) -> None:
    _, client = cluster
    ref, out = tmp_path / f"ref{suffix}", tmp_path / f"dask{suffix}"
    _single(tiny_model_path, inputs, ref)
    s = sdask.classify_dask(client, inputs, tiny_model_path, str(out), batch_size=BATCH, chunk_rows=5)
    assert s.rows == 23 + 17 + 6 and s.files == 3 and not s.file_errors
    assert s.failed == 1 and s.flagged == 1 + 5  # a duplicate id; 5 good alerts (derived SNR, resized)
    if suffix == ".csv":
        got, want = _rows(out), _rows(ref)
        assert list(got[0]) == list(want[0]) and list(got[0])[-1] == "object_id"
        assert got == want  # every column, every row, same order, same text
    else:
        import h5py

        with h5py.File(out) as g, h5py.File(ref) as w:
            assert sorted(g) == sorted(w)
            for name in w:
                np.testing.assert_array_equal(g[name][:], w[name][:])


def test_one_session_per_worker(cluster, inputs, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    sdask._CLASSIFIERS.clear()
    sdask.classify_dask(client, inputs[:2], tiny_model_path, str(tmp_path / "o.csv"), batch_size=BATCH, chunk_rows=3)
    # 14 units of work, one classifier (the two in-process workers share this module's cache)
    assert len(sdask._CLASSIFIERS) == 1
    per_worker = client.run(lambda: len(__import__("stampclf._dask")._dask._CLASSIFIERS))
    assert set(per_worker.values()) == {1}


def test_keep_going_matches_single_process(cluster, inputs, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)  # HDF5 signature, then nothing
    paths = [inputs[0], str(bad), inputs[2]]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    _single(tiny_model_path, paths, ref, keep_going=True)
    with pytest.raises(Exception, match="bad.h5"):
        sdask.classify_dask(client, paths, tiny_model_path, str(tmp_path / "x.csv"), batch_size=BATCH)
    assert not (tmp_path / "x.csv").exists()
    s = sdask.classify_dask(client, paths, tiny_model_path, str(out), batch_size=BATCH, chunk_rows=5, keep_going=True)
    assert len(s.file_errors) == 1 and "bad.h5" in s.file_errors[0] and s.files == 2
    assert _rows(out) == _rows(ref)


def _chunked_file(path: Path, **columns: np.ndarray) -> Path:
    """40 stamps in gzip chunks of 10 rows and 1-D *columns* chunked alike (damage_chunk needs compressed chunks)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("stamps", data=make_stamps(40, seed=5), chunks=(10, 4, 21, 21), compression="gzip")
        for name, values in columns.items():
            f.create_dataset(name, data=values, chunks=(10,), compression="gzip")
    return path


def test_keep_going_counts_no_rows_of_an_input_that_fails_late(cluster, inputs, tiny_model_path: Path,
                                                               tmp_path: Path) -> None:
    _, client = cluster
    bad = _chunked_file(tmp_path / "late.h5", id=np.arange(40))
    # ids of rows 30-39 unreadable: the first three units score, then it fails, and not
    # even failed rows can stand for them (salvage needs the ids)
    damage_chunk(bad, "id", 3, nbytes=30)
    out = tmp_path / "o.csv"
    s = sdask.classify_dask(client, [inputs[0], str(bad)], tiny_model_path, str(out), batch_size=BATCH,
                            chunk_rows=10, keep_going=True)  # fmt: skip
    assert len(_rows(out)) == 23 and s.rows == 23 and s.files == 1
    assert len(s.file_errors) == 1 and "late.h5" in s.file_errors[0]


def test_keep_going_salvages_a_damaged_chunk_as_locally(cluster, inputs, tiny_model_path: Path,
                                                        tmp_path: Path) -> None:
    _, client = cluster
    bad = _chunked_file(tmp_path / "damaged.h5")
    damage_chunk(bad, "stamps", 2)  # rows 20-29 unreadable
    paths = [inputs[0], str(bad)]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    local = classify_files(Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH), paths, str(ref),
                           BATCH, keep_going=True, progress=False)  # fmt: skip
    s = sdask.classify_dask(client, paths, tiny_model_path, str(out), batch_size=BATCH, chunk_rows=8, keep_going=True)
    assert _rows(out) == _rows(ref) and s.rows == local.rows == 63 and s.failed == local.failed == 10
    assert [e.split(" (")[0] for e in s.file_errors] == [e.split(" (")[0] for e in local.file_errors]
    assert "cannot read rows 20-29" in s.file_errors[0]


def test_an_input_with_no_scorable_row_is_an_error_as_locally(cluster, inputs, tiny_model_path: Path,
                                                              tmp_path: Path) -> None:
    _, client = cluster
    bad = write_hits_h5(tmp_path / "allnan.h5", stamps=np.full((3, 4, 21, 21), np.nan, "f4"))
    paths = [str(bad), inputs[0]]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    local = classify_files(Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH), paths, str(ref),
                           BATCH, progress=False)  # fmt: skip
    s = sdask.classify_dask(client, paths, tiny_model_path, str(out), batch_size=BATCH, chunk_rows=2)
    assert s.file_errors == local.file_errors and len(s.file_errors) == 1 and _rows(out) == _rows(ref)
    alone = tmp_path / "alone.csv"
    s = sdask.classify_dask(client, [str(bad)], tiny_model_path, str(alone), batch_size=BATCH, chunk_rows=2)
    assert s.file_errors and not alone.exists()  # nothing scored: no output, as locally


def test_a_fits_stamp_that_cannot_be_scored_is_an_error_as_locally(cluster, tiny_model_path: Path,
                                                                  tmp_path: Path) -> None:
    pytest.importorskip("astropy")
    from test_alerts import write_fits_stamps

    _, client = cluster
    whole, partial = write_fits_stamps(tmp_path)
    paths = [*whole, *partial]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    local = classify_files(Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH), paths, str(ref),
                           BATCH, progress=False)  # fmt: skip
    s = sdask.classify_dask(client, paths, tiny_model_path, str(out), batch_size=BATCH)
    assert s.file_errors == local.file_errors == [f"{partial[0]}: stamp 'cand2' could not be scored "
                                                  "(failed: no template cut-out)"]  # fmt: skip
    assert _rows(out) == _rows(ref) and len(_rows(out)) == 3


def test_keep_going_reports_a_missing_input_as_locally(cluster, inputs, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    paths = [inputs[0], str(tmp_path / "vanished.h5"), inputs[1]]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    _single(tiny_model_path, paths, ref, keep_going=True)
    s = sdask.classify_dask(client, paths, tiny_model_path, str(out), batch_size=BATCH, chunk_rows=5, keep_going=True)
    assert s.file_errors == [f"{paths[1]}: file does not exist"] and s.files == 2
    assert _rows(out) == _rows(ref)


def test_dask_array(cluster, tiny_model_path: Path) -> None:
    _, client = cluster
    x = make_stamps(50, seed=3, size=(25, 25))  # other size: cropped and flagged, as in memory
    x[7, :3] = np.nan  # too many bad pixels: a failed row
    stamps = da.from_array(x, chunks=(8, 2, 25, 25))
    pred = sdask.predict_dask(client, stamps, tiny_model_path, batch_size=BATCH)
    want = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH).classify(x)
    assert pred.ids.tolist() == list(range(50))
    assert pred.status.tolist() == want.status.tolist() and pred.status[7].startswith("failed")
    assert pred.labels.tolist() == want.labels.tolist()
    np.testing.assert_array_equal(pred.proba, want.proba)
    assert (pred.model, pred.model_version, pred.classes) == ("tiny", "0.0.1", ("bogus", "real"))


def test_cli_scheduler(cluster, inputs, tiny_model_path: Path, tmp_path: Path) -> None:
    local, _ = cluster
    out, ref = tmp_path / "cli.csv", tmp_path / "ref.csv"
    base = ["classify", *inputs, "-m", str(tiny_model_path), "-b", str(BATCH), "--device", "cpu", "--threads", "1"]
    assert CliRunner().invoke(app, [*base, "-o", str(ref), "-q"]).exit_code == 0
    result = CliRunner().invoke(app, [*base, "-o", str(out), "--scheduler", local.scheduler_address])
    assert result.exit_code == 0, result.output
    assert "46 rows from 3 input(s) with tiny v0.0.1 on Dask" in result.output
    assert _rows(out) == _rows(ref)
    for bad in ("local:x", "local:0"):  # no workers would wait for ever
        result = CliRunner().invoke(app, [*base, "--scheduler", bad])
        assert result.exit_code == 2 and "expected local or local:N" in result.output
    # --precision is checked before a cluster starts, and reaches the workers' classifiers (test_dask_precision)
    result = CliRunner().invoke(app, [*base, "--scheduler", local.scheduler_address, "--precision", "fp64"])
    assert result.exit_code == 2 and "unknown precision 'fp64'" in result.output


def test_dask_precision_reaches_the_workers(cluster, inputs, tiny_model_path: Path) -> None:
    _, client = cluster
    with pytest.raises(InputError, match="unknown precision 'fp64'"):  # raised by a worker's Classifier
        sdask.classify_dask(client, inputs[:1], tiny_model_path, None, precision="fp64")


def test_dask_prep_reaches_the_workers(cluster, inputs, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    x = make_stamps(30, seed=4)
    x[2, :, :5] = np.nan
    want = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH).classify(x)
    pred = sdask.predict_dask(client, da.from_array(x, chunks=(8, 4, 21, 21)), tiny_model_path, batch_size=BATCH,
                              prep="device")  # fmt: skip
    assert pred.status.tolist() == want.status.tolist()
    np.testing.assert_allclose(pred.proba, want.proba, atol=2e-6)
    with pytest.raises(InputError, match="unknown prep 'gpu'"):  # on the client, before any task
        sdask.classify_dask(client, inputs[:1], tiny_model_path, None, prep="gpu")
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["classify", inputs[0], "-m", str(tiny_model_path), "--device", "cpu", "--prep",
                                 "host", "--scheduler", "local:1", "-o", str(out), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 23


def test_image_folders(cluster, tiny_image_model_path: Path, tmp_path: Path) -> None:
    from PIL import Image

    _, client = cluster
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(11):
        arr = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i % 3 else ".") / f"im{i:02d}.png")
    single = tmp_path / "single.png"
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(single)
    paths = [str(single), str(folder)]
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    _single(tiny_image_model_path, paths, ref)
    local = classify_files(Classifier(tiny_image_model_path, device="cpu"), paths, str(ref), progress=False)
    s = sdask.classify_dask(client, paths, tiny_image_model_path, str(out), batch_size=BATCH, chunk_rows=4)
    # the two paths form one reader, split into 3 tasks; both runs count the paths given
    assert s.rows == 12 and s.files == local.files == 2
    assert _rows(out) == _rows(ref)
    # the same image again, given after its folder: flagged as locally, though it is in another task
    again = [*paths, str(folder / "im00.png")]
    _single(tiny_image_model_path, again, ref)
    sdask.classify_dask(client, again, tiny_image_model_path, str(out), batch_size=BATCH, chunk_rows=4)
    assert _rows(out) == _rows(ref) and _rows(out)[-1]["status"] == "flagged: duplicate id"
    # an unreadable image is a failed row and an input error, as locally, with or without keep_going
    (folder / "sub" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for keep_going in (False, True):
        s = sdask.classify_dask(client, paths, tiny_image_model_path, str(out), chunk_rows=4, keep_going=keep_going)
        assert s.rows == 13 and len(s.file_errors) == 1 and "zz_broken.png: cannot read image" in s.file_errors[0]
        assert _rows(out)[-1]["status"].startswith("failed")


def test_foreign_labels_do_not_stop_a_dask_run(cluster, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    path = write_hits_h5(tmp_path / "other_scheme.h5", 6, labels=np.array([b"star"] * 6))
    s = sdask.classify_dask(client, [str(path)], tiny_model_path, str(tmp_path / "o.csv"))
    assert s.rows == 6 and not s.file_errors  # labels are only for --evaluate, which Dask does not do


# --- memory and cost per unit -------------------------------------------------------------
_BLOCKS_MADE: list[int] = []


def _block_made(x: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """A chunk of a Dask array, recorded when it is computed (in-process workers: the same list)."""
    _BLOCKS_MADE.append(block_info[0]["chunk-location"][0])  # type: ignore[index]
    return x


def test_dask_array_blocks_are_computed_as_units_are_submitted(cluster, tiny_model_path: Path, monkeypatch) -> None:
    import time

    _, client = cluster
    window = 2
    monkeypatch.setattr(sdask, "_window", lambda _client: window)
    x = make_stamps(40, seed=4)
    stamps = da.from_array(x, chunks=(4, 4, 21, 21)).map_blocks(_block_made, dtype=x.dtype)
    _BLOCKS_MADE.clear()
    card, sha, data = sdask._load_model(client, tiny_model_path)
    options = {"device": "cpu", "threads": 1, "threshold": None, "batch_size": BATCH, "precision": "fp32"}
    preds = []
    for k, (_, pred) in enumerate(sdask._array_results(client, stamps, data, sha, options)):
        # a block is computed only once its unit is submitted: at most the window ahead of the results
        assert len(set(_BLOCKS_MADE)) <= k + 1 + window
        preds.append(pred)
    assert sorted(_BLOCKS_MADE) == list(range(10))  # each block once
    got = Predictions.concat(preds)
    want = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH).classify(x)
    assert got.ids.tolist() == list(range(40)) and got.labels.tolist() == want.labels.tolist()
    np.testing.assert_array_equal(got.proba, want.proba)
    # nothing of the run is left on the cluster: neither results nor blocks
    for _ in range(50):
        left = [k for k in client.who_has() if "_score_block" in str(k) or "_block_made" in str(k)]
        if not left:
            break
        time.sleep(0.1)
    assert not left


def test_duplicate_ids_are_found_once_per_input(cluster, tiny_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    from stampclf.io import _hdf5

    _, client = cluster
    ids = np.array([5, 6, 5, 7, 6, 6, 8, 9, 10, 11, 5, 12, 13])  # duplicates within and across units of 3
    path = str(write_hits_h5(tmp_path / "dups.h5", len(ids), seed=6, ids=ids, chunks=True))
    ref, out = tmp_path / "ref.csv", tmp_path / "dask.csv"
    _single(tiny_model_path, [path], ref)
    scanned: list[int] = []
    real = _hdf5.duplicate_rows

    def counting(values: np.ndarray) -> np.ndarray:
        scanned.append(len(values))
        return real(values)

    monkeypatch.setattr(_hdf5, "duplicate_rows", counting)  # the in-process workers see it too
    s = sdask.classify_dask(client, [path], tiny_model_path, str(out), batch_size=BATCH, chunk_rows=3)
    assert s.rows == len(ids) and _rows(out) == _rows(ref)  # first occurrences unflagged, as in one process
    flagged = [r["id"] for r in _rows(out) if r["status"] == "flagged: duplicate id"]
    assert flagged == ["5", "6", "6", "5"]
    assert sum(scanned) == len(ids)  # the client's one scan; the 5 units read no whole id column


def test_model_cache_is_private_and_checked(tmp_path: Path, monkeypatch) -> None:
    import hashlib
    import os
    import stat
    import tempfile

    if not hasattr(os, "getuid"):
        pytest.skip("POSIX owners and modes")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = b"model bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / f"stampclf-{os.getuid()}"
    folder.mkdir(mode=0o700)
    planted = folder / f"model-{sha}.onnx"
    planted.write_bytes(b"x" * len(data))  # same size, other bytes: not used
    path = Path(sdask._model_file(data, sha))
    assert path == planted and path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    inode = path.stat().st_ino
    assert Path(sdask._model_file(data, sha)).stat().st_ino == inode  # right bytes: reused as is
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]
    # a folder of that name that others can write to is passed over
    folder.chmod(0o777)
    other = Path(sdask._model_file(data, sha))
    assert other.parent != folder and other.read_bytes() == data
    assert stat.S_IMODE(other.parent.stat().st_mode) == 0o700


# --- Ctrl-C with a local cluster ----------------------------------------------------------
def test_local_cluster_workers_ignore_sigint() -> None:
    import signal

    before = signal.getsignal(signal.SIGINT)
    with sdask.connect("local:1") as client:
        assert signal.getsignal(signal.SIGINT) is before  # only the worker processes ignore it
        ignored = client.run(lambda: __import__("signal").getsignal(2) == __import__("signal").SIG_IGN)
        assert list(ignored.values()) == [True]


def test_interrupt_while_the_local_cluster_starts_closes_it() -> None:
    import os
    import signal
    import threading
    import time

    class Fake:
        closed = False

        def close(self) -> None:
            Fake.closed = True

    def make() -> Fake:
        time.sleep(0.6)  # the cluster starting; Ctrl-C comes meanwhile
        return Fake()

    def ctrl_c() -> None:  # once the workers are spawned (SIGINT ignored, then handled again): no fixed delay
        seen, t0 = False, time.monotonic()
        while time.monotonic() - t0 < 10:
            ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            if not ignored and (seen or time.monotonic() - t0 > 0.15):  # (its short window may be missed)
                break
            seen |= ignored
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        sdask._start_ignoring_sigint(make, 0)
    timer.join()
    assert Fake.closed  # waited for the cluster to be up, then closed it
    assert signal.getsignal(signal.SIGINT) is before


def test_a_missing_snr_channel_is_derived_as_locally(cluster, tiny_model_path: Path, tmp_path: Path) -> None:
    _, client = cluster
    path = write_hits_h5(tmp_path / "no_snr.h5", 30, seed=4, drop=("SNR_images",), chunks=(10, 21, 21))
    out = tmp_path / "d.csv"
    sdask.classify_dask(client, [str(path)], tiny_model_path, str(out), batch_size=BATCH, chunk_rows=10)
    local = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=BATCH)
    preds = list(local.classify_file(path))
    assert [r["status"] for r in _rows(out)] == [s for p in preds for s in p.status]
    assert all(r["status"] == "flagged: snr_difference derived from difference" for r in _rows(out))
    np.testing.assert_allclose([float(r["p_real"]) for r in _rows(out)],
                               np.concatenate([p.proba[:, 1] for p in preds]), rtol=1e-6)


def test_a_damaged_labels_chunk_does_not_matter_without_evaluate(cluster, tiny_model_path: Path,
                                                                 tmp_path: Path) -> None:
    _, client = cluster
    bad = _chunked_file(tmp_path / "labels.h5", labels=np.arange(40) % 2)
    damage_chunk(bad, "labels", 3, nbytes=30)
    out = tmp_path / "o.csv"
    s = sdask.classify_dask(client, [str(bad)], tiny_model_path, str(out), batch_size=BATCH, chunk_rows=10)
    assert s.rows == 40 and not s.file_errors and all(r["status"] == "ok" for r in _rows(out))
