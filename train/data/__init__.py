"""Training data: a registry of loaders keyed by the `ModelSpec.dataset` name.

Each loader returns a `DataBundle` of torch datasets whose inputs are already
preprocessed with ``stampclf.preprocess`` (the runtime's own implementation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: the numpy-only simulator must not pull torch in
    import torch
    from torch.utils.data import Dataset

__all__ = ["DataBundle", "register_dataset", "load_dataset", "dataset_options", "array_sha256", "stratified_split"]


@dataclass
class DataBundle:
    """Train/validation/test splits plus where they came from.

    ``augment`` (optional) maps a training batch ``(x, y)`` to an augmented one
    and runs inside the training loop.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    provenance: dict[str, Any]
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    extra_tests: dict[str, Dataset] = field(default_factory=dict)
    #: recipe keys these data did not use (e.g. simulated split sizes when files were given):
    #: left out of the run's recorded recipe
    ignored: tuple[str, ...] = ()


_LOADERS: dict[str, Callable[..., DataBundle]] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_dataset(
    name: str, options: Iterable[str] = ()
) -> Callable[[Callable[..., DataBundle]], Callable[..., DataBundle]]:
    """Register a loader ``fn(spec, options: dict, seed: int) -> DataBundle``.

    *options* are the ``--set`` keys the loader reads besides the training recipe's
    (``train/train.py`` refuses any other key).
    """

    def wrap(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        if name in _LOADERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _LOADERS[name] = fn
        _OPTIONS[name] = tuple(options)
        return fn

    return wrap


def _loader(dataset: str) -> Callable[..., DataBundle]:
    from . import hits, images  # noqa: F401 - importing registers the loaders

    if dataset not in _LOADERS:
        raise KeyError(f"no loader for dataset {dataset!r}; known: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[dataset]


def load_dataset(spec: Any, options: dict[str, Any], seed: int) -> DataBundle:
    """Load the data of a registered model's ``spec.dataset``."""
    return _loader(spec.dataset)(spec, options, seed)


def dataset_options(dataset: str) -> tuple[str, ...]:
    """The ``--set`` keys the loader of *dataset* reads (its data options)."""
    _loader(dataset)
    return _OPTIONS[dataset]


def array_sha256(*arrays: np.ndarray) -> str:
    """sha256 over the bytes of *arrays* (data provenance for simulated sets)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Indices of disjoint splits, each with about *fractions* of every class (the rest is the last split).

    Deterministic for a seed: each class is shuffled by its own generator stream.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            if len(idx) >= len(fractions) + 1:
                n = max(n, 1)  # every split sees every class that has enough examples
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]
