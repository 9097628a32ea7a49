"""The cell classifier's network: shapes, probabilities, and the key layout of checkpoints before the redesign."""

from __future__ import annotations

import pytest
import torch

from celldiff.nets.classifier import NETWORK_PARTS, CellResNet, nest_flat_keys


def test_network_shapes_and_probabilities():
    net = CellResNet(num_classes=5, width=4, feature_dim=24).eval()
    for size in (16, 32):
        x = torch.rand(3, 3, size, size) * 2 - 1
        assert net(x).shape == (3, 5) and net.features(x).shape == (3, 24)
        probs = net.predict_proba(x)
        assert torch.allclose(probs.sum(1), torch.ones(3)) and (probs >= 0).all()
    assert {name for name, _ in net.named_children()} == set(NETWORK_PARTS)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        CellResNet(num_classes=1)


def test_nest_flat_keys_moves_only_the_networks_keys():
    flat = {"stem.0.weight": 1, "stages.0.0.conv1.weight": 2, "head.bias": 3, "val_acc.tp": 4, "net.head.weight": 5}
    nest_flat_keys(flat)
    assert flat == {"net.stem.0.weight": 1, "net.stages.0.0.conv1.weight": 2, "net.head.bias": 3, "val_acc.tp": 4,
                    "net.head.weight": 5}  # fmt: skip
    inner = {"judge.stem.0.weight": 1, "stem.0.weight": 2}
    nest_flat_keys(inner, prefix="judge.")
    assert inner == {"judge.net.stem.0.weight": 1, "stem.0.weight": 2}
