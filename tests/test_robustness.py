"""Robustness: a corpus of malformed inputs, models and outputs, and the documented behaviour for odd data.

Every corpus case runs ``stampclf classify`` and asserts the exact exit code, exactly one
``error`` line on stderr that names the offending file and the problem, no traceback, and no
output file (nor a leftover temporary file) in the output folder. See docs/robustness.md.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import card_dict, damage_chunk, make_stamps, write_hits_h5, write_model
from typer.testing import CliRunner

from stampclf import Classifier, InputError, ModelError
from stampclf.cli import app

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------
def run_cli(*args: str) -> Any:
    """Invoke the CLI in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def stderr_of(result: Any) -> str:
    return result.stderr if hasattr(result, "stderr") else result.output


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "error" in ln.lower()]


def leftovers(folder: Path, name: str) -> list[str]:
    """The output and any temporary file of it left in *folder*."""
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def parse_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


# --- the corpus ----------------------------------------------------------------------------
@dataclass
class Case:
    """One malformed input: how to build it, and what the CLI must say."""

    build: Callable[[Path, dict[str, Path]], list[str]]  # -> extra CLI args (inputs, options)
    phrase: str  # key phrase of the message
    names: str | None = None  # the file the message must name ("" = no file, None = first input)
    code: int = 2
    model: str = "tiny"  # "tiny", "image" or "" (the case gives --model itself)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    output: str = "out.csv"
    meta: dict[str, Any] = field(default_factory=dict)


def _h5(name: str, **kw: Any) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        return [str(write_hits_h5(d / name, 6, **kw))]

    return build


def _raw(name: str, data: bytes) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        (d / name).write_bytes(data)
        return [str(d / name)]

    return build


