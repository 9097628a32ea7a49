"""Phase 3: label embedding, classifier-free guidance, balanced sampling, class-conditional predict."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from celldiff.data import CellDataModule
from celldiff.data.datasets import NoiseDataset, resolve_classes
from celldiff.training.module import DiffusionModule
from tests.cli.helpers import run_cli, run_subprocess
from tests.conftest import REPO, TINY_MODEL_ARGS
from tests.training.helpers import TINY

NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def conditional_module(**overrides) -> DiffusionModule:
    torch.manual_seed(0)
    module = DiffusionModule(**{**TINY, "class_conditional": True, "num_classes": 8, "class_names": NAMES, **overrides})
    with torch.no_grad():  # move away from the zero-initialised output so predictions differ
        for p in module.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def test_label_embedding_changes_the_output():
    module = conditional_module()
    net = module.ema_unet.eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 10])
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([7, 7]))
    null = net(x, t, None)
    assert not torch.allclose(a, b)
    assert torch.equal(null, net(x, t, torch.tensor([8, 8])))  # None = the null class
    with pytest.raises(ValueError, match="null class"):
        net(x, t, torch.tensor([9, 0]))


def test_guidance_scale_zero_and_one_are_exact():
    module = conditional_module()
    labels = torch.tensor([1, 7])
    seeds = [5, 6]
    cond = module.generate(seeds, {"class_labels": labels}, sampler="ddim", steps=5, guidance_scale=1.0)
    uncond_ref = module.generate(seeds, {"class_labels": torch.full_like(labels, 8)}, sampler="ddim", steps=5,
                                 guidance_scale=1.0)  # fmt: skip
    zero = module.generate(seeds, {"class_labels": labels}, sampler="ddim", steps=5, guidance_scale=0.0)
    strong = module.generate(seeds, {"class_labels": labels}, sampler="ddim", steps=5, guidance_scale=3.0)
    assert torch.equal(zero, uncond_ref)
    assert not torch.equal(cond, uncond_ref)
    assert not torch.allclose(strong, cond)
    # Guidance works with DDPM and inpainting too.
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    known = torch.rand(2, 3, 16, 16) * 2 - 1
    inpainted = module.generate(seeds, {"class_labels": labels, "known": known, "mask": mask}, sampler="ddpm",
                                steps=5, guidance_scale=2.0)  # fmt: skip
    assert torch.equal(inpainted[mask.expand(-1, 3, -1, -1) == 0], known[mask.expand(-1, 3, -1, -1) == 0])


def test_label_dropout_feeds_the_null_class_during_training():
    module = conditional_module(label_dropout=0.5)
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                          with_kwargs=True)  # fmt: skip

    class FakeTrainer:
        global_step = 0

    module._trainer = None
    batch = {"image": torch.zeros(64, 3, 16, 16), "label": torch.arange(64) % 8}
    module.log = lambda *a, **k: None
    module.hparams.nonfinite_loss = "ignore"
    module.training_step(batch, 0)
    labels = seen[0]
    dropped = labels == 8
    assert 10 < int(dropped.sum()) < 54  # about half
    assert torch.equal(labels[~dropped], batch["label"][~dropped])
    assert module.unet.class_embed.weight.requires_grad  # the null row is a parameter like the others


def test_resolve_classes_by_name_id_and_all():
    assert resolve_classes("eosinophil,platelet", NAMES) == [1, 7]
    assert resolve_classes(["3", "lymphocyte"], NAMES) == [3, 4]
    assert resolve_classes("all", NAMES) == list(range(8))
    with pytest.raises(Exception, match="valid classes are 0=basophil.*7=platelet"):
        resolve_classes("eosinophile", NAMES)


def test_same_noise_under_each_label():
    data = NoiseDataset(num_samples=3, num_classes=8, predict_seed=4, classes=[1, 7])
    items = [data[i] for i in range(len(data))]
    assert [it["label"] for it in items] == [1, 1, 1, 7, 7, 7]
    assert [it["noise_seed"] for it in items[:3]] == [it["noise_seed"] for it in items[3:]]
    assert len({it["noise_seed"] for it in items[:3]}) == 3


def test_class_balanced_sampling(tmp_path, small_sample):
    # Make the classes unbalanced: 8 basophils, 2 of every other class.
    root = tmp_path / "unbalanced"
    shutil.copytree(small_sample, root)
    for class_dir in root.iterdir():
        if class_dir.name != "basophil":
            for f in sorted(class_dir.iterdir())[2:]:
                f.unlink()
    dm = CellDataModule(str(root), image_size=16, batch_size=8, class_balanced=True, split_fractions=(1.0, 0.0, 0.0))
    dm.prepare_data()
    dm.setup("fit")
    labels = []
    for epoch in range(100):  # the order is a function of (seed, epoch): Lightning calls set_epoch each epoch
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        labels += [b["label"] for b in loader]
    labels = torch.cat(labels)
    counts = torch.bincount(labels, minlength=8).float()
    share = counts / counts.sum()
    assert share.max() < 0.2 and share.min() > 0.07, share  # 1/8 each, not 8/22 basophils


@pytest.fixture
def phase3_checkpoint(small_sample, tmp_path):
    run_dir = tmp_path / "run3"
    run_cli(["fit", "--config", str(REPO / "configs" / "demo_phase3.yaml"), "--data.data_dir", str(small_sample),
             "--run_dir", str(run_dir), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks.steps", "3", "--data.batch_size", "16", *TINY_MODEL_ARGS], tmp_path)  # fmt: skip
    return run_dir / "checkpoints" / "last.ckpt"


def test_predict_classes_grid_one_row_per_class(phase3_checkpoint, small_sample, tmp_path):
    out = tmp_path / "out"
    run_cli(["predict", "--config", str(REPO / "configs" / "demo_phase3.yaml"), "--ckpt_path", str(phase3_checkpoint),
             "--output_dir", str(out), "--classes", "eosinophil,platelet", "--num_samples", "3",
             "--model.sampling_steps", "3", "--data.data_dir", str(small_sample),
             "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
    names = sorted(p.name for p in out.glob("*_0000*.png"))
    assert names == [f"eosinophil_0000{i}.png" for i in range(3)] + [f"platelet_0000{i}.png" for i in range(3, 6)]
    grid = np.asarray(Image.open(out / "grid.png"))
    tile = 16 + 2 * 2  # image + padding
    assert grid.shape[0] == 2 * tile  # two rows
    assert grid.shape[1] >= 3 * tile + 2


def test_unknown_class_is_one_clear_line(phase3_checkpoint, small_sample, tmp_path):
    result = run_subprocess(["predict", "--config", str(REPO / "configs" / "demo_phase3.yaml"), "--ckpt_path",
                             str(phase3_checkpoint), "--output_dir", str(tmp_path / "o"), "--classes", "eosinophile",
                             "--data.data_dir", str(small_sample)], tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("celldiff: error:")]
    assert len(line) == 1 and "eosinophile" in line[0] and "1=eosinophil" in line[0]


def test_counterfactual_nucleus_inpainting_as_every_class(small_sample, tmp_path):
    run_dir = tmp_path / "run3i"
    config = str(REPO / "configs" / "demo_phase3_inpaint.yaml")
    run_cli(["fit", "--config", config, "--data.data_dir", str(small_sample), "--run_dir", str(run_dir),
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks.steps", "3",
             "--data.batch_size", "16", *TINY_MODEL_ARGS], tmp_path)  # fmt: skip
    out = tmp_path / "cf"
    run_cli(["predict", "--config", config, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
             "--output_dir", str(out), "--classes", "all", "--data.num_predict_samples", "2",
             "--model.sampling_steps", "3", "--data.data_dir", str(small_sample),
             "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
    panels = sorted(out.glob("*_panel.png"))
    assert len(panels) == 2
    assert (out / panels[0].name.replace(".png", ".txt")).read_text().split(" | ") [1:9] == NAMES
    assert np.asarray(Image.open(panels[0])).shape[1] == 10 * (16 + 2) + 2  # masked | 8 classes | original
    stem = panels[0].name.removesuffix("_panel.png")
    assert all((out / f"{stem}_inpainted_as_{name}.png").is_file() for name in NAMES)


@pytest.mark.slow
def test_ddp_fit_with_labels_and_label_dropout(small_sample, tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "demo_phase3.yaml"), "--data.data_dir", str(small_sample),
            "--run_dir", str(tmp_path / "run"), "--trainer.max_epochs", "1", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--trainer.callbacks.steps", "3",
            "--model.label_dropout", "0.3", "--data.class_balanced", "true", "--data.batch_size", "8",
            *TINY_MODEL_ARGS]  # fmt: skip
    result = run_subprocess(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
