"""Runtime: Python API, CLI (CliRunner and a real subprocess), both HDF5 layouts, outputs."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import card_dict, make_stamps, write_hits_h5, write_model
from typer.testing import CliRunner

import stampclf
from stampclf import Classifier, ModelError
from stampclf.cli import app

runner = CliRunner()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_public_api_names() -> None:
    for name in ("Classifier", "list_models", "ModelCard", "read_card", "__version__"):
        assert name in stampclf.__all__
    assert isinstance(stampclf.list_models(), list)


def test_classifier_card_and_predictions(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    assert clf.card.name == clf.name == "tiny"
    assert clf.classes == ["bogus", "real"]
    x = make_stamps(20, seed=1)
    p = clf.predict_proba(x)
    assert p.shape == (20, 2) and np.allclose(p.sum(1), 1, atol=1e-6)
    labels = clf.predict(x)
    assert set(labels) <= {"bogus", "real"}
    expected = np.where(p[:, 1] >= clf.threshold, "real", "bogus")
    assert (labels == expected).all()


def test_threshold_changes_decisions(tiny_model_path: Path) -> None:
    x = make_stamps(50, seed=2)
    always = Classifier(tiny_model_path, device="cpu", threshold=0.0).predict(x)
    never = Classifier(tiny_model_path, device="cpu", threshold=1.0).predict(x)
    assert (always == "real").all()
    assert (never == "bogus").sum() >= 49  # only p == 1.0 exactly would pass


def test_batch_size_invariance(tiny_model_path: Path) -> None:
    x = make_stamps(300, seed=3)
    ref = Classifier(tiny_model_path, device="cpu", batch_size=4096).predict_proba(x)
    for bs in (1, 7):
        assert np.array_equal(Classifier(tiny_model_path, device="cpu", batch_size=bs).predict_proba(x), ref)


def test_classify_file_streams_in_input_order(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=37, seed=4)
    clf = Classifier(tiny_model_path, device="cpu", batch_size=8)
    batches = list(clf.classify_file(path))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    ids = np.concatenate([b.ids for b in batches])
    assert list(ids) == list(range(1000, 1037))
    with h5py.File(path) as f:
        stamps = np.stack([f[k][...] for k in ("temp_images", "sci_images", "diff_images", "SNR_images")], 1)
    assert np.array_equal(np.concatenate([b.proba for b in batches]), clf.predict_proba(stamps))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layout="channels"),
        dict(layout="channels", flatten=True),
        dict(layout="channels", id_name="ID"),
        dict(layout="stacked"),
    ],
    ids=["hits", "hits-flat", "hits-ID", "stacked"],
)
def test_layouts_give_same_results(tiny_model_path: Path, tmp_path: Path, kwargs: dict) -> None:
    stamps = make_stamps(12, seed=5)
    ref = write_hits_h5(tmp_path / "ref.h5", stamps=stamps)
    path = write_hits_h5(tmp_path / "x.h5", stamps=stamps, **kwargs)
    a = runner.invoke(app, ["classify", str(ref), "--model", str(tiny_model_path), "--quiet"])
    b = runner.invoke(app, ["classify", str(path), "--model", str(tiny_model_path), "--quiet"])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ra, rb = _rows(a.stdout), _rows(b.stdout)
    assert len(rb) == 12
    assert [r["p_real"] for r in ra] == [r["p_real"] for r in rb]


def test_channels_last_option(tiny_model_path: Path, tmp_path: Path) -> None:
    stamps = make_stamps(6, seed=6)
    ref = write_hits_h5(tmp_path / "ref.h5", stamps=stamps, layout="stacked")
    last = write_hits_h5(tmp_path / "last.h5", stamps=stamps, layout="stacked", channels_last=True)
    a = runner.invoke(app, ["classify", str(ref), "-m", str(tiny_model_path), "-q"])
    b = runner.invoke(app, ["classify", str(last), "-m", str(tiny_model_path), "-q", "--channels-last"])
    assert b.exit_code == 0, b.output
    assert a.stdout == b.stdout.replace(str(last), str(ref))


def test_csv_output_columns_and_provenance(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=5)
    out = tmp_path / "out.csv"
    r = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = _rows(out.read_text())
    assert list(rows[0]) == ["id", "label", "p_bogus", "p_real", "status", "model", "model_version", "file"]
    assert {r["model"] for r in rows} == {"tiny"} and {r["model_version"] for r in rows} == {"0.0.1"}
    assert [r["id"] for r in rows] == ["1000", "1001", "1002", "1003", "1004"]
    assert "5 rows" in r.stderr


def test_api_rows_are_the_output_rows(tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Predictions.to_dict`` has the CLI's columns, provenance included, with the same values."""
    x = make_stamps(7, seed=2)
    x[3] = np.nan  # a failed row
    path = write_hits_h5(tmp_path / "s.h5", stamps=x)
    out = tmp_path / "out.csv"
    assert runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-o", str(out)]).exit_code == 0
    want = _rows(out.read_text())
    clf = Classifier(tiny_model_path, device="cpu", batch_size=3)
    parts = [p.to_dict() for p in clf.classify_file(path)]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert list(cols) == list(want[0]) and all(len(v) == 7 for v in cols.values())
    for k in ("id", "label", "status", "model", "model_version", "file"):
        assert [str(v) for v in cols[k]] == [r[k] for r in want], k
    for k in ("p_bogus", "p_real"):
        np.testing.assert_allclose(cols[k], [float(r[k]) if r[k] else np.nan for r in want], rtol=1e-6)
    mem = clf.classify(x)
    assert (mem.model, mem.model_version, mem.classes) == ("tiny", "0.0.1", ("bogus", "real"))
    assert list(mem.to_dict()) == list(want[0])
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        mem.to_pandas()


