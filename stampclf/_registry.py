"""Where shipped models live and how a model name or path resolves to a file."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

from ._errors import ModelError

__all__ = ["model_dirs", "list_models", "resolve_model", "shadowing_notice", "missing_model_dirs", "MODELS_ENV"]

#: Extra folders of ``<name>.onnx`` files, searched first (``os.pathsep``-separated).
MODELS_ENV = "STAMPCLF_MODELS"


def _shipped_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    # inside an installed wheel; a source checkout / editable install
    return [here / "_exported", here.parent / "exported"]


def model_dirs() -> list[Path]:
    """Folders searched for shipped models, in order."""
    dirs = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    return [d for d in (*dirs, *_shipped_dirs()) if d.is_dir()]


def missing_model_dirs() -> list[str]:
    """Entries of `MODELS_ENV` that are no folder (a typo would otherwise hide its models without a word)."""
    return [p for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p and not os.path.isdir(p)]


def list_models() -> list[str]:
    """Names of the shipped models (``stampclf.Classifier(name)`` accepts them)."""
    names: set[str] = set()
    for d in model_dirs():
        names.update(p.stem for p in d.glob("*.onnx"))
    return sorted(names)


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A shipped model name or a path to an ``.onnx`` file, as a path.

    Raises
    ------
    ModelError
        If *model* is neither; the message lists the shipped models.
    """
    text = os.fspath(model)
    if text.endswith(".onnx") or os.sep in text or (os.altsep and os.altsep in text):
        path = Path(text)
        if not path.exists():
            raise ModelError(f"{text}: model file does not exist")
        return path
    for d in model_dirs():
        candidate = d / f"{text}.onnx"
        if candidate.is_file():
            return candidate
    known = ", ".join(list_models()) or "none found"
    missing = missing_model_dirs()
    note = f"; ${MODELS_ENV} names no folder {', '.join(missing)}" if missing else ""
    raise ModelError(f"unknown model {text!r}; models: {known} (or give a path to an .onnx file){note}")


def shadowing_notice(model: str | os.PathLike[str], path: Path) -> str | None:
    """One line when the name *model* resolved to *path* in `MODELS_ENV` over a shipped model of that name."""
    text = os.fspath(model)
    if text.endswith(".onnx") or os.sep in text:
        return None  # a path: the user named the file
    shipped = [d / f"{text}.onnx" for d in _shipped_dirs()]
    others = [p for p in shipped if p.is_file() and not filecmp.cmp(p, path, shallow=False)]
    if not others:
        return None
    return f"model {text!r} is {path} (from ${MODELS_ENV}), not the shipped {others[0]}"
