"""Image models: registry, loaders, augmentation, shared preprocessing, train -> export -> classify."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL_Image = pytest.importorskip("PIL.Image")

from stampclf.io._images import ImageReader  # noqa: E402
from stampclf.preprocess import image_to_array, image_to_uint8, image_upscale, load_image, scale_pixels  # noqa: E402
from train.data import images as data_images  # noqa: E402
from train.registry import create_model, get_spec, list_models  # noqa: E402

IMAGE_MODELS = [n for n in list_models() if get_spec(n).input.get("kind") == "image"]


def _rng_image(rng: np.random.Generator, w: int, h: int, colour: tuple[int, int, int]) -> object:
    arr = np.clip(rng.normal(colour, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return PIL_Image.fromarray(arr)


def _fake_galaxy_zoo(root: Path, per_class: int = 5, size: int = 64) -> Path:  # galaxy scales 64 px 4x: not flagged
    """A tiny Galaxy-Zoo-layout set: labels.csv (OBJID, CLASS) + images/<OBJID>.jpeg, 6 classes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for c in range(6):
        for i in range(per_class):
            objid = 1000 * c + i
            img = _rng_image(rng, size, size, (40 * c, 200 - 30 * c, 100))
            img.save(root / "images" / f"{objid}.jpeg", quality=90)
            rows.append((objid, c))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["OBJID", "CLASS"])
        w.writerows(rows)
    return root