def _truncated(d: Path, _m: dict[str, Path]) -> list[str]:
    path = write_hits_h5(d / "truncated.h5", 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [str(path)]


def _bad_superblock(d: Path, _m: dict[str, Path]) -> list[str]:
    path = write_hits_h5(d / "corrupt.h5", 8)
    data = bytearray(path.read_bytes())
    data[8:200] = b"\xff" * 192  # keep the signature, destroy the superblock and root group
    path.write_bytes(bytes(data))
    return [str(path)]


def _group_as_channel(d: Path, _m: dict[str, Path]) -> list[str]:
    path = write_hits_h5(d / "group.h5", 4, drop=("temp_images",))
    with h5py.File(path, "a") as f:
        f.create_group("temp_images")
    return [str(path)]


def _channel_model(policy: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        card = card_dict()
        card["preprocessing"]["size_policy"] = policy
        model = write_model(d / "strict.onnx", card)
        return [str(write_hits_h5(d / "big_stamps.h5", 3, stamps=make_stamps(3, size=(25, 25)))), "--model", str(model)]

    return build


def _model(name: str, make: Callable[[Path], Path]) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        return [str(write_hits_h5(d / "good.h5", 4)), "--model", str(make(d))]

    return build


def _card_json(text: str) -> Callable[[Path], Path]:
    return lambda d: write_model(d / "model.onnx", card_json=text, fix_sha=False)


def _card_without(*keys: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        card = card_dict()
        for k in keys:
            card.pop(k)
        return write_model(d / "model.onnx", card, fix_sha=False)

    return make


def _sha_mismatch(d: Path) -> Path:
    return write_model(d / "model.onnx", card_dict(weights_sha256="ab" * 32), fix_sha=False)


def _no_card(d: Path) -> Path:
    import onnx

    model = onnx.load_from_string(write_model(d / "tmp.onnx").read_bytes())
    del model.metadata_props[:]
    (d / "model.onnx").write_bytes(model.SerializeToString())
    return d / "model.onnx"


def _graph_mismatch(d: Path) -> Path:
    return write_model(d / "model.onnx", card_dict(), height=15, width=15)


def _with_output(
    name: str, prepare: Callable[[Path], None] | None = None
) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        if prepare:
            prepare(d)
        return [str(write_hits_h5(d / "good.h5", 4)), "-o", str(d / name)]

    return build


def _images(*files: tuple[str, bytes | None]) -> Callable[[Path, dict[str, Path]], list[str]]:
    def build(d: Path, _m: dict[str, Path]) -> list[str]:
        from PIL import Image

        out = []
        for name, data in files:
            p = d / name
            if data is None:
                Image.new("RGB", (12, 10), (200, 10, 10)).save(p)
            else:
                p.write_bytes(data)
            out.append(str(p))
        return out

    return build


def _empty_dir(d: Path, _m: dict[str, Path]) -> list[str]:
    (d / "empty_folder").mkdir()
    (d / "empty_folder" / "notes.txt").write_text("no images here")
    return [str(d / "empty_folder")]


def _patch_h5_open(exc: BaseException) -> Callable[[pytest.MonkeyPatch], None]:
    real = h5py.File

    def fake(name: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if mode == "r" and str(name).endswith("locked.h5"):
            raise exc
        return real(name, mode, *a, **k)

    return lambda mp: mp.setattr(h5py, "File", fake)


def _patch_mid_read(mp: pytest.MonkeyPatch) -> None:
    """h5py fails while reading rows (a damaged chunk): must surface as InputError naming the file."""
    _fail_row_reads(mp, lambda ds, rows: ds.name == "/diff_images", "Can't synchronously read data (inflate() failed)")


def _fail_row_reads(mp: pytest.MonkeyPatch, when: Callable[[Any, slice], bool], message: str) -> None:
    """h5py raises OSError(*message*) for a slice of rows for which *when(dataset, rows)* holds.

    Both ways h5py reads rows are patched: indexing and ``read_direct``; the reader's own
    reads of plain datasets (``os.preadv``) are turned off, so that h5py reads everything.
    """
    mp.setattr("stampclf.io._hdf5._DIRECT", False)
    real, real_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def fake(self: Any, key: Any) -> Any:
        if isinstance(key, slice) and when(self, key):
            raise OSError(message)
        return real(self, key)

    def fake_direct(self: Any, dest: Any, source_sel: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source_sel, slice) and when(self, source_sel):
            raise OSError(message)
        return real_direct(self, dest, source_sel, *args, **kwargs)

    mp.setattr(h5py.Dataset, "__getitem__", fake)
    mp.setattr(h5py.Dataset, "read_direct", fake_direct)


def _patch_no_write(mp: pytest.MonkeyPatch) -> None:
    real = os.open

    def fake(path: Any, *a: Any, **k: Any) -> Any:
        if str(path).endswith(".part"):  # the output's temporary file
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)

    mp.setattr(os, "open", fake)


CORPUS: dict[str, Case] = {
    # --- files ------------------------------------------------------------------------------
    "text_as_h5": Case(_raw("notes.h5", b"id,flux\n1,2\n"), "not an HDF5 file"),
    "empty_h5": Case(_raw("empty.h5", b""), "not an HDF5 file"),
    "unknown_type": Case(_raw("stamps.dat", b"\x00\x01garbage"), "unknown input type"),
    "truncated_h5": Case(_truncated, "truncated"),
    "corrupt_superblock": Case(_bad_superblock, "HDF5"),
    "missing_path": Case(lambda d, m: [str(d / "nowhere.h5")], "does not exist"),
    "no_read_permission": Case(
        lambda d, m: [str(write_hits_h5(d / "locked.h5", 4))],
        "no permission to read",
        patch=_patch_h5_open(PermissionError(13, "Permission denied")),
    ),
    "missing_channel": Case(_h5("three.h5", drop=("sci_images",)), "missing dataset(s) ['sci_images']"),
    "no_snr_no_difference": Case(
        _h5("two.h5", drop=("diff_images", "SNR_images")), "missing dataset(s) ['diff_images', 'SNR_images']"
    ),
    "unknown_layout": Case(
        _h5(
            "other.h5",
            datasets={"cutouts": np.zeros((3, 21, 21))},
            drop=("temp_images", "sci_images", "diff_images", "SNR_images"),
        ),
        "unknown layout",
    ),
    "group_not_dataset": Case(_group_as_channel, "is a group"),
    "channels_disagree_length": Case(
        _h5("ragged.h5", datasets={"sci_images": np.zeros((5, 21, 21), "f4")}), "disagree in length"
    ),
    "channels_disagree_size": Case(
        _h5("sizes.h5", datasets={"sci_images": np.zeros((6, 25, 25), "f4")}), "disagree in stamp size"
    ),
    "channel_rank_1": Case(_h5("rank1.h5", datasets={"diff_images": np.zeros(6, "f4")}), "expected (N, H, W)"),
    "channel_rank_4": Case(
        _h5("rank4.h5", datasets={"diff_images": np.zeros((6, 1, 21, 21), "f4")}), "expected (N, H, W)"
    ),
    "flat_not_square": Case(_h5("flat.h5", datasets={"diff_images": np.zeros((6, 440), "f4")}), "not a square stamp"),
    "stacked_rank_3": Case(
        _h5(
            "stack3.h5",
            layout="stacked",
            stamps=np.zeros((6, 4, 21, 21), "f4"),
            datasets={"stamps": np.zeros((6, 4, 441), "f4")},
        ),
        "expected (N, C, H, W)",
    ),
    "both_layouts": Case(
        _h5("both.h5", datasets={"stamps": np.zeros((6, 4, 21, 21), "f4")}),
        "both a 'stamps' dataset and per-channel datasets",
    ),
    "stacked_3_channels": Case(
        _h5("stack_c3.h5", layout="stacked", stamps=np.zeros((6, 3, 21, 21), "f4")), "has 3 channel(s)"
    ),
    "bool_pixels": Case(_h5("bool.h5", stamps=np.zeros((6, 4, 21, 21), bool)), "dtype bool"),
    "string_pixels": Case(
        _h5(
            "text.h5",
            layout="stacked",
            stamps=np.zeros((2, 4, 21, 21), "f4"),
            datasets={"stamps": np.full((2, 4, 21, 21), "x", dtype="S1")},
        ),
        "dtype |S1",
    ),
    "complex_pixels": Case(_h5("complex.h5", stamps=np.zeros((6, 4, 21, 21), np.complex64)), "dtype complex64"),
    "ids_wrong_length": Case(_h5("ids.h5", ids=np.arange(5)), "ids dataset 'id' has shape (5,)"),
    "ids_2d": Case(_h5("ids2d.h5", ids=np.zeros((6, 2))), "ids dataset 'id' has shape (6, 2)"),
    "labels_wrong_length": Case(
        lambda d, m: [*_h5("labels.h5", labels=np.zeros(9, int))(d, m), "--evaluate"],
        "labels dataset 'labels' has shape (9,); expected (6,)",
    ),
    # labels are checked only for --evaluate (test_foreign_labels_are_ignored_without_evaluate)
    "labels_not_classes": Case(
        lambda d, m: [*_h5("labels7.h5", labels=np.full(6, 7))(d, m), "--evaluate"], "label 7 is not a class index"
    ),
    "labels_unknown_name": Case(
        lambda d, m: [*_h5("labelname.h5", labels=np.array([b"star"] * 6))(d, m), "--evaluate"],
        "label 'star' is not one of",
    ),
    "empty_stamp_pixels": Case(_h5("zero_px.h5", stamps=np.zeros((6, 4, 0, 0), "f4")), "stamps are empty"),
    "wrong_size_strict_card": Case(_channel_model("strict"), "stamps are 25x25 but the model needs 21x21", model=""),
    "mid_read_failure": Case(_h5("damaged_chunk.h5"), "cannot read rows 0-5", patch=_patch_mid_read),
    "evaluate_without_labels": Case(
        lambda d, m: [str(write_hits_h5(d / "nolabels.h5", 4, labels=None)), "--evaluate"], "no labels"
    ),
    "folder_given_to_stamp_model": Case(_empty_dir, "only image models read folders"),
    "image_given_to_stamp_model": Case(_images(("pic.png", None)), "classifies 4-channel stamps"),
    # --- outputs ----------------------------------------------------------------------------
    "output_folder_missing": Case(
        _with_output("no/such/dir/out.csv"), "output folder", names="out.csv", output="no/such/dir/out.csv"
    ),
    "output_not_writable": Case(
        _with_output("out.csv"), "no permission to write", names="out.csv", patch=_patch_no_write
    ),
    "output_bad_extension": Case(
        _with_output("out.txt"), "unknown output format '.txt'", names="out.txt", output="out.txt"
    ),
    "output_is_folder": Case(
        _with_output("out.csv", lambda d: (d / "out.csv").mkdir()),
        "output path is a folder",
        names="out.csv",
        output="none",
    ),
    "output_is_input": Case(
        lambda d, m: [str(write_hits_h5(d / "same.h5", 4)), "-o", str(d / "same.h5")],
        "would overwrite the input",
        output="none",
    ),
    # --- models -----------------------------------------------------------------------------
    "model_missing": Case(
        _model("m", lambda d: d / "gone.onnx"), "model file does not exist", names="gone.onnx", model=""
    ),
    "model_not_onnx": Case(
        _model("m", lambda d: (d / "model.onnx").write_text("hello world, not a model") and d / "model.onnx"),
        "not an ONNX model",
        names="model.onnx",
        model="",
    ),
    "model_empty_file": Case(
        _model("m", lambda d: (d / "model.onnx").write_bytes(b"") or d / "model.onnx"),
        "not an ONNX model",
        names="model.onnx",
        model="",
    ),
    "model_is_folder": Case(
        _model("m", lambda d: (d / "dir.onnx").mkdir() or d / "dir.onnx"), "is a directory", names="dir.onnx", model=""
    ),
    "model_without_card": Case(_model("m", _no_card), "no stampclf model card", names="model.onnx", model=""),
    "card_invalid_json": Case(_model("m", _card_json("{name: tiny,")), "not valid JSON", names="model.onnx", model=""),
    "card_not_object": Case(_model("m", _card_json("[1, 2, 3]")), "not a JSON object", names="model.onnx", model=""),
    "card_missing_fields": Case(
        _model("m", _card_without("classes", "threshold")),
        "missing field(s): classes, threshold",
        names="model.onnx",
        model="",
    ),
    "card_bad_threshold": Case(
        _model("m", lambda d: write_model(d / "model.onnx", card_dict(threshold=2.0), validate=False)),
        "threshold 2.0",
        names="model.onnx",
        model="",
    ),
    "card_sha_mismatch": Case(_model("m", _sha_mismatch), "does not match the card", names="model.onnx", model=""),
    "card_disagrees_with_graph": Case(
        _model("m", _graph_mismatch), "does not match the model card", names="model.onnx", model=""
    ),
    "model_unknown_name": Case(
        lambda d, m: [str(write_hits_h5(d / "good.h5", 4)), "--model", "nope"],
        "; models: ",
        names="nope",
        model="",
    ),
    # --- usage ------------------------------------------------------------------------------
    "unknown_layout_option": Case(
        lambda d, m: [str(write_hits_h5(d / "good.h5", 4)), "--layout", "rows"], "unknown layout 'rows'", names=""
    ),
    "unknown_device": Case(
        lambda d, m: [str(write_hits_h5(d / "good.h5", 4)), "--device", "tpu"], "unknown device 'tpu'", names=""
    ),
    # --- images (image model) ---------------------------------------------------------------
    "unreadable_image": Case(  # alone: nothing could be scored, so no output (among others: a failed row)
        _images(("broken.png", b"\x89PNG\r\n\x1a\nnot really")),
        "cannot read image",
        names="broken.png",
        model="image",
    ),
    "folder_without_images": Case(_empty_dir, "folder contains no image files", model="image"),
    "h5_given_to_image_model": Case(_h5("stamps.h5"), "classifies images", model="image"),
}


@pytest.fixture(scope="module")
def models(
    tiny_model_path: Path, tiny_image_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return {"tiny": tiny_model_path, "image": tiny_image_model_path}


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_input(name: str, tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    case = CORPUS[name]
    monkeypatch.setenv("STAMPCLF_MODELS", str(models["tiny"].parent))
    args = case.build(tmp_path, models)
    if case.output != "none" and "-o" not in args:
        args += ["-o", str(tmp_path / case.output)]
    if case.model:
        args += ["--model", str(models[case.model])]
    if case.patch:
        case.patch(monkeypatch)
    if "--device" not in args:
        args += ["--device", "cpu"]
    result = run_cli("classify", *args)
    err = stderr_of(result)
    assert result.exit_code == case.code, (result.exit_code, err, result.exception)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = error_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("stampclf: error: ")
    assert case.phrase in line, line
    named = Path(args[0]).name if case.names is None else case.names
    assert named in line, line
    assert result.stdout == "", "nothing on stdout when the run fails"
    out = tmp_path / case.output
    folder = out.parent if out.parent.exists() else tmp_path
    if case.output != "none":
        assert leftovers(folder, out.name) == []


# a few cases through a real process: same exit code, one line, no traceback, no output
@pytest.mark.parametrize("name", ["text_as_h5", "card_sha_mismatch", "missing_channel", "model_unknown_name"])
def test_malformed_input_subprocess(name: str, tmp_path: Path, models: dict[str, Path]) -> None:
    case = CORPUS[name]
    args = case.build(tmp_path, models) + ["-o", str(tmp_path / "out.csv")]
    if case.model:
        args += ["--model", str(models[case.model])]
    env = {**os.environ, "STAMPCLF_MODELS": str(models["tiny"].parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "stampclf", "classify", *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == case.code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and case.phrase in lines[0], proc.stderr
    assert proc.stdout == ""
    assert leftovers(tmp_path, "out.csv") == []


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_shows_traceback(tmp_path: Path, tiny_model_path: Path, where: str) -> None:
    (tmp_path / "x.h5").write_text("not hdf5")
    args = ["classify", str(tmp_path / "x.h5"), "--model", str(tiny_model_path), "--device", "cpu"]
    result = run_cli(*(["--debug", *args] if where == "before the command" else [*args, "--debug"]))
    assert result.exit_code == 2
    assert "Traceback" in stderr_of(result)
    assert "Traceback" not in stderr_of(run_cli(*args))  # and the next run without it has none


def test_internal_error_is_exit_1_one_line(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("stampclf.classifier.Classifier._submit", boom)
    h5 = write_hits_h5(tmp_path / "good.h5", 4)
    result = run_cli(
        "classify", str(h5), "-o", str(tmp_path / "out.csv"), "--model", str(tiny_model_path), "--device", "cpu"
    )
    err = stderr_of(result)
    assert result.exit_code == 1
    assert error_lines(err) == [
        "stampclf: error: internal error: RuntimeError: simulated bug (rerun with --debug for a traceback)"
    ]
    assert "Traceback" not in err
    assert leftovers(tmp_path, "out.csv") == []


# --- bad stamps inside good files: rows, not errors --------------------------------------------
def _classify_csv(tmp_path: Path, model: Path, h5: Path, *extra: str) -> tuple[Any, list[dict[str, str]]]:
    out = tmp_path / "out.csv"
    result = run_cli("classify", str(h5), "-o", str(out), "--model", str(model), "--device", "cpu", *extra)
    assert result.exit_code == 0, stderr_of(result)
    return result, read_csv(out)


def test_nan_and_inf_pixels_flagged_or_failed(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(7, seed=3)
    x[1, 2, :3, :] = np.nan  # 63 of 1764 pixels: replaced and flagged
    x[2, 0, 0, 0] = np.inf
    x[3, 1, 5, 5] = -np.inf
    x[4, :, :11, :] = np.nan  # 924 of 1764 > max_bad_fraction 0.5: failed
    x[5, 2] = np.nan  # a whole channel (a quarter of the pixels): nothing to score it on
    x[6, 1:3] = np.inf
    h5 = write_hits_h5(tmp_path / "nan.h5", stamps=x)
    result, rows = _classify_csv(tmp_path, tiny_model_path, h5)
    status = [r["status"] for r in rows]
    assert status[0] == "ok"
    assert status[1] == "flagged: 63 non-finite pixels replaced"
    assert status[2] == status[3] == "flagged: 1 non-finite pixels replaced"
    assert status[4] == "failed: 924 of 1764 pixels not finite"
    assert status[5] == "failed: no finite pixel in channel 'difference'"
    assert status[6] == "failed: no finite pixel in channel 'science', 'difference'"
    for r in rows[:4]:
        p = np.array([float(r["p_bogus"]), float(r["p_real"])])
        assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-5 and r["label"] in ("bogus", "real")
    for r in rows[4:]:
        assert r["label"] == "" and r["p_bogus"] == "" and r["p_real"] == ""
    assert "flagged 3, failed 3" in stderr_of(result)


def test_a_missing_snr_channel_is_derived_from_the_difference(tmp_path: Path, tiny_model_path: Path) -> None:
    from stampclf.io._cutouts import DERIVED_SNR, derive_snr

    x = make_stamps(9, seed=8)
    x[4, 2] = np.nan  # no difference: nothing to derive from, the row fails
    path = write_hits_h5(tmp_path / "no_snr.h5", stamps=x, drop=("SNR_images",), flatten=True)
    _, rows = _classify_csv(tmp_path, tiny_model_path, path)
    assert [r["status"] for r in rows] == [f"flagged: {DERIVED_SNR}"] * 4 + [
        "failed: no finite pixel in channel 'difference', 'snr_difference'"] + [f"flagged: {DERIVED_SNR}"] * 4
    full = x.copy()
    full[:, 3] = [derive_snr(d) for d in x[:, 2]]
    want = Classifier(tiny_model_path, device="cpu").classify(full).proba[:, 1]
    got = np.array([float(r["p_real"]) if r["p_real"] else np.nan for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_constant_channel_is_scored_and_flagged(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(4, seed=4)
    x[1, 0] = 0.0  # no template: stored as zeros
    x[2] = 7.0  # every channel one value
    x[3, 1, :2] = np.nan  # a few NaN pixels and a constant rest
    x[3, 1, 2:] = 5.0
    _, rows = _classify_csv(tmp_path, tiny_model_path, write_hits_h5(tmp_path / "c.h5", stamps=x))
    assert [r["status"] for r in rows] == [
        "ok",
        "flagged: constant channel 'template'",
        "flagged: constant channel 'template', 'science', 'difference', 'snr_difference'",
        "flagged: 42 non-finite pixels replaced; constant channel 'science'",
    ]
    assert all(r["label"] in ("bogus", "real") for r in rows)


def test_failed_rows_are_nan_in_hdf5_output(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(3)
    x[1] = np.nan
    h5 = write_hits_h5(tmp_path / "nan.h5", stamps=x)
    out = tmp_path / "out.h5"
    result = run_cli("classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 0
    with h5py.File(out) as f:
        p = np.stack([f["p_bogus"][:], f["p_real"][:]], axis=1)
        status = [s.decode() for s in f["status"][:]]
        labels = [s.decode() for s in f["label"][:]]
    assert np.isnan(p[1]).all() and labels[1] == "" and status[1].startswith("failed: ")
    assert np.isfinite(p[[0, 2]]).all() and np.allclose(p[[0, 2]].sum(axis=1), 1, atol=1e-5)


def test_nan_flag_false_replaces_silently(tmp_path: Path) -> None:
    card = card_dict()
    card["preprocessing"]["nan_policy"] = {"fill": 0.0, "max_bad_fraction": 0.5, "flag": False}
    clf = Classifier(write_model(tmp_path / "m.onnx", card), device="cpu")
    x = make_stamps(2)
    x[0, 0, 0, 0] = np.nan
    assert list(clf.classify(x).status) == ["ok", "ok"]


@pytest.mark.parametrize(
    ("size", "note"),
    [((25, 25), "resized 25x25->21x21"), ((21, 27), "resized 21x27->21x21"), ((17, 17), "resized 17x17->21x21")],
)
def test_wrong_size_is_cropped_or_padded_and_flagged(
    tmp_path: Path, tiny_model_path: Path, size: tuple[int, int], note: str
) -> None:
    x = make_stamps(3, size=size)
    h5 = write_hits_h5(tmp_path / "sized.h5", stamps=x)
    _, rows = _classify_csv(tmp_path, tiny_model_path, h5)
    assert [r["status"].split(";")[0] for r in rows] == [f"flagged: {note}"] * 3
    assert all(r["label"] in ("bogus", "real") for r in rows)


def test_centre_crop_equals_cropping_by_hand(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    big = make_stamps(4, size=(25, 29))
    p_big = clf.predict_proba(big)
    p_hand = clf.predict_proba(big[:, :, 2:23, 4:25])
    np.testing.assert_array_equal(p_big, p_hand)


def test_too_small_stamps_fail_when_padding_exceeds_nan_budget(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    pred = clf.classify(make_stamps(2, size=(13, 13)))  # 272 of 441 pixels padded: over 0.5
    assert list(pred.status) == ["failed: resized 13x13->21x21 (padding is not finite): 1088 of 1764 pixels not finite"] * 2
    assert np.isnan(pred.proba).all() and list(pred.labels) == ["", ""]


def test_a_cropped_stamp_that_fails_is_not_said_to_be_padded(tiny_model_path: Path) -> None:
    x = make_stamps(1, size=(25, 25))
    x[0, :, :, :15] = np.nan
    [status] = Classifier(tiny_model_path, device="cpu").classify(x).status
    assert status.startswith("failed: ") and "padding" not in status, status


def test_empty_file_gives_header_only(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "empty.h5", stamps=np.zeros((0, 4, 21, 21), "f4"))
    out = tmp_path / "out.csv"
    result = run_cli("classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 0
    assert out.read_text().splitlines() == ["id,label,p_bogus,p_real,status,model,model_version,file"]
    result = run_cli(
        "classify", str(h5), "-o", str(tmp_path / "out.h5"), "--model", str(tiny_model_path), "--device", "cpu"
    )
    assert result.exit_code == 0
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["p_real"].shape == (0,)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "int64", "float16", "float64"])
def test_numeric_dtypes_are_converted(tmp_path: Path, tiny_model_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 120, (5, 4, 21, 21)).astype(dtype)
    h5 = write_hits_h5(tmp_path / f"{dtype}.h5", stamps=x)
    _, rows = _classify_csv(tmp_path, tiny_model_path, h5)
    ref = Classifier(tiny_model_path, device="cpu").predict_proba(x.astype(np.float32))
    got = np.array([[float(r["p_bogus"]), float(r["p_real"])] for r in rows])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert {r["status"] for r in rows} == {"ok"}


def test_duplicate_ids_are_kept_and_flagged(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(6)
    x[4, 0, 0, 0] = np.nan
    h5 = write_hits_h5(tmp_path / "dup.h5", stamps=x, ids=np.array([b"a", b"b", b"a", b"c", b"a", b"b"]))
    _, rows = _classify_csv(tmp_path, tiny_model_path, h5, "--batch-size", "4")
    assert [r["id"] for r in rows] == ["a", "b", "a", "c", "a", "b"]
    assert [r["status"] for r in rows] == [
        "ok",
        "ok",
        "flagged: duplicate id",
        "ok",
        "flagged: 1 non-finite pixels replaced; duplicate id",
        "flagged: duplicate id",
    ]
    assert all(r["label"] for r in rows), "duplicates are still classified"


def test_duplicate_ids_in_memory(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    x = make_stamps(3)
    x[2] = np.nan
    pred = clf.classify(x, ids=[7, 7, 7])
    assert list(pred.status) == ["ok", "flagged: duplicate id", "failed: 1764 of 1764 pixels not finite"]


def test_labels_stored_as_floats_are_accepted(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "flabels.h5", 8, labels=np.array([0.0, 1.0] * 4))
    out = tmp_path / "o.csv"
    result = run_cli(
        "classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu", "--evaluate"
    )
    assert result.exit_code == 0, stderr_of(result)
    assert "accuracy" in stderr_of(result)


@pytest.mark.parametrize(
    ("stamps", "phrase"),
    [
        (np.zeros((2, 4, 21, 21), bool), "dtype bool is not numeric"),
        (np.full((2, 4, 21, 21), "1.0"), "dtype <U3 is not numeric"),
        (np.zeros((2, 4, 21, 21), np.complex64), "dtype complex64 is not numeric"),
        (np.zeros((2, 4, 21, 21), object), "dtype object is not numeric"),
        ([[[[1.0]]], [[[1.0, 2.0]]]], "not an array of stamps"),
        (np.zeros((4, 21, 21), "f4"), "expected 4 axes (N, C, H, W)"),
        (np.zeros((2, 4, 21, 21, 1), "f4"), "expected 4 axes (N, C, H, W)"),
        (np.zeros((2, 3, 21, 21), "f4"), "3 channel(s) but the model needs 4"),
        (np.zeros((2, 4, 21, 0), "f4"), "stamps are empty"),
    ],
)
def test_library_errors_name_the_problem(tiny_model_path: Path, stamps: Any, phrase: str) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    with pytest.raises(InputError, match=None) as info:
        clf.classify(stamps)
    assert phrase in str(info.value)
    assert str(info.value).startswith("stamps: ")


def test_library_ids_must_match_stamps(tiny_model_path: Path) -> None:
    clf = Classifier(tiny_model_path, device="cpu")
    with pytest.raises(InputError, match="ids: shape"):
        clf.classify(make_stamps(3), ids=[1, 2])
    with pytest.raises(InputError, match="ids: shape"):
        clf.classify(make_stamps(2), ids=[[1, 2], [3, 4]])


def test_library_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        Classifier("nope")


# --- faults --------------------------------------------------------------------------------------
def test_keep_going_reports_bad_file_and_classifies_the_rest(tmp_path: Path, tiny_model_path: Path) -> None:
    a = write_hits_h5(tmp_path / "a.h5", 5, seed=1)
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    gone = tmp_path / "vanished.h5"  # a file that left the night's list: reported like any bad file
    odd = tmp_path / "notes.txt"
    odd.write_text("x")
    b = write_hits_h5(tmp_path / "b.h5", 3, seed=2)
    out = tmp_path / "out.csv"
    args = ["classify", str(a), str(gone), str(bad), str(odd), str(b), "-o", str(out),
            "--model", str(tiny_model_path), "--device", "cpu"]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 2 and not out.exists()
    result = run_cli(*args, "--keep-going")
    err = stderr_of(result)
    assert result.exit_code == 2
    assert error_lines(err)[:2] == [
        f"stampclf: error: {gone}: file does not exist",
        f"stampclf: error: {bad}: not an HDF5 file",
    ]
    assert error_lines(err)[2].startswith(f"stampclf: error: {odd}: unknown input type") and len(error_lines(err)) == 3
    rows = read_csv(out)
    assert [r["file"] for r in rows] == [str(a)] * 5 + [str(b)] * 3
    assert "8 rows from 2 of 5 input(s)" in err


def test_keep_going_drops_rows_of_a_file_that_fails_half_way(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_hits_h5(tmp_path / "a.h5", 4, seed=1)
    half = write_hits_h5(tmp_path / "half.h5", 10, seed=2)
    b = write_hits_h5(tmp_path / "b.h5", 3, seed=3)
    # every dataset, ids too: nothing of rows 4-7 can be reported
    _fail_row_reads(monkeypatch, lambda ds, rows: ds.file.filename == str(half) and (rows.start or 0) < 8 and (rows.stop or 10) > 4,
                    "Can't read data (truncated file)")  # fmt: skip
    for out in (tmp_path / "out.csv", tmp_path / "out.h5"):
        result = run_cli(
            "classify",
            str(a),
            str(half),
            str(b),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--keep-going",
        )
        assert result.exit_code == 2
        assert error_lines(stderr_of(result)) == [
            f"stampclf: error: {half}: cannot read rows 4-7 of dataset 'temp_images' "
            "(truncated or corrupt HDF5: Can't read data (truncated file))"
        ]
        if out.suffix == ".csv":
            files = [r["file"] for r in read_csv(out)]
        else:
            with h5py.File(out) as f:
                files = [s.decode() for s in f["file"][:]]
                assert all(f[k].shape == (7,) for k in f)
        assert files == [str(a)] * 4 + [str(b)] * 3


def test_keep_going_keeps_the_readable_rows_of_a_damaged_file(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(40, seed=5)
    damaged = tmp_path / "damaged.h5"
    with h5py.File(damaged, "w") as f:
        f.create_dataset("stamps", data=x, chunks=(10, 4, 21, 21), compression="gzip")
        f["id"] = np.arange(100, 140)
    damage_chunk(damaged, "stamps", 2)  # rows 20-29 unreadable; ids and the other rows fine
    out = tmp_path / "out.csv"
    args = ["classify", str(damaged), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu"]
    result = run_cli(*args, "--batch-size", "16")
    assert result.exit_code == 2 and not out.exists()  # without --keep-going: the file fails
    result = run_cli(*args, "--batch-size", "16", "--keep-going")
    assert result.exit_code == 2
    [line] = error_lines(stderr_of(result))
    assert line.startswith(f"stampclf: error: {damaged}: cannot read rows 20-29 of dataset 'stamps'")
    rows = read_csv(out)
    assert [int(r["id"]) for r in rows] == list(range(100, 140))  # nothing dropped
    failed = [i for i, r in enumerate(rows) if r["status"].startswith("failed: cannot read rows 20-29")]
    assert failed == list(range(20, 30)) and all(rows[i]["label"] == "" for i in failed)
    ref = Classifier(tiny_model_path, device="cpu").classify(x[:20])
    np.testing.assert_allclose([float(r["p_real"]) for r in rows[:20]], ref.proba[:, 1], atol=1e-6)
    assert "failed 10" in stderr_of(result)


@pytest.mark.parametrize("layout", ["chunked", "contiguous"])
def test_keep_going_salvages_a_read_error_of_the_direct_reads(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """Uncompressed stamps are read with os.preadv, not h5py: an I/O error there fails only its rows too
    (a chunk; contiguous stamps, the rows themselves, found by halves)."""
    import errno

    from stampclf.io import _hdf5

    x = make_stamps(40, seed=7)
    path = write_hits_h5(tmp_path / f"{layout}.h5", stamps=x, ids=np.arange(100, 140),
                         chunks=(10, 21, 21) if layout == "chunked" else None)  # fmt: skip
    with h5py.File(path) as f:
        ds = f["diff_images"]
        start = ds.id.get_chunk_info(2).byte_offset if layout == "chunked" else ds.id.get_offset() + 20 * 21 * 21 * 4
    bad = (start, start + 10 * 21 * 21 * 4)  # the bytes of rows 20-29 of one channel
    real, reads = os.preadv, []

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        reads.append(offset)
        if offset < bad[1] and bad[0] < offset + sum(len(b) for b in bufs):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(_hdf5.os, "preadv", preadv)
    monkeypatch.setattr(_hdf5, "_SALVAGE_ROWS", 1)  # halves down to single rows: exactly rows 20-29 fail
    out = tmp_path / "out.csv"
    result = run_cli("classify", path, "-o", out, "--model", tiny_model_path, "--device", "cpu", "--batch-size", "16",
                     "--keep-going")  # fmt: skip
    assert reads, "the direct reads were not used"
    assert result.exit_code == 2
    [line] = error_lines(stderr_of(result))
    assert line.startswith(f"stampclf: error: {path}: cannot read rows 20-29 of dataset 'diff_images'")
    assert "Input/output error" in line
    rows = read_csv(out)
    assert [int(r["id"]) for r in rows] == list(range(100, 140))  # nothing dropped
    failed = {i for i, r in enumerate(rows) if r["status"].startswith("failed: cannot read rows")}
    assert set(range(20, 30)) == failed and all(rows[i]["label"] == "" for i in failed)
    ok = [i for i in range(40) if i not in failed]
    ref = Classifier(tiny_model_path, device="cpu").classify(x[ok])
    np.testing.assert_allclose([float(rows[i]["p_real"]) for i in ok], ref.proba[:, 1], atol=1e-6)


def test_salvage_of_a_contiguous_block_that_fails_whole_reads_it_a_few_times(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Halving a block whose every piece fails reads ~log2(rows / 16) times its bytes, not rows / 16 times."""
    import errno

    from stampclf.io import _hdf5

    n, row = 1024, 21 * 21 * 4
    path = write_hits_h5(tmp_path / "a.h5", stamps=make_stamps(n, seed=8), ids=np.arange(n))
    with h5py.File(path) as f:
        bad = f["diff_images"].id.get_offset()
    real, asked = os.preadv, []

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        size = sum(len(b) for b in bufs)
        asked.append(size)
        if offset < bad + n * row and bad < offset + size:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(_hdf5.os, "preadv", preadv)
    reader = _hdf5.HDF5Reader(str(path), Classifier(tiny_model_path, device="cpu").card.input)
    reader.salvage = True
    batch = reader.read_rows(0, n)
    assert len(batch.ids) == n and all(str(s).startswith("failed: cannot read rows 0-1023") for s in batch.status)
    assert reader.damaged == [batch.status[0].removeprefix("failed: ").join([f"{path}: ", ""])]
    # each attempt reads 3 channels (the 3rd fails): ~2 n / 16 attempts, each level of halves the block once
    levels = (n // _hdf5._SALVAGE_ROWS).bit_length() + 1
    assert len(asked) <= 3 * 2 * n // _hdf5._SALVAGE_ROWS and sum(asked) <= 3 * levels * n * row


@pytest.mark.parametrize("chunk", [6, 0])  # rows printed before the damaged chunk; none
def test_an_error_after_rows_went_to_stdout_says_the_csv_is_incomplete(
    tmp_path: Path, tiny_model_path: Path, chunk: int
) -> None:
    damaged = tmp_path / "damaged.h5"
    with h5py.File(damaged, "w") as f:
        f.create_dataset("stamps", data=make_stamps(80, seed=6), chunks=(10, 4, 21, 21), compression="gzip")
    damage_chunk(damaged, "stamps", chunk)
    result = run_cli("classify", damaged, "--model", tiny_model_path, "--device", "cpu", "--batch-size", "16")
    assert result.exit_code == 2
    [line] = error_lines(stderr_of(result))
    assert line.startswith(f"stampclf: error: {damaged}: cannot read rows {10 * chunk}-")
    printed = parse_csv_text(result.stdout)
    # what went to stdout cannot be taken back: the line says so, as on Ctrl-C
    assert line.endswith("; the CSV on stdout is incomplete") == bool(printed)
    assert bool(printed) == (chunk == 6)


def test_an_internal_error_after_rows_went_to_stdout_says_the_csv_is_incomplete(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stampclf.io._writers import ResultWriter

    real, calls = ResultWriter._write, []

    def write(self: ResultWriter, *args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")  # a bug, after the first batch went out
        real(self, *args, **kw)

    monkeypatch.setattr(ResultWriter, "_write", write)
    h5 = write_hits_h5(tmp_path / "in.h5", n=10, seed=3)
    result = run_cli("classify", h5, "--model", tiny_model_path, "--device", "cpu", "--batch-size", "2")
    assert result.exit_code == 1
    [line] = error_lines(stderr_of(result))
    assert line.startswith("stampclf: error: internal error: ValueError: boom")
    assert line.endswith("; the CSV on stdout is incomplete") and len(parse_csv_text(result.stdout)) == 2


def test_a_reader_that_goes_away_ends_the_run_with_sigpipes_status(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "many.h5", n=6000, seed=2)  # ~400 kB of CSV: more than a pipe holds
    cmd = [sys.executable, "-m", "stampclf", "classify", str(h5), "-m", str(tiny_model_path), "--device", "cpu", "-q"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"id,")  # like `| head -1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141 and err == b""  # 128 + SIGPIPE, silent, as `set -o pipefail` expects


def test_a_damaged_labels_chunk_fails_only_evaluation(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(40, seed=7)
    damaged = tmp_path / "labels.h5"
    with h5py.File(damaged, "w") as f:
        f.create_dataset("stamps", data=x, chunks=(10, 4, 21, 21), compression="gzip")
        f.create_dataset("labels", data=np.arange(40) % 2, chunks=(10,), compression="gzip")
    damage_chunk(damaged, "labels", 2, nbytes=30)
    out = tmp_path / "out.csv"
    args = ["classify", str(damaged), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
            "--batch-size", "16"]
    result = run_cli(*args)  # the labels are not needed: every row is scored
    assert result.exit_code == 0 and [r["status"] for r in read_csv(out)] == ["ok"] * 40
    ref = Classifier(tiny_model_path, device="cpu").classify(x)
    np.testing.assert_allclose([float(r["p_real"]) for r in read_csv(out)], ref.proba[:, 1], atol=1e-6)
    result = run_cli(*args, "--evaluate")
    [line] = error_lines(stderr_of(result))
    assert result.exit_code == 2 and "cannot read dataset 'labels'" in line
    result = run_cli(*args, "--evaluate", "--keep-going")  # classified, left out of the metrics
    assert result.exit_code == 2 and "not in the metrics" in stderr_of(result) and len(read_csv(out)) == 40


def test_salvage_fails_only_the_damaged_chunk_of_one_channel(tmp_path: Path, tiny_model_path: Path) -> None:
    x = make_stamps(40, seed=6)
    damaged = tmp_path / "channels.h5"
    names = ["temp_images", "sci_images", "diff_images", "SNR_images"]
    with h5py.File(damaged, "w") as f:
        for c, name in enumerate(names):  # the first dataset in chunks of 20 rows, the difference in 5
            f.create_dataset(name, data=x[:, c], chunks=(5 if name == "diff_images" else 20, 21, 21),
                             compression="gzip")  # fmt: skip
    damage_chunk(damaged, "diff_images", 1)  # rows 5-9
    out = tmp_path / "out.csv"
    result = run_cli("classify", str(damaged), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
                     "--batch-size", "16", "--keep-going")  # fmt: skip
    [line] = error_lines(stderr_of(result))
    assert "cannot read rows 5-9 of dataset 'diff_images'" in line
    failed = [i for i, r in enumerate(read_csv(out)) if r["status"].startswith("failed")]
    assert failed == list(range(5, 10))


def test_keep_going_with_every_input_bad_writes_nothing(tmp_path: Path, tiny_model_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_text("x")
    out = tmp_path / "out.csv"
    result = run_cli(
        "classify",
        str(bad),
        str(bad),
        "-o",
        str(out),
        "--model",
        str(tiny_model_path),
        "--device",
        "cpu",
        "--keep-going",
    )
    assert result.exit_code == 2
    assert len(error_lines(stderr_of(result))) == 2
    assert "no output written" in stderr_of(result)
    assert leftovers(tmp_path, "out.csv") == []


@pytest.mark.parametrize("keep_going", [False, True])
def test_unreadable_image_is_a_failed_row_and_an_error(
    tmp_path: Path, tiny_image_model_path: Path, keep_going: bool
) -> None:
    from PIL import Image

    Image.new("RGB", (10, 10), (0, 120, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"garbage")
    Image.new("RGB", (16, 9), (0, 0, 250)).save(tmp_path / "c.png")
    out = tmp_path / "out.csv"
    result = run_cli(
        "classify",
        str(tmp_path),
        "-o",
        str(out),
        "--model",
        str(tiny_image_model_path),
        "--device",
        "cpu",
        *(["--keep-going"] if keep_going else []),
    )
    assert result.exit_code == 2
    lines = error_lines(stderr_of(result))
    assert len(lines) == 1 and "b.png: cannot read image" in lines[0]
    rows = read_csv(out)
    assert [Path(r["id"]).name for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[1]["status"].startswith("failed: ") and rows[1]["label"] == "" and rows[1]["p_cat"] == ""
    assert rows[0]["label"] and rows[2]["label"]


def test_ctrl_c_exits_130_without_output(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stampclf.io import _writers

    calls = {"n": 0}
    real = _writers.ResultWriter.write

    def write(self: Any, *a: Any) -> None:
        real(self, *a)
        calls["n"] += 1
        # atomic: rows go to the temporary file; the final name still holds the old content
        assert self._tmp and os.path.exists(self._tmp) and Path(self.path).read_text() == "previous results\n"
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(_writers.ResultWriter, "write", write)
    h5 = write_hits_h5(tmp_path / "a.h5", 20)
    out = tmp_path / "out.csv"
    out.write_text("previous results\n")
    result = run_cli("classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu", "-b", "4")
    assert result.exit_code == 130, stderr_of(result)
    assert stderr_of(result).strip() == "stampclf: interrupted; no output written"
    assert out.read_text() == "previous results\n", "an interrupted run leaves an existing output alone"
    assert leftovers(tmp_path, "out.csv") == ["out.csv"]


def test_ctrl_c_with_csv_on_stdout_says_it_is_incomplete(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stampclf.io import _writers

    real = _writers.ResultWriter.write
    calls = {"n": 0}

    def write(self: Any, *a: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self, *a)

    monkeypatch.setattr(_writers.ResultWriter, "write", write)
    h5 = write_hits_h5(tmp_path / "a.h5", 20)
    result = run_cli("classify", str(h5), "--model", str(tiny_model_path), "--device", "cpu", "-b", "4")
    assert result.exit_code == 130
    assert stderr_of(result).strip() == "stampclf: interrupted; the CSV on stdout is incomplete"


def test_hdf5_flush_failure_is_one_line_and_leaves_no_file(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Any) -> None:  # what HDF5 says when the disk fills as it writes its metadata
        raise OSError("Write through metadata accumulator failed (file write failed: time = Mon Nov 23\n, "
                      "errno = 28, error message = 'No space left on device', buf = 0x1)")

    monkeypatch.setattr(h5py.File, "flush", full)
    h5 = write_hits_h5(tmp_path / "a.h5", 5)
    out = tmp_path / "out.h5"
    result = run_cli("classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 2
    assert stderr_of(result).strip() == f"stampclf: error: {out}: cannot write the output (No space left on device)"
    assert leftovers(tmp_path, out.name) == []


def test_an_input_of_which_no_row_can_be_scored_is_an_error(tmp_path: Path, tiny_model_path: Path) -> None:
    bad = write_hits_h5(tmp_path / "allnan.h5", stamps=np.full((3, 4, 21, 21), np.nan, "f4"))
    good = write_hits_h5(tmp_path / "good.h5", 2)
    out = tmp_path / "out.csv"
    args = ["--model", str(tiny_model_path), "--device", "cpu", "-o", str(out)]
    result = run_cli("classify", str(bad), *args)
    assert result.exit_code == 2 and not out.exists()  # nothing scored: no output that looks like a result
    assert error_lines(stderr_of(result)) == [
        f"stampclf: error: {bad}: none of its 3 row(s) could be scored (e.g. failed: 1764 of 1764 pixels not finite)"
    ]
    result = run_cli("classify", str(bad), str(good), *args)
    assert result.exit_code == 2 and len(read_csv(out)) == 5  # the failed rows stay, reported


def test_ctrl_c_before_any_row_on_stdout_says_no_output(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stampclf.classifier

    def slow_load(*_a: Any, **_k: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the model loads: nothing printed yet

    monkeypatch.setattr(stampclf.classifier.Classifier, "__init__", slow_load)
    h5 = write_hits_h5(tmp_path / "a.h5", 4)
    result = run_cli("classify", str(h5), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 130
    assert stderr_of(result).strip() == "stampclf: interrupted; no output written"


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
@pytest.mark.parametrize("where", ["_write", "_mark_here"])  # CSV: the buffer is flushed when an input starts
@pytest.mark.parametrize("keep_going", [[], ["--keep-going"]], ids=["", "keep_going"])
def test_disk_full_is_one_line_naming_the_output(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, where: str,
    keep_going: list[str],
) -> None:
    from stampclf.io import _writers

    calls = {"n": 0}
    real = getattr(_writers.ResultWriter, where)

    def full(self: Any, *a: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second input: --keep-going must not take it for a bad input
            raise OSError(28, "No space left on device")
        real(self, *a)

    monkeypatch.setattr(_writers.ResultWriter, where, full)
    h5 = write_hits_h5(tmp_path / "a.h5", 5)
    b = write_hits_h5(tmp_path / "b.h5", 5)
    out = tmp_path / f"out{suffix}"
    result = run_cli("classify", str(h5), str(b), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
                     "-b", "5", *keep_going)  # fmt: skip
    assert result.exit_code == 2
    assert stderr_of(result).strip() == f"stampclf: error: {out}: cannot write the output (No space left on device)"
    assert leftovers(tmp_path, out.name) == []  # no output, no temporary file


def test_failed_run_leaves_existing_output_untouched(tmp_path: Path, tiny_model_path: Path) -> None:
    good = write_hits_h5(tmp_path / "good.h5", 3)
    bad = write_hits_h5(tmp_path / "bad.h5", 3, drop=("sci_images",))
    out = tmp_path / "out.h5"
    out.write_bytes(b"yesterday")
    result = run_cli(
        "classify", str(good), str(bad), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu"
    )
    assert result.exit_code == 2
    assert out.read_bytes() == b"yesterday"
    assert leftovers(tmp_path, "out.h5") == ["out.h5"]


# --- trust ----------------------------------------------------------------------------------------
FORBIDDEN = (
    "pickle",
    "eval(",
    "exec(",
    "importlib",
    "__import__",
    "socket",
    "urllib",
    "requests",
    "marshal",
    "shelve",
    "subprocess",
)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstrings (tokenised, so '#' in strings is not a comment)."""
    import io
    import tokenize

    keep: dict[int, list[str]] = {}
    prev = tokenize.INDENT
    with open(path, "rb") as fh:
        for tok in tokenize.tokenize(fh.readline):
            if tok.type == tokenize.COMMENT:
                continue
            if tok.type == tokenize.STRING and prev in (
                tokenize.INDENT,
                tokenize.NEWLINE,
                tokenize.DEDENT,
                tokenize.ENCODING,
            ):
                prev = tok.type
                continue  # a docstring
            if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                keep.setdefault(tok.start[0], []).append(tok.string)
            prev = tok.type
    _ = io
    return [(n, " ".join(t)) for n, t in sorted(keep.items())]


def test_runtime_has_no_pickle_eval_dynamic_import_or_network() -> None:
    found = []
    for path in sorted((ROOT / "stampclf").rglob("*.py")):
        for n, line in _code_lines(path):
            squeezed = line.replace(" ", "")
            found += [
                f"{path.relative_to(ROOT)}:{n}: {word}" for word in FORBIDDEN if word.replace(" ", "") in squeezed
            ]
    assert found == []


def test_forbidden_word_scan_catches_code_but_not_comments(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text('"""Docs may say pickle."""\nimport json  # not pickle\nx = eval("1")\n')
    lines = [line for _, line in _code_lines(p)]
    assert not any("pickle" in ln for ln in lines)
    assert any("eval" in ln for ln in lines)


def test_ruff_security_rules_pass() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff not installed")
    conf = (ROOT / "pyproject.toml").read_text()
    assert '"S"' in conf, "the security rules (S) must stay selected"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "stampclf"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_never_imports_torch_nor_opens_sockets(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "a.h5", 5)
    code = f"""
import socket, sys
class NoNetwork(socket.socket):
    def __init__(self, *a, **k):
        raise AssertionError("network access")
socket.socket = NoNetwork
socket.create_connection = NoNetwork
from typer.testing import CliRunner
from stampclf.cli import app
r = CliRunner().invoke(app, ["classify", {str(h5)!r}, "-o", {str(tmp_path / "o.csv")!r}, "--model", {str(tiny_model_path)!r}])
assert r.exit_code == 0, (r.exit_code, r.output, r.exception)
r = CliRunner().invoke(app, ["info", {str(tiny_model_path)!r}])
assert r.exit_code == 0, r.output
# (pickle itself is imported by numpy; the source scan covers stampclf's own code)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript", "train", "requests", "urllib3"))
assert not bad, bad
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_models_load_only_from_package_or_explicit_path(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.onnx").write_bytes(tiny_model_path.read_bytes())
    monkeypatch.delenv("STAMPCLF_MODELS", raising=False)
    # a bare name never picks up a file from the working folder
    with pytest.raises(ModelError, match="unknown model 'tiny'"):
        Classifier("tiny")
    assert Classifier("./tiny.onnx", device="cpu").name == "tiny"


def test_card_json_roundtrip_with_fixture(tiny_model_path: Path) -> None:
    from stampclf import read_card

    card, _ = read_card(tiny_model_path)
    assert json.loads(card.to_json())["input"]["hdf5_datasets"][0] == "temp_images"


def test_output_has_normal_permissions_and_no_temp_left(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "a.h5", 3)
    for out in (tmp_path / "out.csv", tmp_path / "out.h5"):
        result = run_cli("classify", str(h5), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu")
        assert result.exit_code == 0
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask, "not mkstemp's 0600"
        assert leftovers(tmp_path, out.name) == [out.name]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read and write anything")
def test_real_permissions(tmp_path: Path, tiny_model_path: Path) -> None:
    h5 = write_hits_h5(tmp_path / "locked.h5", 3)
    h5.chmod(0)
    result = run_cli("classify", str(h5), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 2 and "no permission to read" in stderr_of(result)
    h5.chmod(0o644)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    result = run_cli("classify", str(h5), "-o", str(ro / "o.csv"), "--model", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 2 and "no permission to write" in stderr_of(result)
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (_sha_mismatch, "does not match the card"),
        (_no_card, "no stampclf model card"),
        (_card_json("{"), "not valid JSON"),
    ],
)
def test_info_on_bad_models(tmp_path: Path, make: Callable[[Path], Path], phrase: str) -> None:
    result = run_cli("info", str(make(tmp_path)))
    err = stderr_of(result)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(error_lines(err)) == 1 and phrase in err and "model.onnx" in err and "Traceback" not in err


@pytest.mark.parametrize("option", [["--threshold", "2"], ["--batch-size", "0"], ["--threads", "0"], ["--bogus"]])
def test_usage_errors_exit_2(tmp_path: Path, tiny_model_path: Path, option: list[str]) -> None:
    h5 = write_hits_h5(tmp_path / "a.h5", 3)
    result = run_cli("classify", str(h5), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_model_path), *option)
    assert result.exit_code == 2
    assert "Traceback" not in stderr_of(result)
    assert leftovers(tmp_path, "o.csv") == []


def test_hits_card_mirror() -> None:
    """The conftest copies of the HiTS input and preprocessing agree with train/models/hits.py."""
    pytest.importorskip("torch")
    from conftest import HITS_INPUT, HITS_PREPROCESSING

    from train.models import hits

    for mine, theirs in ((HITS_INPUT, hits.HITS_INPUT), (HITS_PREPROCESSING, hits.HITS_PREPROCESSING)):
        assert {k: theirs[k] for k in mine} == mine


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_reading(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge --batch-size is one line naming the batch size and the memory, not the kernel's OOM kill."""
    from stampclf import _session

    path = write_hits_h5(tmp_path / "a.h5", 300)
    out = tmp_path / "out.csv"
    row = 3 * 4 * 4 * 21 * 21  # 3 copies of a float32 row of 4 x 21 x 21
    monkeypatch.setattr(_session, "available_memory", lambda: 100 * row)
    monkeypatch.setattr("stampclf.classifier.available_memory", _session.available_memory)
    args = ["classify", path, "-o", out, "--model", tiny_model_path, "--device", "cpu"]
    result = run_cli(*args, "--batch-size", "1000")
    assert result.exit_code == 2 and not out.exists()
    [line] = error_lines(stderr_of(result))
    assert line.startswith(f"stampclf: error: batch size 1,000: 300 rows of {path} (4 x 21 x 21 float32 a row)")
    assert "more than the 0.0 GiB of memory available" in line and "Traceback" not in stderr_of(result)
    assert run_cli(*args, "--batch-size", "100").exit_code == 0 and len(read_csv(out)) == 300  # 100 rows fit


def test_a_large_batch_on_cpu_is_run_in_calls_of_bounded_size(tiny_model_path: Path) -> None:
    """ONNX Runtime's memory grows with the rows of a call: a CPU batch larger than a call's
    bytes is several calls of `cpu_rows`, with the same results."""
    from stampclf import _session

    x = make_stamps(700, seed=3)
    ref = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=64).classify(x)
    clf = Classifier(tiny_model_path, device="cpu", threads=1, batch_size=700)
    runner = clf._runner_now()
    calls: list[int] = []
    real = runner.session.run
    runner.session = type("Spy", (), {"run": lambda self, out, feed: calls.append(len(next(iter(feed.values()))))
                                      or real(out, feed)})()  # fmt: skip
    runner.cpu_rows = 256  # as `_CPU_CALL_BYTES` makes it for larger rows
    got = clf.classify(x)
    assert calls == [256, 256, 256]  # the tail padded to a call's rows: one shape
    np.testing.assert_allclose(got.proba, ref.proba, atol=1e-6)
    assert _session.BatchRunner(runner.info, 10**6, (4, 21, 21), 2).cpu_rows == _session._CPU_CALL_BYTES // (4 * 4 * 21 * 21)


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off")
def test_a_file_another_process_is_writing_is_locked_not_corrupt(tmp_path: Path, tiny_model_path: Path) -> None:
    path = write_hits_h5(tmp_path / "a.h5", 4)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import h5py, sys, time; f = h5py.File({str(path)!r}, 'a'); print('open', flush=True); "
                               "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        out = tmp_path / "out.csv"
        result = run_cli("classify", path, "-o", out, "--model", tiny_model_path, "--device", "cpu")
        assert result.exit_code == 2 and not out.exists()
        [line] = error_lines(stderr_of(result))
        assert line.startswith(f"stampclf: error: {path}: locked by another process that has it open for writing")
    finally:
        holder.communicate("")


@pytest.mark.parametrize("chunks", [None, (10, 21, 21)])
def test_keep_going_survives_a_read_error_that_goes_away(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: Any
) -> None:
    """An I/O error that does not come back when the rows are read again: no internal error, nothing dropped."""
    import errno

    from stampclf.io import _hdf5

    path = write_hits_h5(tmp_path / "a.h5", stamps=make_stamps(64, seed=9), ids=np.arange(64), chunks=chunks)
    real, calls = os.preadv, []

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) <= 4:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(_hdf5.os, "preadv", preadv)
    out = tmp_path / "out.csv"
    result = run_cli("classify", path, "-o", out, "--model", tiny_model_path, "--device", "cpu", "--batch-size", "32",
                     "--keep-going")  # fmt: skip
    assert result.exit_code in (0, 2) and "internal error" not in stderr_of(result), stderr_of(result)
    assert [int(r["id"]) for r in read_csv(out)] == list(range(64))