def test_hdf5_output_matches_csv(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=9)
    r1 = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-o", str(tmp_path / "o.h5")])
    r2 = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-q"])
    assert r1.exit_code == 0 and r2.exit_code == 0
    rows = _rows(r2.stdout)
    with h5py.File(tmp_path / "o.h5") as f:
        assert f.attrs["model"] == "tiny"
        assert f.attrs["model_weights_sha256"] == Classifier(tiny_model_path, device="cpu").card.weights_sha256
        assert [x.decode() for x in f["label"][...]] == [r["label"] for r in rows]
        assert np.allclose(f["p_real"][...], [float(r["p_real"]) for r in rows], rtol=1e-6)
        assert all(x.decode() == "0.0.1" for x in f["model_version"][...])


def test_hdf5_text_columns_widen_and_roll_back(tmp_path: Path) -> None:
    from stampclf.io._writers import ResultWriter

    out = tmp_path / "o.h5"
    w = ResultWriter(str(out), ["real", "bogus"], "hits", "1.1.0", extra_columns=("note",))
    p = np.full((3, 2), 0.5, "f4")
    w.write(np.array([1, 2, 3]), np.array(["real"] * 3, object), p, np.array(["ok"] * 3, object), "a.h5",
            {"note": np.array(["", "é", "x"], object)})
    w.mark()
    long = "flagged: " + "x" * 300  # wider than the column: it is rewritten wider, earlier rows kept
    w.write(np.array([4]), np.array(["bogus"], object), p[:1], np.array([long], object), "b" * 40)
    assert w.rollback()
    w.write(np.array([5, 6]), np.array(["bogus"] * 2, object), p[:2], np.array(["ok", long], object), ["c", "d"],
            {"note": np.array(["y", "z"], object)})
    w.commit()
    with h5py.File(out) as f:
        assert {k: f[k].shape[0] for k in f} == dict.fromkeys(f, 5)
        assert f["id"].dtype == np.int64 and f["id"][...].tolist() == [1, 2, 3, 5, 6]  # integers stay integers
        assert f["status"].asstr()[...].tolist() == ["ok", "ok", "ok", "ok", long]
        assert f["file"].asstr()[...].tolist() == ["a.h5", "a.h5", "a.h5", "c", "d"]
        assert f["note"].asstr()[...].tolist() == ["", "é", "x", "y", "z"]
        assert f["model"].asstr()[...].tolist() == ["hits"] * 5
        info = h5py.check_string_dtype(f["status"].dtype)
        assert (info.encoding, info.length) == ("utf-8", 512)  # fixed width, rounded up to a power of two
    empty = tmp_path / "e.h5"
    ResultWriter(str(empty), ["real", "bogus"], "hits", "1.1.0").commit()
    with h5py.File(empty) as f:  # no rows, but every column
        assert sorted(f) == ["file", "id", "label", "model", "model_version", "p_bogus", "p_real", "status"]


