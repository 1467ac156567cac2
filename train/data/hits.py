"""HiTS real/bogus training data: simulated on the fly, or read from HiTS-layout HDF5."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from stampclf.preprocess import prepare_stamps

from . import DataBundle, array_sha256, register_dataset

CHANNEL_KEYS = ("temp_images", "sci_images", "diff_images", "SNR_images")


def stack_channels(d: dict[str, np.ndarray]) -> np.ndarray:
    """HiTS-layout arrays (one per channel, (N, 21, 21) or (N, 441)) to (N, 4, 21, 21)."""
    parts = [np.asarray(d[k], dtype=np.float32) for k in CHANNEL_KEYS]
    return np.stack([p.reshape(len(p), 21, 21) for p in parts], axis=1)


def to_tensors(stamps: np.ndarray, labels: np.ndarray, spec: Any) -> TensorDataset:
    """Preprocess with the runtime's own code and wrap as tensors."""
    x, _status = prepare_stamps(stamps, spec.input, spec.preprocessing, "training data")
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def rot_flip(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 90-degree rotation and mirror of each stamp: real/bogus does not depend on orientation."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, (2, 3))
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x, y


def _read_h5(path: str) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        d = {k: f[k][...] for k in CHANNEL_KEYS}
        labels = f["labels"][...]
    return stack_channels(d), labels


@register_dataset("hits_sim")
def load_hits(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Simulated HiTS candidates (train/val/test from disjoint seeds) or ``data=train.h5,val.h5,test.h5``."""
    recipe = {**spec.recipe, **options}
    if recipe.get("data"):
        paths = str(recipe["data"]).split(",")
        if len(paths) != 3:
            raise ValueError(f"data= needs three HDF5 files train,val,test; got {recipe['data']!r}")
        splits = [_read_h5(p) for p in paths]
        prov: dict[str, Any] = {"source": "HiTS-layout HDF5 files", "files": paths}
    else:
        from .hits_sim import SIM_VERSION, simulate

        sizes = [int(recipe["n_train"]), int(recipe["n_val"]), int(recipe["n_test"])]
        seeds = [seed * 1000 + 1, seed * 1000 + 2, seed * 1000 + 3]  # disjoint streams: test never seen
        splits = []
        for n, s in zip(sizes, seeds):
            d = simulate(n, s)
            splits.append((stack_channels(d), d["labels"]))
        prov = {
            "source": "simulated HiTS candidates (train/data/hits_sim.py), conditions from the real HiTS 2015 "
            "campaign (rodrigcd/HiTS_simulations, MIT)",
            "simulator_version": SIM_VERSION,
            "seeds": {"train": seeds[0], "val": seeds[1], "test": seeds[2]},
            "sizes": {"train": sizes[0], "val": sizes[1], "test": sizes[2]},
        }
    prov["sha256"] = {name: array_sha256(x, y) for name, (x, y) in zip(("train", "val", "test"), splits)}
    train, val, test = (to_tensors(x, y, spec) for x, y in splits)
    return DataBundle(train=train, val=val, test=test, provenance=prov, augment=rot_flip)
