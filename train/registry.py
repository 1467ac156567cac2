"""The model registry: ``@register_model`` builders, one ``create_model`` door.

Each registered model carries a frozen `ModelSpec`: everything its card needs
that does not come from training (task, classes, input, preprocessing) and the
training recipe. Tests parametrize over `list_models()`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from stampclf._card import valid_class_name

__all__ = ["ModelSpec", "register_model", "create_model", "get_spec", "list_models", "with_classes", "with_size"]

#: ``--set size=N`` bounds, in pixels: below 16 four stride-2 stages leave nothing; above
#: 1024 one image's activations alone run to gigabytes
SIZE_RANGE = (16, 1024)


@dataclass(frozen=True)
class ModelSpec:
    """Static description of a registered model.

    Attributes
    ----------
    name
        Registry and shipped-file name (``exported/<name>.onnx``).
    builder
        Returns a fresh, untrained ``nn.Module`` mapping ``(N, C, H, W)`` to logits; a
        model whose classes come from the data takes their number.
    task
        e.g. ``"real-bogus"``, ``"image-classification"``.
    classes
        Class names in logit order; empty for a model that takes them from its training
        data (e.g. ``image-folder``: the folder names), see `with_classes`.
    input
        The card's ``input`` section (channels, height, width, kind, ...).
    preprocessing
        The card's ``preprocessing`` section, applied by ``stampclf.preprocess``.
    dataset
        Key of the data loader in ``train.data`` (e.g. ``"hits_sim"``).
    recipe
        Training defaults: epochs, batch_size, lr, weight_decay, ... (CLI can override).
    positive_class
        For binary tasks, the class the threshold applies to.
    version
        Model version written to the card.
    description
        One paragraph for the card and the README.
    """

    name: str
    builder: Callable[..., nn.Module]
    task: str
    classes: tuple[str, ...]
    input: dict[str, Any]
    preprocessing: dict[str, Any]
    dataset: str
    recipe: dict[str, Any] = field(default_factory=dict)
    positive_class: str | None = None
    version: str = "1.0.0"
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, **spec: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under *name* with its `ModelSpec` fields.

    Raises
    ------
    ValueError
        If *name* is already registered.
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name=name, builder=builder, **spec)
        return builder

    return wrap


def _load_all() -> None:
    from . import models  # noqa: F401 - importing registers the builders


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of *name*; ``KeyError`` lists the registered names."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, n_classes: int | None = None) -> nn.Module:
    """A fresh, untrained instance of model *name*.

    *n_classes*: for a model that takes its classes from the data (required there);
    a registered model with its own classes checks that it matches.
    """
    spec = get_spec(name)
    if spec.classes:
        if n_classes is not None and n_classes != len(spec.classes):
            raise ValueError(f"model {name!r} has {len(spec.classes)} classes, not {n_classes}")
        return spec.builder()
    if n_classes is None or n_classes < 2:
        raise ValueError(f"model {name!r} takes its classes from the data: give their number (at least 2)")
    return spec.builder(n_classes)


def with_size(spec: ModelSpec, size: Any) -> ModelSpec:
    """*spec* taking *size* x *size* images (``--set size=N``); unchanged for ``None``.

    For image models that resize and centre-crop to a square (``image-folder``): the
    card's input size, the resize and crop, and the sentences that state them change
    together, so the card says what the graph takes.
    """
    if size is None:
        return spec
    lo, hi = SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise ValueError(f"--set size={size!r}: expected a whole number of pixels from {lo} to {hi}")
    inp, prep = spec.input, spec.preprocessing
    old = inp.get("height")
    if inp.get("kind") != "image" or inp.get("width") != old or prep.get("resize") != old or prep.get("crop") != old:
        raise ValueError(f"model {spec.name!r} does not take --set size (its input is not a resized square image)")

    def restate(text: Any) -> Any:  # "96 px" and "96x96" state the size; "96 filters" does not
        if not isinstance(text, str):
            return text
        text = re.sub(rf"\b{old}x{old}\b", f"{size}x{size}", text)
        return re.sub(rf"\b{old} px\b", f"{size} px", text)

    return replace(
        spec,
        input={**inp, "height": size, "width": size, "note": restate(inp.get("note"))},
        preprocessing={**prep, "resize": size, "crop": size, "doc": restate(prep.get("doc"))},
        description=restate(spec.description),
    )


def with_classes(spec: ModelSpec, classes: Sequence[str] | None) -> ModelSpec:
    """*spec* with the classes its training data named, for a model registered without classes."""
    if spec.classes:
        return spec
    if not classes or len(classes) < 2:
        raise ValueError(f"model {spec.name!r} takes its classes from the data, which name {list(classes or [])}; "
                         "it needs at least two")
    bad = [c for c in classes if not valid_class_name(str(c))]
    if bad:  # the card would refuse them at export, after the training
        raise ValueError(f"class name {bad[0]!r} (a folder name?) cannot be a model's class: no surrounding spaces")
    return replace(spec, classes=tuple(str(c) for c in classes))