def test_image_models_registered() -> None:
    for name in ("galaxy", "galaxy-seed", "cifar10", "cifar10-seed", "pokemon-cnn", "pokemon-resnet"):
        spec = get_spec(name)
        assert spec.preprocessing["kind"] == "image"
        assert spec.input["kind"] == "image"
    assert get_spec("galaxy").classes == (
        "elliptical", "clockwise_spiral", "anticlockwise_spiral", "edge_on", "dont_know", "merger"
    )


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_forward(name: str) -> None:
    spec = get_spec(name)
    torch.manual_seed(0)
    k = len(spec.classes) or 4  # image-folder takes its classes from the data
    model = create_model(name, k).eval()
    x = torch.randn(3, len(spec.input["channels"]), spec.input["height"], spec.input["width"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, k)
    assert torch.isfinite(out).all()
    # the card's preprocessing produces exactly the model's input shape
    img = PIL_Image.new("RGB", (123, 77), (10, 20, 30))
    assert image_to_array(img, spec.preprocessing).shape == tuple(x.shape[1:])


# --- preprocessing ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["galaxy", "pokemon-cnn", "cifar10"])
def test_training_preprocessing_equals_runtime_bitwise(tmp_path: Path, name: str) -> None:
    spec = get_spec(name)
    rng = np.random.default_rng(1)
    files = []
    for i, (w, h) in enumerate([(423, 423), (150, 224), (33, 29)]):
        f = tmp_path / f"im{i}.jpg"
        _rng_image(rng, w, h, (120, 80, 60)).save(f, quality=85)
        files.append(str(f))
    # training: decode once to uint8 (cached), then the batched arithmetic
    train_x = scale_pixels(data_images.decode_images(files, spec.preprocessing, str(tmp_path / "cache")), spec.preprocessing)
    again = scale_pixels(data_images.decode_images(files, spec.preprocessing, str(tmp_path / "cache")), spec.preprocessing)
    # runtime: the classifier's reader, one file at a time through load_image
    shape = (3, spec.input["height"], spec.input["width"])
    batch = next(ImageReader(files, spec.preprocessing, shape).batches(8))
    tiny = "flagged: image 33x29 upscaled more than 4x" if image_upscale((33, 29), spec.preprocessing) > 4 else "ok"
    assert list(batch.status) == ["ok", "ok", tiny]
    assert train_x.dtype == batch.x.dtype == np.float32
    assert np.array_equal(train_x, batch.x)  # bitwise
    assert np.array_equal(again, train_x)  # the cache returns the same pixels
    for f, row in zip(files, train_x, strict=True):
        assert np.array_equal(load_image(f, spec.preprocessing), row)


def test_pad_fit_keeps_whole_picture_on_background() -> None:
    img = PIL_Image.new("RGB", (50, 100), (0, 0, 0))
    spec = {"fit": "pad", "resize": 20, "pad_color": [255, 255, 255]}
    u8 = image_to_uint8(img, spec)
    assert u8.shape == (3, 20, 20)
    assert (u8[:, :, :5] == 255).all() and (u8[:, :, -5:] == 255).all()  # side bars: background
    assert (u8[:, :, 5:15] == 0).all()  # the whole (black) picture, scaled to 10x20


# --- augmentation ----------------------------------------------------------------------
def _chiral_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(6, 3, 8, 8)
    x[:, :, 0, :2] = 1.0  # an asymmetric mark: top-left corner
    return x, torch.arange(6)


@pytest.mark.parametrize("axis", ["hflip", "vflip"])
def test_mirror_swaps_chirality_labels(axis: str) -> None:
    aug = data_images.ImageAugment(**{axis: 1.0}, swap=((1, 2),))
    x, y = _chiral_batch()
    xa, ya = aug(x, y, torch.Generator().manual_seed(0))
    assert ya.tolist() == [0, 2, 1, 3, 4, 5]  # clockwise <-> anticlockwise, others kept
    assert torch.equal(xa, x.flip(3 if axis == "hflip" else 2))


def test_both_mirrors_and_rotations_keep_chirality() -> None:
    x, y = _chiral_batch()
    both = data_images.ImageAugment(hflip=1.0, vflip=1.0, swap=((1, 2),))
    xa, ya = both(x, y, torch.Generator().manual_seed(0))
    assert ya.tolist() == y.tolist()  # two mirrors = a 180-degree rotation
    assert torch.equal(xa, torch.rot90(x, 2, (2, 3)))
    rot = data_images.ImageAugment(rot90=True, swap=((1, 2),))
    xs, ys = [], []
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        xr, yr = rot(x, y, gen)
        xs.append(xr)
        ys.append(yr)
    assert all(yr.tolist() == y.tolist() for yr in ys)
    assert any(not torch.equal(xr, x) for xr in xs)  # it did rotate


def test_galaxy_model_is_rotation_invariant_and_mirror_swaps_chirality() -> None:
    torch.manual_seed(0)
    model = create_model("galaxy").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        rotated = model(torch.rot90(x, 1, (2, 3)))
        mirrored = model(x.flip(3))
        upside_down = model(x.flip(2))
    assert torch.allclose(rotated, base, atol=1e-5)
    swapped = base[:, [0, 2, 1, 3, 4, 5]]  # clockwise <-> anticlockwise
    assert torch.allclose(mirrored, swapped, atol=1e-5)
    assert torch.allclose(upside_down, swapped, atol=1e-5)
    assert (mirrored - base).abs().max() > 1e-4  # the net does see chirality (equalities above: 1e-5)


def test_random_mirrors_swap_only_mirrored_rows() -> None:
    aug = data_images.ImageAugment(hflip=0.5, swap=((1, 2),))
    x = torch.zeros(200, 1, 4, 4)
    x[:, :, :, 0] = 1.0
    y = torch.tensor([1, 2] * 100)
    xa, ya = aug(x, y, torch.Generator().manual_seed(3))
    flipped = xa[:, 0, 0, 3] == 1.0
    assert 40 < int(flipped.sum()) < 160
    assert torch.equal(ya[flipped], 3 - y[flipped])
    assert torch.equal(ya[~flipped], y[~flipped])


def test_galaxy_loader_uses_chirality_swap(tmp_path: Path) -> None:
    root = _fake_galaxy_zoo(tmp_path / "gz")
    bundle = data_images.load_galaxy_zoo1(get_spec("galaxy"), {"root": str(root), "cache": "none"}, 0)
    assert bundle.augment.swap == ((1, 2),)
    assert bundle.augment.hflip > 0 and bundle.augment.rot90
    sizes = bundle.provenance["sizes"]
    assert sizes == {"train": 18, "val": 6, "test": 6}  # one of each class in val and test
    assert len(bundle.provenance["file_lists_sha256"]["test"]) == 64
    again = data_images.load_galaxy_zoo1(get_spec("galaxy"), {"root": str(root), "cache": "none"}, 0)
    assert again.provenance["file_lists_sha256"] == bundle.provenance["file_lists_sha256"]
    other = data_images.load_galaxy_zoo1(get_spec("galaxy"), {"root": str(root), "cache": "none"}, 1)
    assert other.provenance["file_lists_sha256"] != bundle.provenance["file_lists_sha256"]


def test_write_split_lays_out_exactly_the_loaders_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_galaxy_zoo(tmp_path / "gz")
    spec, opts = get_spec("galaxy"), {"root": str(root), "cache": "none"}
    bundle = data_images.load_galaxy_zoo1(spec, opts, 0)
    files, labels = data_images.split_files(spec, opts, 0)["test"]
    assert data_images._list_sha256(files, labels, root) == bundle.provenance["file_lists_sha256"]["test"]
    out = tmp_path / "test_split"
    assert data_images.main(["--model", "galaxy", "--out", str(out), "--set", f"root={root}"]) == 0
    laid = sorted((p.parent.name, p.name) for p in out.glob("*/*.jpeg"))
    assert laid == sorted((spec.classes[int(y)], Path(f).name) for f, y in zip(files, labels, strict=True))
    assert all(p.resolve().parent == (root / "images").resolve() for p in out.glob("*/*.jpeg"))
    capsys.readouterr()
    # a second split into the same folder would mix them: refused, the folder named
    assert data_images.main(["--model", "galaxy", "--split", "val", "--out", str(out), "--set", f"root={root}"]) == 1
    assert f"{out} exists and is not empty" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert data_images.main(["--model", "galaxy", "--out", str(tmp_path / "a_file"), "--set", f"root={root}"]) == 1
    assert "a_file is a file, not a folder" in capsys.readouterr().err
    assert data_images.main(["--model", "hits", "--out", str(tmp_path / "h")]) == 1
    assert "dataset 'hits_sim', not an image data set" in capsys.readouterr().err
    assert data_images.main(["--model", "galxy", "--out", str(tmp_path / "g")]) == 1
    assert capsys.readouterr().err.startswith("error: unknown model 'galxy'")


# --- loaders ---------------------------------------------------------------------------
def test_stratified_split_is_disjoint_and_deterministic() -> None:
    labels = np.repeat(np.arange(4), [50, 20, 7, 3])
    a = data_images.stratified_split(labels, (0.15, 0.15), seed=5)
    b = data_images.stratified_split(labels, (0.15, 0.15), seed=5)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    allidx = np.concatenate(a)
    assert len(allidx) == len(labels) == len(np.unique(allidx))
    for part in a[:2]:
        assert set(labels[part]) == {0, 1, 2, 3}


def test_image_folder_layout_mistakes_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def images(folder: Path, n: int) -> None:
        folder.mkdir(parents=True)
        for i in range(n):
            PIL_Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")

    images(tmp_path / "cat", 3)
    with pytest.raises(FileNotFoundError, match="no class folders; the layout is one folder per class .*its 3 images"):
        data_images.folder_per_class(tmp_path / "cat")  # root= a class folder
    images(tmp_path / "one" / "cat", 3)
    with pytest.raises(FileNotFoundError, match=r"one class folder \(cat\); a classifier needs at least two"):
        data_images.folder_per_class(tmp_path / "one")
    images(tmp_path / "cif" / "train" / "cat", 8)
    images(tmp_path / "cif" / "test" / "dog", 1)
    files, labels, names = data_images.folder_per_class(tmp_path / "cif")  # root one level too high
    out = capsys.readouterr().out
    assert names == ["test", "train"] and "the classes test, train look like data splits" in out
    assert "class(es) with fewer than 7 images: test (1)" in out


def test_unreadable_training_images_are_named_all_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stampclf import InputError

    files = []
    for i in range(4):
        f = tmp_path / f"{i}.png"
        PIL_Image.new("RGB", (8, 8), (i, 0, 0)).save(f)
        files.append(str(f))
    for f in files[1:3]:
        Path(f).write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=r"^2 of 4 images cannot be read \(remove or replace them\): .*1.png.*; .*2.png"):
        data_images.decode_images(files, {"resize": 8, "crop": 8}, cache=None)
    # through training: the bad images of every split in one error, counted over the whole folder
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            PIL_Image.new("RGB", (16, 16), (i * 9, 0, 0)).save(root / cls / f"{i}.png")
        for i in range(6):
            (root / cls / f"bad{i}.png").write_bytes(b"\x89PNG broken")
    from train import train as train_mod

    args = ["--model", "image-folder", "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run"),
            "--set", f"root={root}", "--set", "size=16"]
    assert train_mod.main(args) == 2
    assert "train: error: 12 of 52 images cannot be read" in capsys.readouterr().err


