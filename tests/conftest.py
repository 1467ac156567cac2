"""Shared test fixtures: a tiny ONNX model with a valid card (built without torch) and HDF5 writers.

The model builders use the ``onnx`` helper API only, so the runtime tests run without the
training stack. The card mirrors ``train/models/hits.py`` (copied here, not imported, so that
these fixtures work without torch).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: Copy of ``train.models.hits.HITS_INPUT`` (kept in sync by ``test_hits_card_mirror`` where torch exists).
HITS_INPUT: dict[str, Any] = {
    "kind": "stamp",
    "channels": ["template", "science", "difference", "snr_difference"],
    "hdf5_datasets": ["temp_images", "sci_images", "diff_images", "SNR_images"],
    "height": 21,
    "width": 21,
    "dtype": "float32",
    "layout": "NCHW",
}
#: Copy of ``train.models.hits.HITS_PREPROCESSING``.
HITS_PREPROCESSING: dict[str, Any] = {
    "kind": "stamp",
    "inside_graph": False,
    "size_policy": "crop_or_pad",
    "nan_policy": {"fill": 0.0, "max_bad_fraction": 0.5, "flag": True},
    "normalisation": {"method": "robust_asinh", "softening": 1.0},
}
HITS_DATASETS = tuple(HITS_INPUT["hdf5_datasets"])


def card_dict(**overrides: Any) -> dict[str, Any]:
    """A complete, valid card as a dict (weights_sha256 is a placeholder until `build_model`)."""
    card: dict[str, Any] = {
        "name": "tiny",
        "version": "0.0.1",
        "task": "real-bogus",
        "description": "test model: global average pool + linear + softmax",
        "input": copy.deepcopy(HITS_INPUT),
        "preprocessing": copy.deepcopy(HITS_PREPROCESSING),
        "classes": ["bogus", "real"],
        "positive_class": "real",
        "threshold": 0.5,
        "training": {"command": "tests/conftest.py", "seed": 0, "data": {"provenance": "none", "sha256": ""}},
        "metrics": {},
        "versions": {},
        "date": "2026-01-01",
        "weights_sha256": "0" * 64,
    }
    card.update(overrides)
    return card


def build_model_bytes(
    card: dict[str, Any] | None = None,
    *,
    channels: int | None = None,
    height: int | None = None,
    width: int | None = None,
    n_classes: int | None = None,
    seed: int = 0,
    card_json: str | None = None,
    fix_sha: bool = True,
    validate: bool = True,
) -> bytes:
    """Serialised ONNX: ``stamps`` [N,C,H,W] -> GlobalAveragePool -> Flatten -> Gemm -> Softmax.

    Parameters
    ----------
    card
        Card dict to attach (default: `card_dict()`); ``None`` entries are left as given.
    channels, height, width, n_classes
        Graph shape (default: from the card).
    card_json
        Attach this exact text instead of the card (for invalid-card tests).
    fix_sha
        Set the card's ``weights_sha256`` to the real graph hash.
    validate
        Check the card with `ModelCard.from_dict` (off for invalid-card tests).
    """
    import onnx
    from onnx import TensorProto, helper

    from stampclf._card import CARD_KEY, ModelCard, graph_sha256, read_onnx_parts

    card = card_dict() if card is None else copy.deepcopy(card)
    inp = card.get("input", HITS_INPUT)
    c = channels or len(inp["channels"])
    h, w = height or inp["height"], width or inp["width"]
    k = n_classes or len(card.get("classes", ["a", "b"]))
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 1.0, (k, c)).astype(np.float32)
    bias = rng.normal(0, 0.1, k).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["stamps"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("stamps", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, bias.shape, bias.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    if fix_sha:
        graph_bytes, _ = read_onnx_parts(model.SerializeToString())
        card["weights_sha256"] = graph_sha256(graph_bytes)
    if card_json is None:
        card_json = ModelCard.from_dict(card).to_json() if fix_sha and validate else _json(card)
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card_json
    return model.SerializeToString()


def _json(card: dict[str, Any]) -> str:
    import json

    return json.dumps(card, sort_keys=True)


def write_model(path: str | Path, card: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write `build_model_bytes(card, **kwargs)` to *path* and return it."""
    path = Path(path)
    path.write_bytes(build_model_bytes(card, **kwargs))
    return path


