"""HiTS real/bogus models: 21x21 stamps, 4 channels (template, science, difference, SNR-difference).

All models share the data (``hits_sim``), the preprocessing (the runtime's
``robust_asinh``) and the recipe, so `docs/hits-models.md` compares architectures only:

``hits``
    The shipped model: a small rotation-invariant CNN (Deep-HiTS idea, ~30x cheaper).
``hits-tiny``
    The same design at half the width: the fastest rotation-invariant variant.
``hits-fullres``
    ``hits`` with a full-resolution (stride 1) first layer: the speed/accuracy check of
    the stride-2 stem.
``hits-deep``
    Deep-HiTS (Cabrera-Vives+2017) as published: 32,32,64,64,64 filters, ~160 MFLOP/stamp.
``hits-seed-pytorch``, ``hits-seed-keras``
    The two seed baselines (no rotation invariance).

Rotation-invariant models run the stamp and its 90/180/270 degree rotations through
shared convolutions (`Rot4`, inside the graph, so it is exported to ONNX). ``hits``,
``hits-tiny`` and ``hits-fullres`` join the four feature vectors by their mean: the output is then exactly
invariant to 90 degree rotations (so is ``hits-fullres``). ``hits-deep`` concatenates them as Deep-HiTS does:
the dense layer sees the four views in cyclic order, so a rotated stamp permutes its
input blocks and the output is only approximately invariant (learned, not built in).
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from ..registry import register_model
from ._layers import Rot4, conv_bn_act

__all__ = ["HITS_INPUT", "HITS_PREPROCESSING", "HITS_CLASSES", "HITS_RECIPE"]

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

#: One recipe for every HiTS model (same data, same knobs). ``snr_derived`` is the
#: fraction of training stamps whose SNR channel is replaced by the difference channel
#: (what an alert stream without a noise map gives, see `train.data.hits`).
HITS_RECIPE = {
    "epochs": 8,
    "batch_size": 512,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,
    "n_train": 500_000,
    "n_val": 20_000,
    "n_test": 100_000,
    "snr_derived": 0.25,
}


def _hits_spec(description: str, **recipe: object) -> dict[str, object]:
    return dict(
        # 1.1.0: trained on simulator 1.1.0 (docs/hits-simulation.md, "Versions")
        version="1.1.0",
        task="real-bogus",
        classes=HITS_CLASSES,
        positive_class="real",
        input=HITS_INPUT,
        preprocessing=HITS_PREPROCESSING,
        dataset="hits_sim",
        recipe={**HITS_RECIPE, **recipe},
        description=description,
    )


def _rot_net(widths: tuple[int, int, int], dense: int, stem_stride: int) -> nn.Sequential:
    """Rotation-invariant CNN: three conv-BN-LeakyReLU layers, mean over the 4 views, dense, 2 logits.

    ``stem_stride=2``: the first 3x3 convolution has stride 2 (21 -> 10; the kernel still
    covers every pixel), then 3x3 'same', max-pool (-> 5) and 2x2 (-> 4).
    ``stem_stride=1``: 3x3 'same' at full resolution, max-pool (-> 10), 3x3 'same',
    max-pool (-> 5), 3x3 'valid' (-> 3). On CPU the full-resolution first layer (4 input
    channels, 441 positions, four views) costs most of the time.
    """
    a, b, c = widths
    act = partial(nn.LeakyReLU, 0.1)
    if stem_stride == 2:
        layers: list[nn.Module] = [
            nn.Conv2d(4, a, 3, stride=2, bias=False), nn.BatchNorm2d(a), act(),  # 21 -> 10
            conv_bn_act(a, b, 3, act=act),
            nn.MaxPool2d(2),  # 10 -> 5
            nn.Conv2d(b, c, 2, bias=False), nn.BatchNorm2d(c), act(),  # 5 -> 4
        ]
        side = 4
    else:
        layers = [
            conv_bn_act(4, a, 3, act=act),
            nn.MaxPool2d(2),  # 21 -> 10
            conv_bn_act(a, b, 3, act=act),
            nn.MaxPool2d(2),  # 10 -> 5
            nn.Conv2d(b, c, 3, bias=False), nn.BatchNorm2d(c), act(),  # 5 -> 3
        ]
        side = 3
    return nn.Sequential(
        Rot4(nn.Sequential(*layers, nn.Flatten()), join="mean"),
        nn.Linear(c * side * side, dense), act(), nn.Dropout(0.3),
        nn.Linear(dense, 2),
    )


@register_model(
    "hits",
    **_hits_spec(
        "Rotation-invariant CNN for HiTS real/bogus (after Deep-HiTS, Cabrera-Vives+2017, ~30x cheaper): "
        "the stamp and its 90/180/270 degree rotations go through shared convolutions (16 filters 3x3 "
        "stride 2, 32 3x3, max-pool, 64 2x2; batch norm, leaky ReLU); the four feature vectors are "
        "averaged, so the output is exactly invariant to 90 degree rotations; then dense 64, dropout 0.3 "
        "and a 2-way softmax with temperature-scaled probabilities."
    ),
)
def hits() -> nn.Module:
    """Default HiTS model (see the registry description)."""
    return _rot_net((16, 32, 64), 64, stem_stride=2)


@register_model(
    "hits-tiny",
    **_hits_spec(
        "Half-width `hits`: rotation-invariant CNN (8 filters 3x3 stride 2, 16 3x3, max-pool, 32 2x2; "
        "mean over the four rotations), dense 32, dropout 0.3; the fastest rotation-invariant HiTS model."
    ),
)
def hits_tiny() -> nn.Module:
    """Half-width `hits`."""
    return _rot_net((8, 16, 32), 32, stem_stride=2)


@register_model(
    "hits-fullres",
    **_hits_spec(
        "`hits` with a full-resolution first layer: rotation-invariant CNN (16, 32, 64 filters 3x3, "
        "max-pool after the first two; batch norm, leaky ReLU; mean over the four rotations), dense 64, "
        "dropout 0.3. About 1.5x slower than `hits` on CPU."
    ),
)
def hits_fullres() -> nn.Module:
    """`hits` without the stride-2 stem."""
    return _rot_net((16, 32, 64), 64, stem_stride=1)


@register_model(
    "hits-deep",
    **_hits_spec(
        "Deep-HiTS (Cabrera-Vives+2017) as published: the stamp and its 90/180/270 degree rotations go "
        "through shared convolutions (32 filters 4x4, 32 3x3, max-pool, 64, 64, 64 3x3, max-pool; zero "
        "padding; leaky ReLU), the four feature vectors are concatenated, then dense 64, 64 with dropout "
        "0.5 and a 2-way softmax. About 160 MFLOP per stamp."
    ),
)
def hits_deep() -> nn.Module:
    """Deep-HiTS architecture (concat join, no batch norm)."""
    act = partial(nn.LeakyReLU, 0.01)
    features = nn.Sequential(
        nn.ZeroPad2d(3), nn.Conv2d(4, 32, 4), act(),  # 21 -> 27 -> 24
        nn.Conv2d(32, 32, 3, padding=1), act(),
        nn.MaxPool2d(2),  # 24 -> 12
        nn.Conv2d(32, 64, 3, padding=1), act(),
        nn.Conv2d(64, 64, 3, padding=1), act(),
        nn.Conv2d(64, 64, 3, padding=1), act(),
        nn.MaxPool2d(2),  # 12 -> 6
        nn.Flatten(),
    )
    return nn.Sequential(
        Rot4(features, join="concat"),
        nn.Linear(4 * 64 * 36, 64), act(), nn.Dropout(0.5),
        nn.Linear(64, 64), act(), nn.Dropout(0.5),
        nn.Linear(64, 2),
    )


@register_model(
    "hits-seed-pytorch",
    **_hits_spec(
        "Seed baseline (PyTorch): conv 32 filters 3x3, ReLU, max-pool 2, dropout 0.5, dense 90, ReLU, "
        "dense 2. Not rotation invariant (rotations and mirrors only as training augmentation)."
    ),
)
def hits_seed_pytorch() -> nn.Module:
    """The small seed PyTorch net."""
    return nn.Sequential(
        nn.Conv2d(4, 32, 3), nn.ReLU(),  # 21 -> 19
        nn.MaxPool2d(2),  # 19 -> 9
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(32 * 9 * 9, 90), nn.ReLU(),
        nn.Linear(90, 2),
    )


@register_model(
    "hits-seed-keras",
    **_hits_spec(
        "Seed baseline (Keras stack): conv 4 filters 1x1, then pairs of 2x2 convolutions with 8, 16 and "
        "32 filters ('valid' padding, ReLU) with a max-pool after the first two pairs, dense 16 and 8 "
        "with dropout 0.2, 2-way softmax. Not rotation invariant."
    ),
)
def hits_seed_keras() -> nn.Module:
    """The seed Keras stack, in PyTorch."""
    r = nn.ReLU
    return nn.Sequential(
        nn.Conv2d(4, 4, 1), r(),
        nn.Conv2d(4, 8, 2), r(), nn.Conv2d(8, 8, 2), r(),  # 21 -> 19
        nn.MaxPool2d(2),  # 19 -> 9
        nn.Conv2d(8, 16, 2), r(), nn.Conv2d(16, 16, 2), r(),  # 9 -> 7
        nn.MaxPool2d(2),  # 7 -> 3
        nn.Conv2d(16, 32, 2), r(), nn.Conv2d(32, 32, 2), r(),  # 3 -> 1
        nn.Flatten(),
        nn.Linear(32, 16), r(), nn.Dropout(0.2),
        nn.Linear(16, 8), r(), nn.Dropout(0.2),
        nn.Linear(8, 2),
    )
