"""The judge: classifier reports and features, how it sees cells, and loading it from a checkpoint
without Lightning (moved from tests/test_evaluation.py; the loader tests are new)."""

from __future__ import annotations

import json

import pytest
import torch

from celldiff.evaluation.judge import (
    CLASSIFIER_CLASS_PATH,
    DIFFUSION_CLASS_PATH,
    CheckpointKindError,
    canonical_class_path,
    checkpoint_class_path,
    classifier_report,
    describe_kind,
    extract_features,
    judge_view,
    load_judge,
    predicted_classes,
)
from celldiff.nets.classifier import CellResNet
from celldiff.training.classifier import CellClassifier
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "pre_redesign"


# ----------------------------------------------------------------------------------- classifier-based


class _FixedClassifier(torch.nn.Module):
    """Predicts the class written in the first pixel (a known answer for classifier_report)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        return torch.nn.functional.one_hot(cls, 3).float() * 10 * self.scale


def test_classifier_report_counts_requested_against_predicted():
    predicted = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    requested = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = predicted.to(torch.uint8)
    report = classifier_report(_FixedClassifier(), images, requested, ["a", "b", "c"], batch_size=3)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert report["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "c": 0.5}
    assert report["per_class_count"] == {"a": 3, "b": 3, "c": 2}
    assert report["accuracy"] == pytest.approx(5 / 8) and report["num_samples"] == 8


@pytest.mark.parametrize("build", [lambda: CellResNet(num_classes=8, width=4, feature_dim=12),
                                   lambda: CellClassifier(image_size=16, num_classes=8, width=4, feature_dim=12)],
                         ids=["network", "lightning-module"])  # fmt: skip
def test_extract_features_eval_mode_and_restores_training(build):
    model = build()
    model.train()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    feats = extract_features(model, images, batch_size=2)
    assert feats.shape == (5, 12) and not feats.requires_grad
    assert model.training  # restored
    # Eval mode (BatchNorm running statistics): features do not depend on the batch.
    single = extract_features(model, images[:1])
    assert torch.allclose(single, feats[:1], atol=1e-6)
    assert torch.allclose(extract_features(model, images.float() / 127.5 - 1), feats, atol=1e-6)


def test_judge_view_downsamples_like_the_classifier_training_images():
    """Same size: only the [-1, 1] scaling; smaller: antialiased, so a flat colour stays exactly flat."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    same = judge_view(images, 32)
    assert torch.equal(same, images.float() / 127.5 - 1)
    flat = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    small = judge_view(flat, 16)
    assert small.shape == (1, 3, 16, 16)
    torch.testing.assert_close(small, torch.full_like(small, 200 / 127.5 - 1))
    # a one-pixel checkerboard averages to grey (no aliasing), unlike plain subsampling
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8).expand(1, 3, 32, 32)
    assert judge_view(checker, 16)[..., 2:-2, 2:-2].abs().max() < 0.1


def test_predicted_classes_batches_on_the_judges_device():
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([2, 0, 1, 1, 2], dtype=torch.uint8)
    classes = predicted_classes(_FixedClassifier(), images, batch_size=2)
    assert classes.dtype == torch.int64 and classes.tolist() == [2, 0, 1, 1, 2]


# ----------------------------------------------------------------------------------- loading the judge


def test_a_classifier_checkpoint_from_before_the_redesign_loads_as_the_judge():
    """Written by the flat layout (keys stem.*, class_path celldiff.classifier.CellClassifier): same outputs."""
    judge = load_judge(FIXTURES / "classifier.ckpt")
    expected = json.loads((FIXTURES / "classifier_expected.json").read_text())
    x = torch.sin(torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) * 0.37)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    assert judge.hparams.image_size == 16 and judge.hparams.num_classes == 8 and judge.hparams.width == 2
    assert judge.hparams.get("class_names")[0] == "basophil" and isinstance(judge.net, CellResNet)
    torch.testing.assert_close(judge(x), torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(judge.features(x), torch.tensor(expected["features"]), rtol=0, atol=1e-6)


def test_a_new_classifier_checkpoint_loads_as_the_judge(tmp_path):
    torch.manual_seed(0)
    model = CellClassifier(image_size=16, num_classes=3, class_names=["a", "b", "c"], width=4, feature_dim=12).eval()
    assert all(k.startswith("net.") for k in model.state_dict())
    path = tmp_path / "cls.ckpt"
    hparams = {**model.hparams, "_class_path": "celldiff.training.classifier.CellClassifier"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    judge = load_judge(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(judge.features(x), model.features(x)) and torch.equal(judge(x), model(x))
    assert judge.hparams.class_names == ["a", "b", "c"] and judge.hparams.num_classes == 3


def test_checkpoint_kinds_old_and_new(tmp_path):
    for name in ("celldiff.classifier.CellClassifier", "celldiff.training.classifier.CellClassifier"):
        assert canonical_class_path(name) == CLASSIFIER_CLASS_PATH
    for name in ("celldiff.module.DiffusionModule", "celldiff.training.module.DiffusionModule"):
        assert canonical_class_path(name) == DIFFUSION_CLASS_PATH
    assert canonical_class_path("my.Model") == "my.Model" and canonical_class_path(None) is None
    weight = torch.zeros(1)
    assert checkpoint_class_path({"state_dict": {"stem.0.weight": weight, "head.weight": weight}}) == CLASSIFIER_CLASS_PATH
    assert checkpoint_class_path({"state_dict": {"net.stem.0.weight": weight, "net.head.weight": weight}}) == CLASSIFIER_CLASS_PATH
    assert checkpoint_class_path({"state_dict": {"unet.conv.weight": weight}}) == DIFFUSION_CLASS_PATH
    new = {"state_dict": {}, "hyper_parameters": {"_class_path": "celldiff.training.module.DiffusionModule"}}
    assert checkpoint_class_path(new) == DIFFUSION_CLASS_PATH
    assert describe_kind("celldiff.training.classifier.CellClassifier") == "a cell classifier"
    assert describe_kind("celldiff.classifier.CellClassifier") == "a cell classifier" and describe_kind(None) == "an unrecognised"
    torch.save({"state_dict": {"unet.conv.weight": weight}}, tmp_path / "diffusion.ckpt")
    with pytest.raises(CheckpointKindError, match="is a diffusion model checkpoint.*swapped"):
        load_judge(tmp_path / "diffusion.ckpt")
    bad = {"net.stem.0.weight": torch.zeros(1), "net.head.weight": torch.zeros(1)}
    torch.save({"state_dict": bad, "hyper_parameters": {"_class_path": CLASSIFIER_CLASS_PATH}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointKindError, match="do not fit a cell classifier"):
        load_judge(tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointKindError, match="no such checkpoint file"):
        load_judge(tmp_path / "missing.ckpt")