def test_every_jpeg_suffix_is_an_image_in_a_folder(tmp_path: Path, tiny_image_model_path: Path) -> None:
    from PIL import Image

    from stampclf import Classifier, Predictions

    folder = tmp_path / "up"
    folder.mkdir()
    for name in ("A.JPG", "b.jpe", "c.jfif", "d.jpeg"):
        Image.new("RGB", (12, 10), (200, 30, 30)).save(folder / name, format="JPEG")
    (folder / "notes.txt").write_text("not an image")
    res = Predictions.concat(list(Classifier(tiny_image_model_path, device="cpu").classify_file(str(folder))))
    assert sorted(Path(i).name for i in res.ids) == ["A.JPG", "b.jpe", "c.jfif", "d.jpeg"]
    assert set(res.status) == {"ok"}


def test_a_thumbnail_blown_up_to_the_models_size_is_flagged(tmp_path: Path, tiny_image_model_path: Path) -> None:
    from PIL import Image

    from stampclf import Classifier, Predictions

    clf = Classifier(tiny_image_model_path, device="cpu")
    side = clf.card.preprocessing["resize"]  # the shorter side is scaled to this (fit: crop)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.gif")
    Image.new("RGB", (side // 4, 3 * side), (9, 9, 9)).save(tmp_path / "x4.png")  # 4x exactly: not flagged
    Image.new("RGB", (side // 4 - 1, side), (9, 9, 9)).save(tmp_path / "thin.png")
    paths = [str(tmp_path / n) for n in ("dot.gif", "x4.png", "thin.png", "dot.gif")]
    res = Predictions.concat(list(clf.classify_file(paths)))
    assert list(res.status) == [
        "flagged: image 1x1 upscaled more than 4x",
        "ok",
        f"flagged: image {side // 4 - 1}x{side} upscaled more than 4x",
        "flagged: image 1x1 upscaled more than 4x; duplicate id",  # both reasons kept
    ]
    assert np.isfinite(res.proba).all()  # scored all the same


def test_folder_per_class_and_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for c in ("b", "a"):
        (tmp_path / c / "sub").mkdir(parents=True)
        for i in range(2):
            _rng_image(rng, 8, 8, (1, 2, 3)).save(tmp_path / c / "sub" / f"{i}.png")
    files, labels, names = data_images.folder_per_class(tmp_path)
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 1, 1] and len(files) == 4
    with pytest.raises(FileNotFoundError, match="class folder of 'c' missing"):
        data_images.folder_per_class(tmp_path, ("a", "c"))
    capsys.readouterr()
    _rng_image(rng, 8, 8, (1, 2, 3)).save(tmp_path / "stray.png")
    files, _, _ = data_images.folder_per_class(tmp_path, ("a",))  # 'b' is no class of this model
    assert len(files) == 2
    assert "not used: folders that are no class: b; 1 images outside the class folders" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"tar xzf \.\./shared/data/galaxy_zoo1/galaxy_zoo1_sdss\.tar\.gz"):
        data_images.load_galaxy_zoo1(get_spec("galaxy"), {"root": str(tmp_path / "nope")}, 0)


def test_folder_with_csv_names_bad_row(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    PIL_Image.new("RGB", (4, 4)).save(tmp_path / "images" / "7.jpeg")
    (tmp_path / "labels.csv").write_text("OBJID,CLASS\n7,1\n8,0\n")
    with pytest.raises(FileNotFoundError, match=r"labels\.csv:3: image of '8' not found"):
        data_images.folder_with_csv(tmp_path / "images", tmp_path / "labels.csv", "OBJID", "CLASS", ".jpeg")
    (tmp_path / "labels.csv").write_text("OBJID,CLASS\n7,1\n")
    files, labels = data_images.folder_with_csv(tmp_path / "images", tmp_path / "labels.csv", "OBJID", "CLASS")
    assert labels.tolist() == [1] and files[0].endswith("7.jpeg")


# --- reader ----------------------------------------------------------------------------
def test_image_reader_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = []
    for i in range(11):
        f = tmp_path / f"{i:02d}.png"
        if i == 4:
            f.write_bytes(b"this is not a PNG")
        elif i == 7:
            buf = io.BytesIO()
            _rng_image(rng, 30, 30, (50, 50, 50)).save(buf, format="JPEG")
            f = tmp_path / f"{i:02d}.jpg"
            f.write_bytes(buf.getvalue()[:200])  # truncated JPEG
        else:
            PIL_Image.fromarray(np.full((6, 6, 3), i * 20, np.uint8)).save(f)
        names.append(str(f))
    spec = {"resize": 6, "crop": 6, "scale": 1.0}
    reader = ImageReader(names, spec, (3, 6, 6), threads=3)
    batches = list(reader.batches(4))
    reader.close()
    ids = [i for b in batches for i in b.ids]
    status = [s for b in batches for s in b.status]
    x = np.concatenate([b.x for b in batches])
    assert ids == names
    assert status[4].startswith(f"failed: {names[4]}: cannot read image")
    assert status[7].startswith(f"failed: {names[7]}")
    for i in set(range(11)) - {4, 7}:
        assert status[i] == "ok" and x[i, 0, 0, 0] == i * 20


def test_image_reader_flags_the_same_image_given_twice(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        PIL_Image.fromarray(np.full((6, 6, 3), i * 20, np.uint8)).save(folder / f"{i}.png")
    again = str(tmp_path / "imgs" / ".." / "imgs" / "1.png")  # another spelling of the same file
    reader = ImageReader([str(folder), again], {"resize": 6, "crop": 6, "scale": 1.0}, (3, 6, 6), threads=1)
    status = [s for b in reader.batches(2) for s in b.status]
    assert status == ["ok", "ok", "flagged: duplicate id"]


def test_16_bit_image_is_scaled_not_clipped() -> None:
    from stampclf.preprocess import image_to_uint8

    ramp = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = PIL_Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    got = image_to_uint8(img, {"mode": "L"})
    assert got[0, 0].tolist() == [0, 100, 255]


def test_your_own_images_train_export_and_classify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of your own on ``image_folder`` (a folder per class given with --set root)."""
    pytest.importorskip("onnx")
    from train import export as export_mod
    from train import registry
    from train import train as train_mod
    from train.models.images import image_input, image_prep

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    registry.register_model(
        "my-shapes", version="0.1.0", task="image-classification", classes=("dark", "light"),
        input=image_input(16, "a test image set"), preprocessing=image_prep(resize=16, crop=16, doc="16 px"),
        dataset="image_folder", recipe={"epochs": 2, "batch_size": 8, "lr": 1e-2},
        description="a two-class test model",
    )(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 2)))  # fmt: skip
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 210)):
        (root / label).mkdir(parents=True)
        for i in range(20):
            px = np.clip(rng.normal(level, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
            PIL_Image.fromarray(px).save(root / label / f"{i}.png")
    run = tmp_path / "run"
    assert train_mod.main(["--model", "my-shapes", "--out", str(run), "--threads", "1"]) == 2
    assert "train: error: data set 'image_folder' reads your own images: give --set root=FOLDER" in capsys.readouterr().err
    assert train_mod.main(["--model", "my-shapes", "--out", str(run), "--threads", "1",
                           "--set", f"root={root}", "--set", "cache=none"]) == 0  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["root"] == str(root) and report["data"]["sizes"] == {"train": 28, "val": 6, "test": 6}
    out = tmp_path / "exported"
    assert export_mod.main(["--model", "my-shapes", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    from stampclf import Classifier, classify_files

    clf = Classifier(out / "my-shapes.onnx", device="cpu")
    assert clf.classes == ["dark", "light"] and clf.version.startswith("0.1.0+local.")  # your images: your data
    s = classify_files(clf, [str(root)], str(tmp_path / "o.csv"), evaluate=True, progress=False)
    assert s.rows == 40 and s.metrics is not None and s.metrics["roc_auc"] >= 0.95  # two epochs: it ranks


def test_image_folder_model_takes_its_classes_from_the_folders(tmp_path: Path) -> None:
    """``--model image-folder --set root=FOLDER``: your own images, no code."""
    pytest.importorskip("onnx")
    from train import export as export_mod
    from train import train as train_mod

    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for label, level in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        (root / label).mkdir(parents=True)
        for i in range(10):
            PIL_Image.fromarray(np.clip(rng.normal(level, 20, (24, 24, 3)), 0, 255).astype(np.uint8)).save(
                root / label / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are no class
    run = tmp_path / "run"
    assert train_mod.main(["--model", "image-folder", "--out", str(run), "--threads", "1", "--epochs", "1",
                           "--set", f"root={root}", "--set", "batch_size=8"]) == 0  # fmt: skip
    assert json.loads((run / "report.json").read_text())["data"]["classes"] == ["blue", "green", "red"]
    assert export_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--name", "colours", "--out",
                            str(tmp_path / "m")]) == 0  # fmt: skip
    from stampclf import Classifier

    clf = Classifier(tmp_path / "m" / "colours.onnx", device="cpu")
    assert clf.classes == ["blue", "green", "red"] and clf.name == "colours" and "+local." in clf.version
    assert clf.card.training["architecture"] == "image-folder"
    assert len(clf.evaluate(clf.classify_file(str(root), labels="check"))["per_class"]) == 3


def test_image_folder_model_takes_its_size_from_set_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set size=40``: the card, the graph and the runtime's preprocessing take 40 px images."""
    pytest.importorskip("onnx")
    from train import export as export_mod
    from train import train as train_mod

    root = tmp_path / "imgs"
    rng = np.random.default_rng(2)
    for label, level in (("dark", 40), ("light", 210)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            PIL_Image.fromarray(np.clip(rng.normal(level, 20, (50, 70, 3)), 0, 255).astype(np.uint8)).save(
                root / label / f"{i}.png")
    run = tmp_path / "run"
    base = ["--model", "image-folder", "--threads", "1", "--set", f"root={root}"]
    for bad in ("size=8", "size=40.5", "size=big", "size=null"):
        assert train_mod.main([*base, "--out", str(run), "--set", bad]) == 2
        assert re.search("--set size=.*whole number of pixels from 16 to 1024", capsys.readouterr().err)
    assert train_mod.main([*base, "--out", str(run), "--epochs", "1", "--set", "size=40",
                           "--set", "batch_size=8"]) == 0  # fmt: skip
    # re-evaluating the weights at another size would export a card for images they never saw
    assert train_mod.main([*base, "--out", str(run), "--evaluate-only", "--set", "size=48"]) == 2
    assert train_mod.main([*base, "--out", str(run), "--evaluate-only", "--set", "size=40"]) == 0  # the run's own
    assert export_mod.main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "m")]) == 0
    from stampclf import Classifier

    clf = Classifier(tmp_path / "m" / "image-folder.onnx", device="cpu")
    assert clf.card.shape == (3, 40, 40) and clf.session.get_inputs()[0].shape[1:] == [3, 40, 40]
    prep = clf.card.preprocessing
    assert (prep["resize"], prep["crop"]) == (40, 40) and "40 px" in prep["doc"] and "96" not in prep["doc"]
    assert "40x40" in clf.card.description and "48, 96, 192 filters" in clf.card.description  # the size, not the widths
    assert "--set size=40" in clf.card.training["command"]
    # the largest activation is the stem's 24 x 20 x 20 output, not a 192 x 192 x 3 x 3 weight (1.3 MB), so
    # the default batch follows the size
    assert clf.card.input["largest_activation_bytes_per_row"] == 24 * 20 * 20 * 4
    assert clf.card.input["default_batch_size"] == 1024
    from stampclf import Predictions

    res = Predictions.concat(clf.classify_file(str(root), labels="check"))
    assert len(res) == 16 and (res.status == "ok").all()
    assert train_mod.main(["--model", "galaxy", "--set", "size=64"]) == 2
    assert re.search("model 'galaxy' takes no --set size|unknown --set key 'size'", capsys.readouterr().err)
    # an image removed: the splits are drawn again, and held-out images could be training images
    next((root / "dark").iterdir()).unlink()
    assert train_mod.main([*base, "--out", str(run), "--evaluate-only", "--set", "size=40"]) == 2
    assert "split(s) differ from the run's" in capsys.readouterr().err


def test_transparent_pixels_show_the_cards_background() -> None:
    from stampclf.preprocess import image_to_uint8

    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black, one opaque red pixel
    rgba[0, 0] = (255, 0, 0, 255)
    img = PIL_Image.fromarray(rgba, "RGBA")
    got = image_to_uint8(img, {"mode": "RGB", "fit": "pad", "resize": 4, "pad_color": [255, 255, 255]})
    assert got[:, 0, 0].tolist() == [255, 0, 0] and got[:, 3, 3].tolist() == [255, 255, 255]
    assert image_to_uint8(img, {"mode": "RGB"})[:, 3, 3].tolist() == [0, 0, 0]  # no pad_color: black
    assert image_to_uint8(img, {"mode": "L", "pad_color": [255]})[0, 3, 3] == 255  # one grey level
    flt = PIL_Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")  # float TIFF pixels in 0..1
    assert image_to_uint8(flt, {"mode": "L"})[0, 0].tolist() == [0, 127, 255]
    key = PIL_Image.fromarray(np.array([[[200, 10, 10], [0, 0, 0]]], np.uint8))  # RGB with a tRNS key colour
    key.info["transparency"] = (0, 0, 0)
    assert image_to_uint8(key, {"mode": "RGB", "pad_color": [255, 255, 255]})[:, 0].T.tolist() == [
        [200, 10, 10], [255, 255, 255]]
    for values, want in (([0, 32768, 65535], [0, 127, 255]), ([0, 100, 255], [0, 0, 0])):
        wide = PIL_Image.fromarray(np.array([values], np.int32), "I")
        wide.format = "PNG"  # a 16-bit PNG as older Pillow opens it: scaled by its depth, not by its values
        assert image_to_uint8(wide, {"mode": "L"})[0, 0].tolist() == want
    other = PIL_Image.fromarray(np.array([[0, 100, 255]], np.int32), "I")  # e.g. a 32-bit TIFF: as before
    assert image_to_uint8(other, {"mode": "L"})[0, 0].tolist() == [0, 100, 255]


# --- end to end ------------------------------------------------------------------------
def test_tiny_train_export_classify(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from stampclf.cli import app
    from train import export as export_mod
    from train import train as train_mod

    root = _fake_galaxy_zoo(tmp_path / "gz", per_class=5)
    run = tmp_path / "run"
    code = train_mod.main(["--model", "galaxy", "--epochs", "1", "--out", str(run), "--threads", "1",
                           "--set", f"root={root}", "--set", "cache=none", "--set", "batch_size=8"])
    assert code == 0
    report = (run / "report.json").read_text()
    assert '"file_lists_sha256"' in report
    out_dir = tmp_path / "exported"
    assert export_mod.main(["--model", "galaxy", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out_dir)]) == 0
    onnx_path = out_dir / "galaxy.onnx"
    assert onnx_path.is_file() and (out_dir / "galaxy" / "confusion_matrix.png").is_file()
    from stampclf import Classifier

    clf = Classifier(onnx_path, device="cpu")
    # galaxy: 8 views x 24 x 64 x 64 float32 = 3 MB per image at the first stride-2 conv
    assert clf.card.input["largest_activation_bytes_per_row"] >= 8 * 24 * 64 * 64 * 4
    assert clf.batch_size == clf.card.input["default_batch_size"] == 64
    assert Classifier(onnx_path, device="cpu", batch_size=5).batch_size == 5

    # a folder (recursive) with one corrupt image, plus two single files of other formats
    folder = tmp_path / "to_classify"
    (folder / "deeper").mkdir(parents=True)
    imgs = sorted((root / "images").glob("*.jpeg"))
    for f in imgs[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "deeper" / "x.jpeg").write_bytes(imgs[10].read_bytes())
    (folder / "deeper" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    png = tmp_path / "single.png"
    PIL_Image.open(imgs[20]).save(png)
    out_csv = tmp_path / "out.csv"
    args = ["classify", str(png), str(folder), "--model", str(onnx_path), "-o", str(out_csv), "-b", "2", "-q"]
    # an unreadable image is a failed row with its error (and an input error: exit 2); the others are scored
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "broken.jpg: cannot read image" in result.output
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert rows[0]["id"] == str(png)
    assert [r["id"] for r in rows[1:]] == sorted(r["id"] for r in rows[1:])  # folder: sorted, recursive
    broken = [r for r in rows if r["id"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["status"].startswith("failed:") and "broken.jpg" in broken[0]["status"]
    assert broken[0]["label"] == ""
    classes = get_spec("galaxy").classes
    for r in rows:
        if r is broken[0]:
            continue
        assert r["status"] == "ok" and r["label"] in classes and r["model"] == "galaxy"
        p = np.array([float(r[f"p_{c}"]) for c in classes])
        assert abs(p.sum() - 1) < 1e-4
    # every row names its own file (the id), in CSV (fast and quoted paths) and HDF5 output
    assert all(r["file"] == r["id"] for r in rows)
    comma = tmp_path / "a,b.png"  # needs CSV quoting: the csv-module path
    comma.write_bytes(png.read_bytes())
    out2 = tmp_path / "out2.csv"
    assert CliRunner().invoke(app, ["classify", str(comma), str(png), "--model", str(onnx_path), "-o", str(out2),
                                    "-q"]).exit_code == 0
    with open(out2, newline="") as fh:
        rows2 = list(csv.DictReader(fh))
    assert [r["file"] for r in rows2] == [str(comma), str(png)] == [r["id"] for r in rows2]
    out_h5 = tmp_path / "out.h5"
    assert CliRunner().invoke(app, ["classify", str(png), str(folder / "deeper" / "x.jpeg"), "--model",
                                    str(onnx_path), "-o", str(out_h5), "-q"]).exit_code == 0
    import h5py

    with h5py.File(out_h5) as f:
        assert [v.decode() for v in f["file"][:]] == [str(png), str(folder / "deeper" / "x.jpeg")]

    # a folder per class (the training layout) carries its labels, so --evaluate works on it
    labelled = tmp_path / "labelled"
    scored = [r for r in rows if r["status"] == "ok"]
    for r in scored:  # each image in the folder of the class it was given: accuracy 1
        (labelled / r["label"]).mkdir(parents=True, exist_ok=True)
        (labelled / r["label"] / Path(r["id"]).name).write_bytes(Path(r["id"]).read_bytes())
    other = next(c for c in classes if c != scored[0]["label"])  # and one image under a wrong label
    (labelled / other).mkdir(exist_ok=True)
    (labelled / other / "wrong.png").write_bytes(Path(scored[0]["id"]).read_bytes())
    ev = CliRunner().invoke(app, ["classify", str(labelled), "--model", str(onnx_path), "-o", str(tmp_path / "ev.csv"),
                                  "-q", "--evaluate"])
    n = len(scored) + 1
    assert ev.exit_code == 0 and f"n: {n}\n" in ev.output and f"accuracy: {(n - 1) / n:.4f}" in ev.output
    # images outside such folders have no labels: said up front, no output file
    none = tmp_path / "none.csv"
    ev = CliRunner().invoke(app, ["classify", str(png), "--model", str(onnx_path), "-o", str(none), "-q", "--evaluate"])
    assert ev.exit_code == 2 and f"no labels in {png}" in ev.output and not none.exists()

    # --evaluate-only re-runs the evaluation of the saved weights with the run's own options
    before = json.loads(report)
    assert train_mod.main(["--model", "galaxy", "--evaluate-only", "--out", str(run), "--threads", "1"]) == 0
    after = json.loads((run / "report.json").read_text())
    assert after["evaluated_from"].startswith(f"weights of the run of {before['date']}")
    assert after["metrics"]["test"]["accuracy"] == before["metrics"]["test"]["accuracy"]
    assert after["history"] == before["history"] and after["command"] == before["command"]
    assert after.get("code") == before.get("code")  # the code that trained the weights, not the re-evaluation's


def test_whiten_init_decorrelates_patches_and_stays_frozen() -> None:
    from train.models.images import Whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 24, 24, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 3 + 0.3 * x.roll(1, 1)  # strongly correlated pixels
    layer = Whiten(3)
    layer.init_from_data(x)
    f = torch.nn.functional.conv2d(x, layer.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    f = f - f.mean(0)
    cov = f.T @ f / len(f)
    assert torch.allclose(cov, torch.eye(12), atol=0.01)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])  # both signs survive the GELU
    assert not layer.weight.requires_grad and layer.bias.requires_grad


def test_trainer_calls_init_from_data_with_training_inputs() -> None:
    from torch.utils.data import TensorDataset

    from train.train import _init_from_data

    seen: list[torch.Tensor] = []

    class Hook(torch.nn.Module):
        def init_from_data(self, x: torch.Tensor) -> None:
            seen.append(x)

    ds = TensorDataset(torch.arange(10.0)[:, None], torch.zeros(10, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.Identity(), Hook())
    _init_from_data(model, ds, 0, "cpu", gen_seed=0)
    assert not seen
    _init_from_data(model, ds, 4, "cpu", gen_seed=0)
    assert seen[0].shape == (4, 1) and len(set(seen[0].flatten().tolist())) == 4
