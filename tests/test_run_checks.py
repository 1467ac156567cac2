"""What a run checks before it writes anything, what it ignores, and what it records."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_hits_h5
from PIL import Image
from typer.testing import CliRunner

from stampclf import Classifier, InputError, __version__
from stampclf.cli import app
from stampclf.preprocess import load_image


def _opened(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.copy()  # decoded, file closed


def _cli(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    ("labels", "phrase"),
    [
        (np.array([b"star"] * 6), "label 'star' is not one of"),
        (np.eye(2, dtype="i1")[[0, 1, 0, 1, 0, 1]], "labels dataset 'labels' has shape (6, 2); expected (6,)"),
    ],
    ids=["other_names", "one_hot"],
)
def test_foreign_labels_are_ignored_without_evaluate(
    tmp_path: Path, tiny_model_path: Path, labels: np.ndarray, phrase: str
) -> None:
    path = write_hits_h5(tmp_path / "other_scheme.h5", 6, labels=labels)
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "-o", tmp_path / "o.csv")
    assert r.exit_code == 0, r.output
    assert "6 rows" in r.stderr
    preds = list(Classifier(tiny_model_path, device="cpu").classify_file(path))
    assert sum(len(p) for p in preds) == 6 and all(p.true_labels is None for p in preds)
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "--evaluate")
    assert r.exit_code == 2 and phrase in r.stderr, r.stderr


def test_labels_are_judged_per_file_not_per_batch(tmp_path: Path, tiny_model_path: Path) -> None:
    labels = np.array([b"real"] * 4 + [b"star"] * 4)  # the first batch alone would look fine
    path = write_hits_h5(tmp_path / "mixed.h5", 8, labels=labels)
    preds = list(Classifier(tiny_model_path, device="cpu").classify_file(path, batch_size=4))
    assert len(preds) == 2 and all(p.true_labels is None for p in preds)


@pytest.mark.parametrize(
    ("second", "phrase"),
    [
        ("nolabels", "--evaluate: no labels in"),
        ("badlabels", "label 'star' is not one of"),
        ("corrupt", "not an HDF5 file"),
    ],
)
def test_every_input_is_checked_before_the_first_row(
    tmp_path: Path, tiny_model_path: Path, second: str, phrase: str
) -> None:
    good = write_hits_h5(tmp_path / "good.h5", 8)
    if second == "nolabels":
        bad = write_hits_h5(tmp_path / "bad.h5", 4, labels=None)
    elif second == "badlabels":
        bad = write_hits_h5(tmp_path / "bad.h5", 4, labels=np.array([b"star"] * 4))
    else:
        bad = tmp_path / "bad.h5"
        bad.write_bytes(b"not hdf5 at all")
    r = _cli("classify", good, bad, "-m", tiny_model_path, "--device", "cpu", "--evaluate")
    assert r.exit_code == 2
    assert phrase in r.stderr and str(bad) in r.stderr
    assert r.stdout == ""  # not the 8 rows of good.h5, not even the header


def test_refused_run_prints_no_header_but_an_empty_result_does(tmp_path: Path, tiny_model_path: Path) -> None:
    r = _cli("classify", tmp_path / "missing.h5", "-m", tiny_model_path, "--device", "cpu")
    assert r.exit_code == 2 and r.stdout == ""
    empty = write_hits_h5(tmp_path / "empty.h5", 0)
    r = _cli("classify", empty, "-m", tiny_model_path, "--device", "cpu", "-q")
    assert r.exit_code == 0 and r.stdout.splitlines() == ["id,label,p_bogus,p_real,status,model,model_version,file"]


def test_keep_going_with_every_input_bad_prints_nothing_on_stdout(tmp_path: Path, tiny_model_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = _cli("classify", bad, "-m", tiny_model_path, "--device", "cpu", "--keep-going")
    assert r.exit_code == 2 and r.stdout == "" and "not an HDF5 file" in r.stderr


def test_output_errors_come_before_inputs_are_opened(tmp_path: Path, tiny_model_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = _cli("classify", bad, "-m", tiny_model_path, "--device", "cpu", "-o", tmp_path / "nowhere" / "o.csv")
    assert r.exit_code == 2 and "output folder" in r.stderr and "not an HDF5 file" not in r.stderr


def test_hdf5_output_records_the_run_settings(
    tmp_path: Path, tiny_model_path: Path, tiny_image_model_path: Path
) -> None:
    path = write_hits_h5(tmp_path / "s.h5", 5)
    out = tmp_path / "o.h5"
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "--threshold", "0.9", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert f.attrs["threshold"] == pytest.approx(0.9)
        assert (f.attrs["precision"], f.attrs["device"], f.attrs["stampclf_version"]) == ("fp32", "cpu", __version__)
        assert f["p_real"].compression == "gzip" and f["p_real"].chunks == (8192,)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "a.png")
    out = tmp_path / "img.h5"
    r = _cli("classify", tmp_path / "a.png", "-m", tiny_image_model_path, "--device", "cpu", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert "threshold" not in f.attrs  # multiclass labels are the most probable class


def test_threshold_is_refused_for_multiclass_models(tmp_path: Path, tiny_image_model_path: Path) -> None:
    with pytest.raises(InputError, match=r"threshold 0.7: model 'tiny_image' takes no threshold \(it has 3 classes"):
        Classifier(tiny_image_model_path, device="cpu", threshold=0.7)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    r = _cli("classify", tmp_path / "a.png", "-m", tiny_image_model_path, "--threshold", "0.7")
    assert r.exit_code == 2 and "a threshold applies to binary models with a positive_class" in r.stderr


def test_a_file_given_twice_is_refused_and_ambiguous_ids_too(tmp_path: Path, tiny_model_path: Path) -> None:
    path = write_hits_h5(tmp_path / "a.h5", 4)
    again = tmp_path / "." / "a.h5"  # e.g. overlapping globs
    r = _cli("classify", path, again, "-m", tiny_model_path, "--device", "cpu")
    assert r.exit_code == 2 and f"{again}: given twice (also as {path})" in r.stderr and not r.stdout
    with h5py.File(path, "a") as f:
        f["ID"] = np.arange(4) + 100  # beside the file's 'id'
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu")
    assert r.exit_code == 2 and "several ids datasets ['ID', 'id']; keep one" in r.stderr
    with h5py.File(path, "a") as f:  # an object id beside a candidate id (ZTF): 'id' is used, as always
        del f["ID"]
        f["candid"] = np.arange(4) + 900
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "-q")
    assert r.exit_code == 0 and "\n900," not in r.stdout


def test_image_api_takes_pillow_images_and_uint8_pixels(tmp_path: Path, tiny_image_model_path: Path) -> None:
    clf = Classifier(tiny_image_model_path, device="cpu")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)  # at the input size, (N, H, W, C)
    files = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    prepared = np.stack([load_image(f, clf.card.preprocessing) for f in files])
    want = clf.classify(prepared, preprocessed=True).proba
    with pytest.raises(InputError, match=r"float pixels .* or preprocessed=True"):
        clf.classify(prepared)  # floats are not guessed at: 0-255, 0-1 or model input?
    with pytest.raises(InputError, match=r"float pixels \(float32, values 0 to 255\)"):
        clf.classify(pixels.astype(np.float32))
    with pytest.raises(InputError, match="classify_file"):
        clf.classify([str(f) for f in files])
    with pytest.raises(InputError, match=r"images: none given"):
        clf.predict(np.zeros((0, 3, 8, 8), np.float32))
    np.testing.assert_array_equal(clf.classify([_opened(f) for f in files]).proba, want)
    np.testing.assert_array_equal(clf.classify(pixels).proba, want)
    np.testing.assert_array_equal(clf.classify(pixels.transpose(0, 3, 1, 2)).proba, want)
    from_files = np.concatenate([p.proba for p in clf.classify_file([str(f) for f in files])])
    np.testing.assert_array_equal(from_files, want)
    with pytest.raises(InputError, match="dtype int32"):
        clf.classify(pixels.astype(np.int32))
    with pytest.raises(InputError, match="one Pillow image given; pass a list"):
        clf.classify(_opened(files[0]))
    with pytest.raises(InputError, match=r"one image needs a batch axis \(image\[None\]\)"):
        clf.classify(pixels[0])
    broken = tmp_path / "cut.png"
    broken.write_bytes(files[0].read_bytes()[:60])
    with Image.open(broken) as lazy, pytest.raises(InputError, match=r"images\[1\]: cannot preprocess"):
        clf.classify([_opened(files[0]), lazy])  # decoding happens in classify
    with pytest.raises(InputError, match=r"uint8 pixels of shape \(5, 9, 9, 3\)"):
        clf.classify(np.zeros((5, 9, 9, 3), np.uint8))


def test_run_summary_counts_inputs_and_names_an_unlabelled_image(tmp_path: Path, tiny_image_model_path: Path) -> None:
    for name in ("cat/a.png", "dog/b.png", "other/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    files = [tmp_path / "cat/a.png", tmp_path / "dog/b.png", tmp_path / "other/c.png"]
    r = _cli("classify", *files, "-m", tiny_image_model_path, "--device", "cpu")
    assert r.exit_code == 0 and "3 rows from 3 input(s)" in r.stderr
    r = _cli("classify", *files, "-m", tiny_image_model_path, "--device", "cpu", "--evaluate")
    assert r.exit_code == 2
    assert "1 of 3 images are not in a folder named after one of the model's classes" in r.stderr
    assert f"e.g. {tmp_path / 'other/c.png'}" in r.stderr


def test_info_takes_the_model_as_argument_or_option(tiny_model_path: Path) -> None:
    a = _cli("info", tiny_model_path)
    b = _cli("info", "--model", tiny_model_path)
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout and '"name": "tiny"' in a.stdout
    r = _cli("info", "hits", "--model", tiny_model_path)
    assert r.exit_code == 2 and "two models given" in r.stderr


def test_output_folder_is_refused_whatever_its_name(tmp_path: Path, tiny_model_path: Path) -> None:
    path = write_hits_h5(tmp_path / "s.h5", 3)
    (tmp_path / "results").mkdir()
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "-o", tmp_path / "results")
    assert r.exit_code == 2 and "output path is a folder" in r.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["classify", "x.h5", "-b", "0"], "Invalid value for '--batch-size' / '-b'"),
        (["classify"], "no input files given (as arguments or with --files-from)"),
        (["classify", "x.h5", "--nope"], "No such option: --nope"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line_from_the_console_script(args: list[str], phrase: str) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "stampclf", *args], capture_output=True, text=True, timeout=60
    )  # the real entry point (CliRunner bypasses it)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("stampclf: error: ") and phrase in r.stderr
    assert "--help" in r.stderr


@pytest.mark.parametrize(
    ("labels", "phrase"),
    [
        (np.array([0.0, 1.0, 0.5, 1.0]), "label 0.5 is not a class index 0..1"),
        (np.array([True, False, True, True]), "labels are booleans"),
    ],
    ids=["fraction", "bool"],
)
def test_evaluate_names_the_bad_label(tmp_path: Path, tiny_model_path: Path, labels: np.ndarray, phrase: str) -> None:
    path = write_hits_h5(tmp_path / "l.h5", 4, labels=labels)
    r = _cli("classify", path, "-m", tiny_model_path, "--device", "cpu", "--evaluate")
    assert r.exit_code == 2 and phrase in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--threshold", "nan"], "threshold nan is not a number in [0, 1]"),
        (["--threshold", "1.5"], "threshold 1.5 is not a number in [0, 1]"),
        (["--precision", "fp16", "--device", "cpu"], "precision fp16 is for GPUs"),
    ],
    ids=["nan", "above_one", "fp16_cpu"],
)
def test_options_refused_with_the_value_named(
    tmp_path: Path, tiny_model_path: Path, args: list[str], phrase: str
) -> None:
    path = write_hits_h5(tmp_path / "s.h5", 4)
    r = _cli("classify", path, "-m", tiny_model_path, *args)
    assert r.exit_code == 2 and phrase in r.stderr and not r.stdout, r.stderr


def test_keep_going_evaluate_classifies_a_file_without_usable_labels(tmp_path: Path, tiny_model_path: Path) -> None:
    good = write_hits_h5(tmp_path / "good.h5", 6, seed=1)
    nolabels = write_hits_h5(tmp_path / "nolabels.h5", 4, seed=2, labels=None)
    other = write_hits_h5(tmp_path / "other.h5", 3, seed=3, labels=np.array([b"star"] * 3))
    out = tmp_path / "o.csv"
    r = _cli("classify", good, nolabels, other, "-m", tiny_model_path, "--device", "cpu", "--evaluate",
             "--keep-going", "-o", out)  # fmt: skip
    assert r.exit_code == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("stampclf: error:")]
    assert len(errors) == 2 and all("classified but not in the metrics" in e for e in errors)
    assert f"no labels in {nolabels}" in errors[0] and "label 'star' is not one of" in errors[1]
    with open(out) as fh:
        assert len(fh.readlines()) == 1 + 6 + 4 + 3  # every row written
    assert re.search(r"\bn: 6\b", r.stderr)  # the metrics: the labelled file only


def test_image_folders_are_read_as_training_reads_them(tmp_path: Path, tiny_image_model_path: Path) -> None:
    """Hidden files and folders skipped; a nested folder's images belong to their class folder."""
    root = tmp_path / "root"
    for name in ("cat/a.png", "cat/sub/b.png", "dog/c.png", ".ipynb_checkpoints/x.png", "cat/.cache/y.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05macOS resource fork")  # not an image
    out = tmp_path / "o.csv"
    r = _cli("classify", root, "-m", tiny_image_model_path, "--device", "cpu", "--evaluate", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "3 rows" in r.stderr and "support" in r.stderr
    clf = Classifier(tiny_image_model_path, device="cpu")
    [pred] = list(clf.classify_file(str(root), labels="check"))
    assert [clf.classes[i] for i in pred.true_labels] == ["cat", "cat", "dog"]  # type: ignore[union-attr]
    [pred] = list(clf.classify_file(str(root / "cat"), labels="check"))  # a class folder given alone
    assert [clf.classes[i] for i in pred.true_labels] == ["cat", "cat"]  # type: ignore[union-attr]
    named = tmp_path / "frog"  # a folder named after a class that holds class folders: they win
    (named / "cat").mkdir(parents=True)
    (named / "dog").symlink_to(root / "dog", target_is_directory=True)  # followed, as training follows it
    Image.new("RGB", (8, 8)).save(named / "cat" / "z.png")
    [pred] = list(clf.classify_file(str(named), labels="check"))
    assert [clf.classes[i] for i in pred.true_labels] == ["cat", "dog"]  # type: ignore[union-attr]
    pytest.importorskip("torch")
    from train.data.images import folder_per_class

    files, labels, names = folder_per_class(root, ("cat", "dog"))
    assert [Path(f).relative_to(root).as_posix() for f in files] == ["cat/a.png", "cat/sub/b.png", "dog/c.png"]
