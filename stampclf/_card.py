"""The model card: one JSON document inside the ONNX file's ``metadata_props``.

The card is the single source of truth for everything the runtime needs to know
about a model: class names, channel order, stamp size, preprocessing, decision
threshold, metrics and provenance. The runtime hard-codes none of them.

The ONNX file is read with a minimal protobuf wire-format reader so that the
card (and the sha256 of the weights) can be read without the ``onnx`` package
and without creating an inference session.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InputError, ModelError, open_failure

__all__ = [
    "CARD_KEY",
    "CARD_SCHEMA",
    "ModelCard",
    "resolve_threshold",
    "valid_class_name",
    "graph_sha256",
    "read_card",
    "read_onnx_parts",
]

#: Key of the card in the ONNX ``metadata_props``.
CARD_KEY = "stampclf.card"
#: Version of the card format; bumped on incompatible changes.
CARD_SCHEMA = 1

_GRAPH_FIELD = 7  # ModelProto.graph
_METADATA_FIELD = 14  # ModelProto.metadata_props


@dataclass(frozen=True)
class ModelCard:
    """Everything about a model that the runtime and its users need.

    Attributes mirror the JSON keys: ``name``, ``version``, ``task``, ``description``,
    ``input`` (channels, height, width, dataset names, default batch size),
    ``preprocessing``, ``classes``, ``positive_class``, ``threshold``,
    ``operating_points`` (e.g. ``fpr_1pct``: threshold and validation rates),
    ``calibration``, ``metrics`` (test figures), ``training`` (command, seed, data
    provenance), ``report``, ``versions``, ``date``, ``weights_sha256``. The format is
    described in the repository's ``docs/model-card.md``.
    """

    name: str
    version: str
    task: str
    input: dict[str, Any]
    preprocessing: dict[str, Any]
    classes: list[str]
    threshold: float
    training: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    date: str
    weights_sha256: str
    schema: int = CARD_SCHEMA
    positive_class: str | None = None
    description: str = ""
    operating_points: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    # --- derived views -------------------------------------------------------
    @property
    def is_binary(self) -> bool:
        """A positive class and a threshold decide the label (else: the most probable class)."""
        return len(self.classes) == 2 and self.positive_class is not None

    @property
    def channels(self) -> list[str]:
        """Channel names in the order the model expects them."""
        return list(self.input["channels"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one input."""
        return (len(self.input["channels"]), int(self.input["height"]), int(self.input["width"]))

    @property
    def kind(self) -> str:
        """``"stamp"`` (arrays of pixels) or ``"image"`` (picture files)."""
        return str(self.input.get("kind", "stamp"))

    # --- JSON ----------------------------------------------------------------
    def to_json(self) -> str:
        """Serialise to the JSON stored in the ONNX file."""
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """The card as a plain dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "card") -> ModelCard:
        """Validate a decoded card and build it; raise `ModelError` naming what is wrong."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: model card is not a JSON object")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ModelError(f"{source}: model card is missing field(s): {', '.join(missing)}")
        schema = data.get("schema", CARD_SCHEMA)
        if schema != CARD_SCHEMA:
            raise ModelError(
                f"{source}: model card schema {schema!r} is not supported (expected {CARD_SCHEMA})"
            )
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        card = cls(**kwargs)
        card._validate(source)
        return card

    @classmethod
    def from_json(cls, text: str, source: str = "card") -> ModelCard:
        """Decode with `json.loads` and validate."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source}: model card is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, source)

    def _validate(self, source: str) -> None:
        def bad(what: str) -> ModelError:
            return ModelError(f"{source}: invalid model card: {what}")

        if not isinstance(self.name, str) or not self.name:
            raise bad(f"name {self.name!r}")
        if not isinstance(self.classes, list) or len(self.classes) < 2:
            raise bad(f"classes {self.classes!r} (need a list of at least two names)")
        if len(set(self.classes)) != len(self.classes):
            raise bad(f"duplicate class names in {self.classes!r}")
        for c in self.classes:
            if not valid_class_name(c):
                raise bad(f"class name {c!r} (need a non-empty string without '/' or surrounding spaces)")
        inp = self.input
        if not isinstance(inp, dict):
            raise bad("input is not an object")
        for key in ("channels", "height", "width", "dtype", "layout"):
            if key not in inp:
                raise bad(f"input.{key} missing")
        if not isinstance(inp["channels"], list) or not inp["channels"]:
            raise bad(f"input.channels {inp['channels']!r}")
        for key in ("height", "width"):
            if not isinstance(inp[key], int) or inp[key] < 1:
                raise bad(f"input.{key} {inp[key]!r}")
        if inp["layout"] != "NCHW":
            raise bad(f"input.layout {inp['layout']!r} (only NCHW is supported)")
        if inp["dtype"] != "float32":
            raise bad(f"input.dtype {inp['dtype']!r} (only float32 is supported)")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise bad(f"threshold {self.threshold!r} (must be in [0, 1])")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise bad(f"positive_class {self.positive_class!r} is not one of {self.classes}")
        if not isinstance(self.preprocessing, dict) or "kind" not in self.preprocessing:
            raise bad("preprocessing.kind missing")
        for key in ("command", "seed", "data"):
            if key not in self.training:
                raise bad(f"training.{key} missing")
        if not isinstance(self.weights_sha256, str) or len(self.weights_sha256) != 64:
            raise bad(f"weights_sha256 {self.weights_sha256!r}")


_REQUIRED = (
    "name",
    "version",
    "task",
    "input",
    "preprocessing",
    "classes",
    "threshold",
    "training",
    "metrics",
    "versions",
    "date",
    "weights_sha256",
)


# --- protobuf wire format ------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Top-level fields of a protobuf message as ``(number, wire_type, value)``.

    Length-delimited values are returned as ``memoryview`` slices (no copy).
    """
    view = memoryview(buf)
    out: list[tuple[int, int, Any]] = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = view[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = view[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = view[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        out.append((number, wire, value))
    return out


def read_onnx_parts(data: bytes, source: str = "model") -> tuple[bytes, dict[str, str]]:
    """Split serialised ONNX bytes into the graph bytes and the metadata map.

    Raises
    ------
    ModelError
        If *data* is not a parseable ONNX ModelProto with a graph.
    """
    try:
        fields = _fields(data)
        graph = [v for n, w, v in fields if n == _GRAPH_FIELD and w == 2]
        meta: dict[str, str] = {}
        for n, w, v in fields:
            if n == _METADATA_FIELD and w == 2:
                entry = {k: bytes(val).decode("utf-8") for k, wt, val in _fields(bytes(v)) if wt == 2}
                meta[entry.get(1, "")] = entry.get(2, "")
    except (ValueError, UnicodeDecodeError) as exc:
        hint = ""
        if data[:2] == b"PK" or data[:1] == b"\x80":  # a zip or pickle: what torch.save writes
            hint = "; a PyTorch checkpoint? export it first: python train/export.py --checkpoint FILE"
        raise ModelError(f"{source}: not an ONNX model ({exc}){hint}") from None
    if len(graph) != 1:
        raise ModelError(f"{source}: not an ONNX model (no graph found)")
    return bytes(graph[0]), meta


def graph_sha256(graph_bytes: bytes) -> str:
    """sha256 of the serialised graph (structure and weights), the card's ``weights_sha256``."""
    return hashlib.sha256(graph_bytes).hexdigest()


def read_card(path: str | Path, verify: bool = True) -> tuple[ModelCard, bytes]:
    """Read and validate the card of an ONNX file.

    Parameters
    ----------
    path
        ONNX file, or the name of a shipped model (as ``stampclf info`` takes).
    verify
        Check that the card's ``weights_sha256`` matches the graph in the file.

    Returns
    -------
    card, model_bytes
        The card and the whole file, ready to hand to ONNX Runtime.
    """
    if not Path(path).exists() and isinstance(path, str):
        from ._registry import resolve_model  # a name: "hits"

        path = resolve_model(path)
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise (open_failure(path, exc, "model file", ModelError) or ModelError(f"{path}: cannot read: {exc}")) from None
    graph, meta = read_onnx_parts(data, str(path))
    if CARD_KEY not in meta:
        raise ModelError(f"{path}: ONNX file has no stampclf model card (metadata key {CARD_KEY!r})")
    card = ModelCard.from_json(meta[CARD_KEY], str(path))
    if verify:
        digest = graph_sha256(graph)
        if digest != card.weights_sha256:
            raise ModelError(
                f"{path}: weights sha256 {digest[:12]}… does not match the card's "
                f"{card.weights_sha256[:12]}… (file modified or corrupt)"
            )
    return card, data


def valid_class_name(name: Any) -> bool:
    """A class name a card can hold: it becomes an output column ``p_<class>`` and an HDF5 dataset name."""
    return isinstance(name, str) and bool(name) and "/" not in name and name == name.strip()


def resolve_threshold(card: ModelCard | None, threshold: float | str | None) -> float | None:
    """The decision threshold *threshold* stands for; None stays None (the card's).

    A number in [0, 1], or the name of one of the card's operating points (e.g.
    ``"fpr_1pct"``: the threshold for 1 % false positives on the validation split).
    Without a *card* a name is left for later (None).

    Raises
    ------
    InputError
        For anything else, NaN included, or a *card* whose labels no threshold decides.
    """
    if threshold is None:
        return None
    if isinstance(threshold, str):
        try:
            value = float(threshold)
        except ValueError:
            if card is None:
                return None  # a name: resolved once the card is read
            points = card.operating_points or {}
            if threshold not in points or not isinstance(points[threshold], dict) or "threshold" not in points[threshold]:
                raise InputError(
                    f"threshold {threshold!r} is neither a number in [0, 1] nor an operating point of model "
                    f"{card.name!r} ({', '.join(points) or 'it has none'})"
                ) from None
            value = float(points[threshold]["threshold"])
    elif isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):  # numpy's too
        raise InputError(f"threshold {threshold!r} is not a number in [0, 1]")
    else:
        value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"threshold {threshold} is not a number in [0, 1]")
    if card is not None and not card.is_binary:
        why = (
            "its card names no positive class, so its labels are the most probable class"
            if len(card.classes) == 2
            else f"it has {len(card.classes)} classes; labels are the most probable class"
        )
        raise InputError(
            f"threshold {threshold}: model {card.name!r} takes no threshold ({why}); "
            "a threshold applies to binary models with a positive_class"
        )
    return value
