"""stampclf: deployable classifiers for astronomical image stamps and images.

The runtime needs only numpy, ONNX Runtime, h5py, Pillow and typer (never torch).
Each model is an ONNX file that carries its own model card.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._card import ModelCard, read_card
from ._dask import classify_dask, predict_dask  # imports Dask only when called
from ._errors import DeviceError, InputError, ModelError, OutputError, StampclfError
from ._registry import list_models
from ._run import RunSummary, classify_files
from .classifier import Classifier, Predictions

__all__ = [
    "Classifier",
    "Predictions",
    "ModelCard",
    "read_card",
    "list_models",
    "classify_files",
    "classify_dask",
    "predict_dask",
    "RunSummary",
    "StampclfError",
    "InputError",
    "OutputError",
    "ModelError",
    "DeviceError",
    "__version__",
]