@pytest.mark.parametrize("suffix", [".h5", ".csv"])
def test_output_that_cannot_be_created_leaves_no_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    import builtins

    from stampclf import OutputError
    from stampclf.io._writers import ResultWriter

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError(37, "No locks available")  # as h5py says on a file system without locks

    monkeypatch.setattr(h5py, "File", refuse)
    monkeypatch.setattr(builtins, "open", refuse)
    out = tmp_path / f"o{suffix}"
    with pytest.raises(OutputError, match=rf"o\{suffix}: cannot create the output \(No locks available\)"):
        ResultWriter(str(out), ["real", "bogus"], "hits", "1.1.0")
    assert list(tmp_path.iterdir()) == []


def test_output_gets_the_umask_permissions(tmp_path: Path) -> None:
    from stampclf.io._writers import ResultWriter

    old = os.umask(0o027)
    try:
        w = ResultWriter(str(tmp_path / "o.csv"), ["real", "bogus"], "hits", "1.1.0")
        w.commit()
    finally:
        os.umask(old)
    assert (tmp_path / "o.csv").stat().st_mode & 0o777 == 0o640


def test_evaluate_prints_metrics(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=40)
    r = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-q", "--evaluate"])
    assert r.exit_code == 0, r.output
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert key in r.stderr


def test_evaluate_without_labels_is_an_error(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=4, labels=None)
    r = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "-q", "--evaluate"])
    assert r.exit_code == 2 and "labels" in r.stderr


def test_version_models_info(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and stampclf.__version__ in r.stdout
    monkeypatch.setenv("STAMPCLF_MODELS", str(tiny_model_path.parent))
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and tiny_model_path.stem in r.stdout
    r = runner.invoke(app, ["info", str(tiny_model_path)])
    assert r.exit_code == 0 and '"weights_sha256"' in r.stdout and '"channels"' in r.stdout


def test_models_says_when_stampclf_models_names_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMPCLF_MODELS", str(tmp_path / "nonexistent"))
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and "hits" in r.stdout  # the shipped models are still listed
    assert r.stderr.strip() == f"stampclf: $STAMPCLF_MODELS names no folder {tmp_path / 'nonexistent'}"


def test_models_columns_line_up_with_a_long_local_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "models"
    mine.mkdir()
    write_model(mine / "a.onnx", card_dict(name="a", version="1.1.0+local.20261123.1a2b3c4d"))
    write_model(mine / "bb.onnx", card_dict(name="bb", version="2.0.0"))
    monkeypatch.setenv("STAMPCLF_MODELS", str(mine))
    r = runner.invoke(app, ["models"])
    rows = [line for line in r.stdout.splitlines() if line.split()[0] in ("a", "bb")]
    assert len(rows) == 2 and len({line.index(" real-bogus") for line in rows}) == 1, r.stdout


def test_shipped_name_resolution(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMPCLF_MODELS", str(tiny_model_path.parent))
    assert Classifier(tiny_model_path.stem, device="cpu").name == "tiny"
    with pytest.raises(ModelError, match=r"unknown model .definitely-not-a-model.; models: .*tiny"):
        Classifier("definitely-not-a-model")


def test_device_cuda_without_gpu_is_a_clear_error(tiny_model_path: Path, tmp_path: Path) -> None:
    from stampclf._session import _gpu_present

    if _gpu_present():
        pytest.skip("a GPU is present")
    path = write_hits_h5(tmp_path / "s.h5", n=3)
    r = runner.invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "--device", "cuda"])
    assert r.exit_code == 2
    assert "CUDA cannot be used" in r.stderr and "Traceback" not in r.output


