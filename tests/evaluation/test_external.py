"""Inception and LPIPS metrics offline: skipped with a reason without local weights, never downloaded
(moved from tests/test_evaluation.py)."""

from __future__ import annotations

import socket

import pytest
import torch

from celldiff.evaluation.external import inception_metrics, lpips_distances, lpips_network


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_inception_metrics_without_weights_are_skipped_with_a_reason(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights there
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    metrics, reason = inception_metrics(images, images, None)
    assert metrics is None and "skipped" in reason and "weights" in reason
    metrics, reason = inception_metrics(images, images, str(tmp_path / "missing.pth"))
    assert metrics is None and "missing.pth" in reason and "does not exist" in reason


def test_inception_metrics_without_torch_fidelity_are_skipped(tmp_path, no_network):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not used")
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    metrics, reason = inception_metrics(images, images, str(weights))
    assert metrics is None and "torch-fidelity" in reason


def test_lpips_without_weights_is_skipped_with_a_reason(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    net, reason = lpips_network(None)
    assert net is None and "LPIPS skipped" in reason and "alexnet-owt" in reason
    net, reason = lpips_network(str(tmp_path / "missing.pth"))
    assert net is None and "missing.pth" in reason
    (tmp_path / "foreign.pth").write_bytes(b"not a state dict")
    net, reason = lpips_network(str(tmp_path / "foreign.pth"))
    assert net is None and "not torchvision AlexNet weights" in reason


def test_lpips_with_local_alexnet_weights(tmp_path, no_network):
    """Any AlexNet state dict on disk builds the network offline (here random weights: only the plumbing)."""
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    net, reason = lpips_network(str(weights))
    assert reason is None
    a = torch.rand(3, 3, 32, 32) * 2 - 1
    b = (a + 0.5 * torch.randn_like(a)).clamp(-1, 1)
    same, different = lpips_distances(net, a, a), lpips_distances(net, a, b)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert (different > same).all()
