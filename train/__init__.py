"""Training side of stampclf (PyTorch): registry, models, data, train, export.

``train`` imports ``stampclf`` (card, preprocessing, metrics) so that training
and deployment share one implementation; ``stampclf`` never imports ``train``.
"""

import importlib.util
import sys

#: what the training side imports beyond the runtime's requirements (the ``train`` extra)
_EXTRA = ("torch", "onnx", "onnxscript", "matplotlib")


def require_training_extra(prog: str) -> None:
    """Exit with one line naming what is missing, instead of an import traceback, when the ``train`` extra is not installed."""
    missing = [m for m in _EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{prog}: error: needs {', '.join(missing)} (the training extra): "
                 "pip install torch==2.13.0 && pip install -e '.[train]'")