def test_device_auto_falls_back_with_one_clean_line(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=3)
    r = subprocess.run(
        [sys.executable, "-m", "stampclf", "classify", str(path), "-m", str(tiny_model_path), "-o", str(tmp_path / "o.csv")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2, lines  # at most the device notice and the summary
    assert not any("onnxruntime" in ln.lower() and "error" in ln.lower() for ln in lines)


def test_subprocess_cli_never_imports_torch(tiny_model_path: Path, tmp_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", n=3)
    code = (
        "import sys\n"
        "from stampclf.cli import app\n"
        f"try:\n    app(['classify', {str(path)!r}, '-m', {str(tiny_model_path)!r}, '-q', '-o', {str(tmp_path / 'o.h5')!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "import stampclf\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_console_script_help() -> None:
    r = subprocess.run([sys.executable, "-m", "stampclf", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "classify" in r.stdout


def test_default_batch_size_comes_from_the_card(tmp_path: Path) -> None:
    from conftest import card_dict, write_model

    card = card_dict()
    card["input"]["default_batch_size"] = 48
    path = write_model(tmp_path / "m.onnx", card)
    assert Classifier(path, device="cpu").batch_size == 48
    assert Classifier(path, device="cpu", batch_size=7).batch_size == 7
    assert Classifier(write_model(tmp_path / "old.onnx", card_dict()), device="cpu").batch_size == 1024
    card["input"]["default_batch_size"] = "lots"
    with pytest.raises(ModelError, match="default_batch_size 'lots'"):
        Classifier(write_model(tmp_path / "bad.onnx", card), device="cpu")


def test_rows_with_non_finite_model_output_are_failed_not_labelled(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    status = np.array(["ok", "flagged: duplicate id", "ok"], dtype=object)
    proba = np.array([[np.nan, np.nan], [0.2, np.inf], [0.3, 0.7]], np.float32)
    proba, labels = clf._finish(proba, status)
    assert status.tolist() == ["failed: model output not finite"] * 2 + ["ok"]
    assert labels.tolist() == ["", "", "real"] and np.isnan(proba[:2]).all()


def test_metrics_say_what_they_average() -> None:
    from stampclf import metrics

    y = np.array([0, 1, 2, 2])
    proba = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    m = metrics.summary(y, proba, proba.argmax(1), ["a", "b", "c"])
    assert m["average"] == "macro" and m["per_class"]["c"]["recall"] == 0.5
    m = metrics.summary(y[:2], proba[:2, :2], np.array([0, 1]), ["bogus", "real"], positive=1)
    assert m["average"] == "class real"


def test_macro_precision_counts_classes_predicted_but_absent() -> None:
    from stampclf import metrics

    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 is predicted once and never true: its precision is 0
    m = metrics.summary(y, np.eye(3)[pred], pred, ["a", "b", "c"])
    assert m["precision"] == pytest.approx((1 + 1 + 0) / 3)  # was (1 + 1) / 2, flattering


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.roc_auc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.8])), "1 of 3 scores are not finite"),
    (lambda m: m.roc_auc(np.array([0, 1]), np.eye(2)), "must be 1-D and of one length"),
    (lambda m: m.roc_auc(np.array(["real", "bogus"]), np.array([0.9, 0.1])), "label_indices"),
    (lambda m: m.roc_auc(np.array([1, 2]), np.array([0.9, 0.1])), "must be 0/1 or booleans"),
    (lambda m: m.confusion_matrix(np.array([0, 1]), np.array([0, -1]), 2), "holds -1, not a class index"),
    (lambda m: m.threshold_at_fpr(np.array([0, 1]), np.array([0.2, 0.8]), 5), "1 % is 0.01"),
    (lambda m: m.expected_calibration_error(np.array([0, 1]), np.array([0.2, 0.8])), "must be finite (N, K)"),
    (lambda m: m.summary(np.array([0, 1]), np.eye(2), np.array([0, 1]), ["a", "b"], positive="b"), "class index"),
])
def test_metrics_refuse_what_they_would_get_wrong(call: Any, message: str) -> None:
    from stampclf import InputError, metrics

    with pytest.raises(InputError, match=re.escape(message)):
        call(metrics)


def test_a_model_that_shadows_a_shipped_name_is_said(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    mine = tmp_path / "models"
    mine.mkdir()
    shutil.copy(tiny_model_path, mine / "hits.onnx")  # a retrained "hits"
    monkeypatch.setenv("STAMPCLF_MODELS", str(mine))
    clf = Classifier("hits", device="cpu")
    assert clf.name == "tiny" and clf.notice and "from $STAMPCLF_MODELS), not the shipped" in clf.notice
    r = CliRunner().invoke(app, ["info", "hits"])
    assert r.exit_code == 0 and "not the shipped" in r.stderr and '"name": "tiny"' in r.stdout
    monkeypatch.delenv("STAMPCLF_MODELS")
    assert Classifier("hits", device="cpu").notice is None


def test_classifier_closes_its_worker_threads(tiny_model_path: Path) -> None:
    import threading

    x = make_stamps(600, seed=1)
    with Classifier(tiny_model_path, device="cpu", threads=2, batch_size=512) as clf:
        first = clf.predict_proba(x)
        assert any(t.name.startswith("stampclf-cpu") for t in threading.enumerate())
    assert not any(t.name.startswith("stampclf-cpu") for t in threading.enumerate())
    np.testing.assert_array_equal(clf.predict_proba(x), first)  # usable again after close
    clf.close()


def test_card_refuses_class_names_that_cannot_be_columns(tmp_path: Path) -> None:
    from conftest import card_dict, write_model

    card = card_dict()
    card["classes"] = ["bogus", "re/al"]
    with pytest.raises(ModelError, match="class name 're/al'"):
        Classifier(write_model(tmp_path / "m.onnx", card=card), device="cpu")


def test_hdf5_text_column_with_a_very_long_value_becomes_variable_length(tmp_path: Path) -> None:
    from stampclf.io._writers import ResultWriter

    out = tmp_path / "o.h5"
    w = ResultWriter(str(out), ["real", "bogus"], "hits", "1.1.0")
    p = np.full((2, 2), 0.5, "f4")
    huge = "failed: " + "é" * 5000  # 10 kB: padding every row to it would cost more than a heap entry
    w.write(np.array([1, 2]), np.array(["real"] * 2, object), p, np.array(["ok", "flagged: x"], object), "a.h5")
    w.write(np.array([3, 4]), np.array(["", "real"], object), p, np.array([huge, "ok"], object), "a.h5")
    w.commit()
    with h5py.File(out) as f:
        assert f["status"].asstr()[...].tolist() == ["ok", "flagged: x", huge, "ok"]
        assert h5py.check_string_dtype(f["status"].dtype).length is None  # variable-length now
        assert h5py.check_string_dtype(f["label"].dtype).length == 16  # the others stay fixed


def test_float_ids_read_the_same_in_csv_and_hdf5(tmp_path: Path) -> None:
    import csv as csv_mod

    from stampclf.io._writers import ResultWriter

    ids = np.array([0.1, 2.5, 1e7 + 1], np.float32)
    for name in ("o.csv", "o.h5"):
        w = ResultWriter(str(tmp_path / name), ["real", "bogus"], "m", "1")
        w.write(ids, np.array(["real"] * 3, object), np.full((3, 2), 0.5, "f4"), np.array(["ok"] * 3, object), "f")
        w.commit()
    with open(tmp_path / "o.csv", newline="") as fh:
        in_csv = [r["id"] for r in csv_mod.DictReader(fh)]
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["id"].asstr()[...].tolist() == in_csv == [str(v) for v in ids]


def test_hdf5_output_ids_are_int64_until_an_id_is_not_an_integer(tmp_path: Path) -> None:
    from stampclf.io._writers import ResultWriter

    def write(path: Path, *batches: Any) -> Any:
        w = ResultWriter(str(path), ["real", "bogus"], "m", "1")
        for ids in batches:
            n = len(ids)
            w.write(ids, np.array(["real"] * n, object), np.full((n, 2), 0.5, "f4"), np.array(["ok"] * n, object), "f")
        w.commit()
        return h5py.File(path)

    big = 675208700015010000  # a ZTF candid: 18 digits
    with write(tmp_path / "a.h5", np.array([big, 2], np.int64), np.array([3, -4], object)) as f:
        assert f["id"].dtype == np.int64 and f["id"][...].tolist() == [big, 2, 3, -4]
    # a later input with text ids (image paths, FITS names): the column becomes text, every id kept in full
    with write(tmp_path / "b.h5", np.array([big, 7], np.int64), np.array(["x.png"], object)) as f:
        assert f["id"].asstr()[...].tolist() == [str(big), "7", "x.png"]
    with write(tmp_path / "c.h5", np.array([2**64 - 1], np.uint64)) as f:  # beyond int64: text, exact
        assert f["id"].asstr()[...].tolist() == [str(2**64 - 1)]
    with write(tmp_path / "d.h5", np.array([big, 5], np.uint64), np.array([np.int64(6)], object)) as f:
        assert f["id"].dtype == np.int64 and f["id"][...].tolist() == [big, 5, 6]  # they fit: integers


@pytest.mark.parametrize("first", [True, False])  # the failed input came after integer ids; or first of all
def test_a_rolled_back_input_does_not_leave_integer_ids_as_text(tmp_path: Path, first: bool) -> None:
    from stampclf.io._writers import ResultWriter

    w = ResultWriter(str(tmp_path / "o.h5"), ["real", "bogus"], "m", "1")

    def write(ids: Any) -> None:
        n = len(ids)
        w.write(ids, np.array(["real"] * n, object), np.full((n, 2), 0.5, "f4"), np.array(["ok"] * n, object), "f")

    kept = [] if first else [1, 2]
    if kept:
        write(np.array(kept))
    w.mark()
    write(np.array(["record0", "x"], object))  # --keep-going: this input fails later, its rows are dropped
    assert w.rollback()
    write(np.array([3, 4]))
    w.commit()
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["id"].dtype == np.int64 and f["id"][...].tolist() == [*kept, 3, 4]


def test_models_lists_the_good_ones_beside_a_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    monkeypatch.setenv("STAMPCLF_MODELS", str(tmp_path))
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 2 and "hits" in r.stdout and "junk.onnx" in r.stderr


def test_output_to_dev_null_is_accepted_and_left_a_device(tmp_path: Path, tiny_model_path: Path) -> None:
    import stat

    path = write_hits_h5(tmp_path / "s.h5", n=5)
    r = CliRunner().invoke(app, ["classify", str(path), "-m", str(tiny_model_path), "--device", "cpu", "-o", os.devnull])
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # written to, never renamed over


def test_in_memory_input_mistakes_get_a_hint(tiny_model_path: Path) -> None:
    from PIL import Image

    from stampclf import InputError
    from stampclf.preprocess import prepare_stamps

    clf = Classifier(tiny_model_path, device="cpu")
    x = make_stamps(3, seed=1)
    with pytest.raises(InputError, match=r"one stamp needs the batch axis: stamp\[None\]"):
        clf.classify(x[0])
    with pytest.raises(InputError, match="classifies stamps .* not images"):
        clf.classify([Image.new("RGB", (21, 21))])
    ready, _ = prepare_stamps(x, clf.card.input, clf.card.preprocessing)
    np.testing.assert_array_equal(clf.classify(ready, preprocessed=True).proba, clf.classify(x).proba)
    with pytest.raises(InputError, match=r"preprocessed input: expected float32 of shape \(N, 4, 21, 21\)"):
        clf.predict_proba(ready[:, :3], preprocessed=True)


def test_classify_file_labels_modes_and_evaluate(tiny_model_path: Path, tmp_path: Path) -> None:
    from stampclf import InputError

    good = write_hits_h5(tmp_path / "good.h5", 12, seed=3)
    other = write_hits_h5(tmp_path / "other.h5", 12, seed=3, labels=np.full(12, 2))  # not this model's classes
    clf = Classifier(tiny_model_path, device="cpu", batch_size=5)
    assert all(p.true_labels is None for p in clf.classify_file(other))  # auto: left out
    with pytest.raises(InputError, match="label 2 is not a class index 0..1"):
        list(clf.classify_file(other, labels="check"))
    with pytest.raises(InputError, match="no labels"):
        list(clf.classify_file(write_hits_h5(tmp_path / "none.h5", 4, labels=None), labels="check"))
    assert all(p.true_labels is None for p in clf.classify_file(good, labels="skip"))
    with pytest.raises(InputError, match="batch_size=0"):
        list(clf.classify_file(good, batch_size=0))
    m = clf.evaluate(clf.classify_file(good, labels="check"))
    out = tmp_path / "o.csv"
    r = runner.invoke(app, ["classify", str(good), "-m", str(tiny_model_path), "-o", str(out), "--evaluate"])
    assert r.exit_code == 0 and f"accuracy: {m['accuracy']:.4f}" in r.stderr and m["n"] == 12
    with pytest.raises(InputError, match="no true labels"):
        clf.evaluate(clf.classify_file(other))


def test_threshold_by_operating_point_name_and_checked_when_set(tiny_model_path: Path, tmp_path: Path) -> None:
    from stampclf import InputError

    card = card_dict(operating_points={"fpr_1pct": {"threshold": 0.8, "val_fpr": 0.01, "val_tpr": 0.9}})
    model = write_model(tmp_path / "op.onnx", card)
    clf = Classifier(model, device="cpu", threshold="fpr_1pct")
    assert clf.threshold == 0.8
    clf.threshold = "0.25"
    assert clf.threshold == 0.25
    for bad, message in (("high", r"neither a number in \[0, 1\] nor an operating point"), (1.5, r"not a number in \[0, 1\]"),
                         (True, "not a number")):
        with pytest.raises(InputError, match=message):
            clf.threshold = bad
    assert clf.threshold == 0.25  # a refused value changes nothing
    clf.threshold = None
    assert clf.threshold == clf.card.threshold
    out = tmp_path / "o.h5"
    r = runner.invoke(app, ["classify", str(write_hits_h5(tmp_path / "s.h5", 4)), "-m", str(model), "-o", str(out),
                            "--threshold", "fpr_1pct"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert float(f.attrs["threshold"]) == 0.8


@pytest.mark.parametrize("kwargs", [{"batch_size": 1.5}, {"batch_size": 0}, {"threads": "2"}, {"threads": True}])
def test_classifier_options_are_checked_at_once(tiny_model_path: Path, kwargs: dict[str, Any]) -> None:
    from stampclf import InputError

    name = next(iter(kwargs))
    with pytest.raises(InputError, match=f"{name}=.*expected an integer of at least 1"):
        Classifier(tiny_model_path, device="cpu", **kwargs)
    clf = Classifier(tiny_model_path, device="cpu")
    with pytest.raises(InputError, match="batch_size=0"):
        clf.batch_size = 0
    with pytest.raises(InputError, match="give a shipped model's name"):
        Classifier(None)  # type: ignore[arg-type]


def test_predictions_join_and_slice(tiny_model_path: Path, tmp_path: Path) -> None:
    from stampclf import Predictions

    a, b = write_hits_h5(tmp_path / "a.h5", 7, seed=1), write_hits_h5(tmp_path / "b.h5", 4, seed=2)
    clf = Classifier(tiny_model_path, device="cpu", batch_size=3)
    parts = list(clf.classify_file([a, b]))
    whole = Predictions.concat(parts)
    assert len(whole) == 11 and whole.file.tolist() == [str(a)] * 7 + [str(b)] * 4
    assert whole.true_labels is not None and whole.model == "tiny"
    np.testing.assert_array_equal(whole.proba, np.concatenate([p.proba for p in parts]))
    assert whole[2:4].ids.tolist() == whole.ids[2:4].tolist() and len(whole[whole.labels == "real"]) == int(
        (whole.labels == "real").sum())
    assert whole[0].to_dict()["model"].tolist() == ["tiny"]
    assert whole != Predictions.concat(parts)  # identity, not an ambiguous array comparison


def test_numpy_scalars_and_empty_inputs_are_ordinary_values(tiny_model_path: Path, tmp_path: Path) -> None:
    from stampclf import InputError, Predictions, metrics

    clf = Classifier(tiny_model_path, device="cpu", threshold=np.float32(0.25), batch_size=np.int64(4))
    assert clf.threshold == 0.25 and clf.batch_size == 4
    clf.threshold = np.int64(1)
    path = write_hits_h5(tmp_path / "a.h5", 6)
    assert [len(p) for p in clf.classify_file(path, batch_size=np.int64(4))] == [4, 2]
    whole = Predictions.concat(clf.classify_file(path))
    assert len(whole[[]]) == 0 and len(whole[np.array([], bool)]) == 0
    y = np.array([0.0, 1.0, 1.0, 0.0])  # labels stored as floats
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    assert metrics.summary(y, p, p.argmax(1), ["bogus", "real"], 1)["accuracy"] == 0.75
    with pytest.raises(InputError, match="evaluate: no results"):
        clf.evaluate([])
    unlabelled = write_hits_h5(tmp_path / "u.h5", 3, labels=None)
    with pytest.raises(InputError, match="u.h5 have no true labels"):  # not figures of half the rows
        clf.evaluate(clf.classify_file([path, unlabelled]))


def test_a_file_name_that_is_not_utf8_is_written_as_its_bytes(tiny_model_path: Path, tmp_path: Path) -> None:
    """Linux names are bytes: the CSV file and the HDF5 column name the input as the file system does."""
    raw = bytes(tmp_path) + b"/st\xffamps.h5"
    name = os.fsdecode(raw)
    write_hits_h5(Path(name), 3)
    listing = tmp_path / "inputs.txt"
    listing.write_bytes(raw + b"\n")  # as `find` writes it
    for out in (tmp_path / "o.csv", tmp_path / "o.h5"):
        r = runner.invoke(app, ["classify", "--files-from", str(listing), "-m", str(tiny_model_path), "-o", str(out)])
        assert r.exit_code == 0, r.output
        if out.suffix == ".csv":
            assert [line.rsplit(b",", 1)[1] for line in out.read_bytes().splitlines()[1:]] == [raw] * 3
        else:
            with h5py.File(out) as h5:
                assert h5["file"][:].tolist() == [raw] * 3


def test_classify_files_takes_one_path_or_many_as_str_or_pathlike(tiny_model_path: Path, tmp_path: Path) -> None:
    """As classify_file does: one str or Path, or a list or generator of them; anything else is one InputError."""
    from stampclf import InputError, classify_files

    a = write_hits_h5(tmp_path / "a.h5", 3)
    clf = Classifier(tiny_model_path, device="cpu")
    out = tmp_path / "o.csv"
    for inputs in (str(a), a, [a], (p for p in [str(a)])):
        out.unlink(missing_ok=True)
        assert classify_files(clf, inputs, out, progress=False).rows == 3 and len(_rows(out.read_text())) == 3
    for bad in (3, [a, None]):
        with pytest.raises(InputError, match=r"input path (3|None): expected a file name"):
            classify_files(clf, bad, out, progress=False)


def test_concat_keeps_every_parts_extra_columns(tiny_model_path: Path) -> None:
    from stampclf import Predictions

    clf = Classifier(tiny_model_path, device="cpu")
    a, b = clf.classify(make_stamps(2)), clf.classify(make_stamps(3))
    b.extra = {"object_id": np.array(["x", "y", "z"], dtype=object)}
    for parts, want in (([a, b], ["", "", "x", "y", "z"]), ([b, a], ["x", "y", "z", "", ""])):
        assert Predictions.concat(parts).extra["object_id"].tolist() == want  # type: ignore[index]


def test_files_from_a_list_or_stdin(tiny_model_path: Path, tmp_path: Path) -> None:
    a, b = write_hits_h5(tmp_path / "a.h5", 3, seed=1), write_hits_h5(tmp_path / "b.h5", 2, seed=2)
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# tonight\n{b}\n\n")
    out = tmp_path / "o.csv"
    r = runner.invoke(app, ["classify", str(a), "--files-from", str(listing), "-m", str(tiny_model_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert [row["file"] for row in _rows(out.read_text())] == [str(a)] * 3 + [str(b)] * 2  # arguments first
    r = runner.invoke(app, ["classify", "--files-from", "-", "-m", str(tiny_model_path), "-o", str(out)],
                      input=f"{a}\n")
    assert r.exit_code == 0 and len(_rows(out.read_text())) == 3
    r = runner.invoke(app, ["classify", "--files-from", str(tmp_path / "none.txt"), "-m", str(tiny_model_path)])
    assert r.exit_code == 2 and "--files-from" in r.stderr and "does not exist" in r.stderr
    r = runner.invoke(app, ["classify", "-m", str(tiny_model_path)])
    assert r.exit_code == 2 and "no input files given" in r.stderr
