"""The cell-type classifier's network: a small ResNet, no Lightning, no training loop.

A ResNet (He et al. 2016, "Deep Residual Learning"; BasicBlocks as in ResNet-18) for 32-64 px RGB
cells in [-1, 1]. Evaluation uses it as the judge of generated cells (``celldiff.evaluation.judge``):

- ``forward`` / ``predict_proba``: does a cell generated as "eosinophil" look like one?
- ``features``: the penultimate ``feature_dim`` activations, a feature space that knows what a blood
  cell is and needs no download, for a Fréchet distance and precision/recall.

``celldiff.training.classifier.CellClassifier`` trains it (under the submodule ``net``).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The network's top-level submodules: a checkpoint from before the redesign holds them at the top
# level of its state dict (``stem.0.weight``), a newer one under ``net.`` (``net.stem.0.weight``).
NETWORK_PARTS = ("stem", "stages", "project", "dropout", "head")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut.

    (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity: stable early training
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class CellResNet(nn.Module):
    """ResNet-style cell-type classifier with a feature space for Fréchet distances.

    Stem 3×3 conv (``width``) → 4 stages of 2 BasicBlocks with widths ``width × (1, 2, 4, 8)``, the
    last three halving the resolution (64 → 8 px, 32 → 4 px) → global average pool → linear + ReLU
    to ``feature_dim`` (the features) → dropout → linear head. Any input size works (the pool is
    global); the judge is used at the size it was trained at.

    Args:
        num_classes: Number of cell classes (at least 2).
        width: Channels of the first stage; the stages have 1, 2, 4, 8 × width.
        feature_dim: Size of the penultimate feature vector (``features``).
        dropout: Dropout before the linear head, in [0, 1).
    """

    def __init__(self, num_classes: int = 8, width: int = 32, feature_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or feature_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"CellResNet needs num_classes >= 2, width >= 1, feature_dim >= 1 and dropout in [0, 1), got "
                f"{num_classes}, {width}, {feature_dim}, {dropout}"
            )
        widths = [width * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for i, out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out)))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.project = nn.Linear(channels, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, S, S) in [-1, 1]."""
        h = self.stages(self.stem(x))
        return F.relu(self.project(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, 3, S, S) in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (B, num_classes); call in eval mode for deterministic output."""
        return self(x).softmax(dim=-1)


def nest_flat_keys(state_dict: MutableMapping[str, Tensor], prefix: str = "", into: str = "net.") -> None:
    """Move a pre-redesign classifier's network keys under ``into``, in place.

    Before the redesign the Lightning module held the network's parts itself (``stem.0.weight``);
    now it holds the network as ``net`` (``net.stem.0.weight``). Keys under ``prefix`` whose first
    part is one of ``NETWORK_PARTS`` are renamed ``prefix + into + rest``; other keys stay as they are.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] in NETWORK_PARTS:
            state_dict[prefix + into + rest] = state_dict.pop(key)
