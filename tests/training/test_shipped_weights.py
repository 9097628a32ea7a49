"""The weights files in weights/ (the shipped models): they load, run, say what they are, and the card is theirs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from celldiff.evaluation.judge import load_judge
from celldiff.nets.weightsfile import read_weights_metadata
from celldiff.training.weights import load_diffusion_module
from tests.conftest import REPO

WEIGHTS = REPO / "weights"
FILES = sorted(WEIGHTS.glob("*.safetensors"))
PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
DIFFUSION = "celldiff.training.module.DiffusionModule"


def test_the_folder_holds_the_shipped_models_within_the_size_limits():
    assert {f.name for f in FILES} >= {"celldiff64.safetensors", "judge64.safetensors"}
    for path in FILES:
        assert path.stat().st_size <= 25 * 2**20, path.name  # each at most 25 MB
    assert sum(f.stat().st_size for f in WEIGHTS.iterdir() if f.is_file()) <= 80 * 2**20


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_each_shipped_file_says_what_it_is_and_its_card_names_its_hash(path: Path):
    meta = read_weights_metadata(path)
    assert meta["dtype"] == "float16" and meta["celldiff_format"].startswith("celldiff-weights/")
    hparams = json.loads(meta["hparams"]) if isinstance(meta.get("hparams"), str) else meta["hparams"]
    assert hparams["class_names"] == PBC_CLASSES
    if meta["class_path"] == DIFFUSION:
        assert meta["weights"] == "ema" and int(meta["images_seen_total"]) >= 300_000  # the budget
        assert hparams["image_size"] == 64 and hparams["prediction_type"] in ("eps", "v")
        assert hparams["beta_schedule"] and hparams["num_timesteps"] == 1000
    card = (WEIGHTS / "README.md").read_text()
    assert f"`weights/{path.name}`" in card
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card, f"weights/README.md does not give {path.name}'s sha256"


@pytest.mark.parametrize("path", [f for f in FILES if read_weights_metadata(f)["class_path"] == DIFFUSION],
                         ids=lambda f: f.name)  # fmt: skip
def test_each_shipped_diffusion_model_generates_and_inpaints(path: Path):
    module = load_diffusion_module(path)
    hp = module.hparams
    torch.manual_seed(0)
    images = module.generate([0, 1], sampler="ddim", steps=2, guidance_scale=0.0)  # a forward pass or two
    assert images.shape == (2, 3, hp.image_size, hp.image_size) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0
    assert module.generate([0], sampler="ddim", steps=2).equal(module.generate([0], sampler="ddim", steps=2))
    if hp.inpainting:  # known pixels come back exactly
        known = torch.rand(1, 3, hp.image_size, hp.image_size) * 2 - 1
        mask = torch.zeros(1, 1, hp.image_size, hp.image_size)
        mask[..., 16:48, 16:48] = 1
        condition = {"known": known, "mask": mask}
        if hp.class_conditional:
            condition["labels"] = torch.tensor([PBC_CLASSES.index("erythroblast")])
        out = module.generate([0], condition=condition, sampler="dpmsolver", steps=2)
        keep = (mask == 0).expand_as(out)
        torch.testing.assert_close(out[keep], known[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [f for f in FILES if read_weights_metadata(f)["class_path"] != DIFFUSION],
                         ids=lambda f: f.name)  # fmt: skip
def test_each_shipped_judge_classifies(path: Path):
    judge = load_judge(path)
    side = judge.hparams.image_size
    x = torch.rand(2, 3, side, side) * 2 - 1
    logits, features = judge(x), judge.features(x)
    assert logits.shape == (2, len(PBC_CLASSES)) and torch.isfinite(logits).all()
    assert features.ndim == 2 and features.shape[0] == 2
