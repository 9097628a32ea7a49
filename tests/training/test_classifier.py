"""The cell classifier: learns cell types from a few real images, trains and loads through the CLI, and loads
checkpoints from before the redesign (moved from tests/test_classifier.py; the last four tests are new)."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch

from celldiff.data import CellDataModule
from celldiff.evaluation.judge import classifier_report, load_judge
from celldiff.training.classifier import CellClassifier
from tests.cli.helpers import run_cli
from tests.conftest import REPO, SAMPLE, SMALL_SAMPLE_SPLIT

CONFIG = str(REPO / "configs" / "demo_classifier.yaml")
FIXTURES = REPO / "tests" / "fixtures" / "pre_redesign"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["celldiff"])


def _split_images(dm: CellDataModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, S, S) and labels of a split, without augmentation."""
    rows = dm.datasets[name].indices
    images = torch.from_numpy(dm.cached.images[rows]).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(dm.cached.labels[rows])


def test_shapes_and_probabilities():
    model = CellClassifier(image_size=32, num_classes=8, width=4, feature_dim=24).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert model(x).shape == (3, 8)
    assert model.features(x).shape == (3, 24)
    probs = model.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(3)) and (probs >= 0).all()
    assert model.class_names == [f"class{i}" for i in range(8)]
    with pytest.raises(ValueError, match="class_names"):
        CellClassifier(num_classes=8, class_names=["a", "b"])


def test_learns_cell_types_from_the_sample(small_sample, tmp_path):
    """80 steps on 51 real training cells (about 6 per class) at 32 px: far above chance (1/8)."""
    L.seed_everything(0, verbose=False)
    dm = CellDataModule(str(small_sample), image_size=32, batch_size=16)
    model = CellClassifier(
        image_size=32, num_classes=8, class_names=dm.class_names, width=8, feature_dim=32, dropout=0.0, lr=3e-3,
        warmup_steps=10,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=80, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=100, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, dm)
    result = trainer.test(model, dm, verbose=False)[0]

    images, labels = _split_images(dm, "train")
    train = classifier_report(model, images, labels, dm.class_names)
    held_out = [_split_images(dm, name) for name in ("val", "test")]
    held = classifier_report(
        model, torch.cat([h[0] for h in held_out]), torch.cat([h[1] for h in held_out]), dm.class_names
    )
    assert train["accuracy"] > 0.6, train
    assert held["accuracy"] > 0.3, held  # 16 unseen cells; chance is 0.125
    # test: overall and per-class accuracy, and the confusion matrix next to the run.
    assert set(result) >= {"test/acc", "test/loss", *(f"test/acc_{c}" for c in dm.class_names)}
    confusion = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert confusion["class_names"] == dm.class_names
    matrix = torch.tensor(confusion["matrix"])
    n_test = len(dm.datasets["test"])
    assert matrix.sum() == n_test and matrix.trace() / n_test == pytest.approx(result["test/acc"])


def test_cli_fit_test_and_load(small_sample, tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["--data.data_dir", str(small_sample), "--data.image_size", "16", "--data.batch_size", "16",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    fit = ["fit", "--config", CONFIG, "--run_dir", str(run_dir), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
           "--model.width", "4", "--model.feature_dim", "16", *tiny]  # fmt: skip
    run_cli(fit, tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]

    model = load_judge(ckpt)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.hparams.class_names == sorted(p.name for p in small_sample.iterdir())
    assert model.hparams.image_size == 16 and model.hparams.width == 4
    assert model.features(torch.zeros(2, 3, 16, 16)).shape == (2, 16)

    # The config says width 16 / feature_dim 128: the checkpoint's architecture wins (CHECKPOINT_ARCH_KEYS).
    test_dir = tmp_path / "test"
    run_cli(["test", "--config", CONFIG, "--ckpt_path", str(ckpt), "--run_dir", str(test_dir), *tiny], tmp_path)
    confusion = json.loads((test_dir / "confusion_matrix.json").read_text())
    test_cells = len(json.loads((run_dir / "split.json").read_text())["test"])
    assert torch.tensor(confusion["matrix"]).sum() == test_cells


def test_the_old_import_path_resolves_with_a_deprecation_warning():
    import celldiff.classifier as old
    from celldiff.evaluation.judge import load_judge as new_loader

    with pytest.warns(DeprecationWarning, match="celldiff.training.classifier.CellClassifier"):
        assert old.CellClassifier is CellClassifier
    with pytest.warns(DeprecationWarning, match="celldiff.evaluation.judge.load_judge"):
        assert old.load_classifier is new_loader


def test_a_checkpoint_from_before_the_redesign_loads_into_the_lightning_module(tmp_path):
    """The flat layout's keys (stem.*, head.*) move under net. on load: same outputs as the judge and as then."""
    ckpt = torch.load(FIXTURES / "classifier.ckpt", weights_only=True)
    assert "stem.0.weight" in ckpt["state_dict"] and ckpt["hyper_parameters"]["_class_path"] == "celldiff.classifier.CellClassifier"
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    model = CellClassifier(**hparams)
    model.load_state_dict(ckpt["state_dict"])  # strict
    model.eval()
    expected = json.loads((FIXTURES / "classifier_expected.json").read_text())
    x = torch.sin(torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) * 0.37)
    torch.testing.assert_close(model(x), torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    assert torch.equal(model.features(x), load_judge(FIXTURES / "classifier.ckpt").features(x))


def test_cli_test_and_resume_from_a_checkpoint_from_before_the_redesign(small_sample, tmp_path):
    """Lightning's own restore path (on_load_checkpoint, load_state_dict, optimizer state) with the old keys."""
    tiny = ["--data.data_dir", str(small_sample), "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip
    old = str(FIXTURES / "classifier.ckpt")
    test_dir = tmp_path / "test"
    run_cli(["test", "--config", CONFIG, "--ckpt_path", old, "--run_dir", str(test_dir), *tiny], tmp_path)
    confusion = json.loads((test_dir / "confusion_matrix.json").read_text())
    assert torch.tensor(confusion["matrix"]).sum() == SMALL_SAMPLE_SPLIT[2]  # every test cell judged
    run = tmp_path / "resume"
    run_cli(["fit", "--config", CONFIG, "--ckpt_path", old, "--run_dir", str(run), "--trainer.max_steps", "3",
             "--trainer.max_epochs", "-1", "--trainer.check_val_every_n_epoch", "1000", *tiny,
             "--data.data_dir", str(SAMPLE)], tmp_path)  # fmt: skip  (the data it was trained on)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3 and all(k.startswith("net.") for k in resumed["state_dict"])
    assert load_judge(run / "checkpoints" / "last.ckpt").hparams.width == 2


def test_optimiser_is_adamw_with_warmup_and_no_decay_on_norms_and_biases():
    model = CellClassifier(image_size=16, num_classes=3, width=2, feature_dim=4, lr=0.01, weight_decay=0.1, warmup_steps=4)
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == pytest.approx(0.01 / 4)  # linear warm-up from lr / warmup_steps
