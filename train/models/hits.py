"""HiTS real/bogus models: 21x21 stamps, 4 channels (template, science, difference, SNR-difference)."""

from __future__ import annotations

import torch.nn as nn

from ..registry import register_model
from ._layers import Rot4

HITS_INPUT = {
    "kind": "stamp",
    "channels": ["template", "science", "difference", "snr_difference"],
    # dataset of each channel in the HiTS HDF5 layout, in channel order
    "hdf5_datasets": ["temp_images", "sci_images", "diff_images", "SNR_images"],
    "height": 21,
    "width": 21,
    "dtype": "float32",
    "layout": "NCHW",
    "units": "any linear pixel unit (ADU, counts, flux): each stamp and channel is scaled by its own noise",
}

HITS_PREPROCESSING = {
    "kind": "stamp",
    "inside_graph": False,
    "size_policy": "crop_or_pad",  # larger stamps centre-cropped, smaller NaN-padded; row flagged
    "nan_policy": {"fill": 0.0, "max_bad_fraction": 0.5, "flag": True},
    "normalisation": {"method": "robust_asinh", "softening": 1.0},
    "doc": "per stamp and channel: asinh((x - median) / (softening * 1.4826 * MAD)); "
    "non-finite pixels -> fill after scaling; more than max_bad_fraction non-finite -> row failed",
}

HITS_CLASSES = ("bogus", "real")

HITS_RECIPE = {"epochs": 12, "batch_size": 512, "lr": 3e-3, "weight_decay": 1e-4, "n_train": 200_000, "n_val": 20_000, "n_test": 100_000}


def _hits_spec(description: str, **recipe: object) -> dict[str, object]:
    return dict(
        task="real-bogus",
        classes=HITS_CLASSES,
        positive_class="real",
        input=HITS_INPUT,
        preprocessing=HITS_PREPROCESSING,
        dataset="hits_sim",
        recipe={**HITS_RECIPE, **recipe},
        description=description,
    )


def _rot_features(widths: tuple[int, int, int]) -> nn.Sequential:
    a, b, c = widths
    act = nn.LeakyReLU(0.1)
    return nn.Sequential(
        nn.Conv2d(4, a, 3, padding=1), act,
        nn.MaxPool2d(2),  # 21 -> 10
        nn.Conv2d(a, b, 3, padding=1), act,
        nn.MaxPool2d(2),  # 10 -> 5
        nn.Conv2d(b, c, 3), act,  # 5 -> 3
    )


@register_model(
    "hits",
    **_hits_spec(
        "Rotation-invariant CNN for HiTS real/bogus (after Deep-HiTS, Cabrera-Vives+2017, but small): "
        "the stamp and its 90/180/270 degree rotations go through shared convolutions "
        "(16, 32, 64 filters, two max-pools), the four feature vectors are concatenated, then dense 64, "
        "dropout 0.3 and a 2-way softmax."
    ),
)
def hits() -> nn.Module:
    """Default HiTS model (see the registry description)."""
    return nn.Sequential(
        Rot4(_rot_features((16, 32, 64)), join="concat"),
        nn.Linear(4 * 64 * 9, 64), nn.LeakyReLU(0.1), nn.Dropout(0.3),
        nn.Linear(64, 2),
    )
