"""Building blocks shared by several models."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Rot4", "conv_bn_act"]


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + activation, 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), act())


class Rot4(nn.Module):
    """Run *features* on a stamp and its 90/180/270 degree rotations with shared weights.

    The four feature vectors are joined either by concatenation (Deep-HiTS,
    ``join="concat"``, cyclic order) or by mean (``join="mean"``, exactly rotation
    invariant). The rotations happen inside the graph, so they are exported to ONNX.
    """

    def __init__(self, features: nn.Module, join: str = "concat") -> None:
        super().__init__()
        if join not in ("concat", "mean"):
            raise ValueError(f"join must be 'concat' or 'mean', got {join!r}")
        self.features = features
        self.join = join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        views = torch.cat([x, torch.rot90(x, 1, (2, 3)), torch.rot90(x, 2, (2, 3)), torch.rot90(x, 3, (2, 3))], 0)
        f = self.features(views).flatten(1)  # (4n, F)
        f = f.reshape(4, n, -1)
        if self.join == "mean":
            return f.mean(0)
        return f.permute(1, 0, 2).reshape(n, -1)