def make_stamps(n: int, seed: int = 0, size: tuple[int, int] = (21, 21), channels: int = 4) -> np.ndarray:
    """Random ``(n, channels, H, W)`` float32 stamps: noise plus a bump of random height."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    bump = np.exp(-((yy - h // 2) ** 2 + (xx - w // 2) ** 2) / 4.0).astype(np.float32)
    x = rng.normal(100, 5, (n, channels, h, w)).astype(np.float32)
    x += rng.uniform(0, 80, (n, channels, 1, 1)).astype(np.float32) * bump
    return x


def write_hits_h5(
    path: str | Path,
    n: int = 16,
    seed: int = 0,
    *,
    layout: str = "channels",
    stamps: np.ndarray | None = None,
    ids: Any = "default",
    labels: Any = "default",
    flatten: bool = False,
    channels_last: bool = False,
    datasets: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    id_name: str = "id",
    chunks: bool | tuple[int, ...] | None = None,
) -> Path:
    """Write a HiTS-style HDF5 stamp file and return its path.

    Parameters
    ----------
    n, seed
        Rows and random seed for `make_stamps` (ignored when *stamps* is given).
    layout
        ``"channels"``: one dataset per channel (``temp_images``, ``sci_images``,
        ``diff_images``, ``SNR_images``, each (N, 21, 21) float32); ``"stacked"``: one
        ``stamps`` dataset (N, 4, 21, 21), or (N, 21, 21, 4) with *channels_last*.
    stamps
        Pixels ``(N, 4, H, W)`` to write instead of random ones (any dtype).
    ids, labels
        ``"default"`` (``id`` = 1000 + row, ``labels`` random 0/1), ``None`` (omit) or an array.
    flatten
        Channel datasets as (N, H*W).
    datasets
        Extra or replacement datasets ``{name: array}`` written last (override anything).
    drop
        Dataset names not to write.
    id_name
        Name of the id dataset (``id`` or ``ID``).
    chunks
        Passed to ``h5py.create_dataset`` for the stamp datasets.
    """
    import h5py

    if stamps is None:
        stamps = make_stamps(n, seed)
    n = len(stamps)
    rng = np.random.default_rng(seed + 1)
    data: dict[str, Any] = {}
    if layout == "stacked":
        data["stamps"] = np.moveaxis(stamps, 1, 3) if channels_last else stamps
    elif layout == "channels":
        for i, name in enumerate(HITS_DATASETS):
            ch = stamps[:, i]
            data[name] = ch.reshape(n, ch.shape[1] * ch.shape[2]) if flatten else ch
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if isinstance(ids, str) and ids == "default":
        ids = np.arange(n, dtype=np.int64) + 1000
    if ids is not None:
        data[id_name] = ids
    if isinstance(labels, str) and labels == "default":
        labels = rng.integers(0, 2, n)
    if labels is not None:
        data["labels"] = labels
    data.update(datasets or {})
    with h5py.File(path, "w") as f:
        for name, value in data.items():
            if name in drop:
                continue
            kw = {"chunks": chunks} if chunks is not None and name in (*HITS_DATASETS, "stamps") else {}
            f.create_dataset(name, data=value, **kw)
    return Path(path)


def damage_chunk(path: str | Path, dataset: str, chunk: int, nbytes: int = 200) -> None:
    """Overwrite bytes inside one stored (compressed) chunk of *dataset*: h5py then cannot read its rows."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\xff" * nbytes)


def image_card_dict(size: int = 8, **overrides: Any) -> dict[str, Any]:
    """A valid card for an RGB image classifier taking ``size`` x ``size`` pictures."""
    card = card_dict(
        name="tiny_image",
        task="image-classification",
        input={
            "kind": "image",
            "channels": ["red", "green", "blue"],
            "height": size,
            "width": size,
            "dtype": "float32",
            "layout": "NCHW",
        },
        preprocessing={
            "kind": "image",
            "mode": "RGB",
            "resize": size,
            "crop": size,
            "scale": 1.0 / 255.0,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
        classes=["cat", "dog", "frog"],
        positive_class=None,
    )
    card.update(overrides)
    return card


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HiTS-shaped ONNX model (4x21x21 -> bogus/real) with a valid card, built without torch."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def hits_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-row HiTS-layout file with ids and labels."""
    return write_hits_h5(tmp_path_factory.mktemp("data") / "hits.h5", 16, seed=0)


@pytest.fixture(scope="session")
def tiny_image_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RGB image classifier (3x8x8 -> cat/dog/frog) with a valid card."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny_image.onnx", image_card_dict())
