"""Checkpoints written before the redesign still load, with the old configs, and give the same pixels."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli.helpers import run_cli
from tests.conftest import REPO, SAMPLE

FIXTURES = REPO / "tests" / "fixtures" / "pre_redesign"
TINY = ["--model.base_channels", "8", "--model.channel_mult", "[1,2]", "--model.num_res_blocks", "1",
        "--model.attention_resolutions", "[8]", "--model.num_heads", "2", "--model.num_timesteps", "50",
        "--model.warmup_steps", "2", "--data.image_size", "16"]  # fmt: skip
EXPECTED = json.loads((FIXTURES / "expected_pixels.json").read_text())


def _user_images(root: Path) -> tuple[Path, Path]:
    """The two cells and box masks of make_fixture.sh."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name, cls in (("cell_a", "eosinophil"), ("cell_b", "platelet")):
        shutil.copy(sorted((SAMPLE / cls).glob("*.jpg"))[0], images / f"{name}.jpg")
        w, h = Image.open(images / f"{name}.jpg").size
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2 + 20, w // 3 : 2 * w // 3] = 255
        Image.fromarray(mask).save(masks / f"{name}.png")
    return images, masks


def _check(out: Path, prefix: str) -> None:
    expected = {k.split("/", 1)[1]: v for k, v in EXPECTED.items() if k.startswith(prefix + "/")}
    assert expected, prefix
    written = {p.name for p in out.glob("*.png")}
    assert written == set(expected), sorted(written ^ set(expected))
    for name, want in expected.items():
        pixels = np.asarray(Image.open(out / name).convert("RGB"))
        assert list(pixels.shape) == want["shape"], name
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == want["sha256"], f"{prefix}/{name} differs"


@pytest.mark.parametrize(("prefix", "sampler", "steps"), [("out_ddpm", "ddpm", "50"), ("out_ddim", "ddim", "5")])
def test_unconditional_checkpoint_from_before_the_redesign(tmp_path, prefix, sampler, steps):
    out = tmp_path / prefix
    run_cli(["predict", "--config", str(FIXTURES / "demo.yaml"), *TINY, "--ckpt_path", str(FIXTURES / "uncond.ckpt"),
             "--output_dir", str(out), "--num_samples", "4", "--model.sampler", sampler, "--model.sampling_steps", steps,
             "--trainer.enable_progress_bar", "false", "--seed", "3"], tmp_path)  # fmt: skip
    _check(out, prefix)


def test_class_conditional_inpainting_checkpoint_from_before_the_redesign(tmp_path):
    images, masks = _user_images(tmp_path / "user")
    out = tmp_path / "out_inpaint"
    run_cli(["predict", "--config", str(FIXTURES / "demo_phase3_inpaint.yaml"), *TINY,
             "--ckpt_path", str(FIXTURES / "inpaint3.ckpt"), "--output_dir", str(out),
             "--data.predict_images", str(images), "--data.predict_masks", str(masks), "--classes", "eosinophil,platelet",
             "--num_samples", "2", "--model.sampling_steps", "5", "--trainer.enable_progress_bar", "false", "--seed", "3"],
            tmp_path)  # fmt: skip
    _check(out, "out_inpaint")
