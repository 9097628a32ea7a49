"""Phase 2: 7-channel conditioning, masked loss, exact known pixels, predict on user images."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from celldiff.data import CellDataModule
from celldiff.data.user_images import read_image, read_mask
from celldiff.evaluation.masked import boundary_ring, inpainting_metrics, masked_psnr, seam_score
from celldiff.training.module import DiffusionModule
from tests.cli.helpers import run_cli
from tests.conftest import REPO, SAMPLE
from tests.training.helpers import TINY


def tiny_inpainter(**overrides) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(**{**TINY, "inpainting": True, **overrides})


def centre_hole(batch: int, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return mask


def test_network_sees_noisy_image_masked_image_and_mask():
    module = tiny_inpainter()
    seen = {}
    module.unet.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = centre_hole(2)
    x_t = torch.randn(2, 3, 16, 16)
    module.network_forward(module.unet, x_t, torch.tensor([3, 7]), known=image, mask=mask)
    x = seen["x"]
    assert x.shape == (2, 7, 16, 16)
    assert torch.equal(x[:, :3], x_t)  # channels 0-2: the noisy image
    assert torch.equal(x[:, 3:6], image * (1 - mask))  # 3-5: the masked image
    assert torch.equal(x[:, 3:6][mask.expand(-1, 3, -1, -1) > 0], torch.zeros(2 * 3 * 64))  # nothing leaks
    assert torch.equal(x[:, 6:], mask)  # 6: the mask


def test_inpainting_model_needs_masks():
    module = tiny_inpainter()
    with pytest.raises(KeyError, match="data.masks"):
        module.network_condition({"image": torch.zeros(1, 3, 16, 16), "label": torch.zeros(1, dtype=torch.long)})


def test_an_inpainting_model_generates_from_nothing_observed():
    """No mask at sampling = the "full" family: a zero known image and an all-ones mask (one model, four tasks)."""
    module = tiny_inpainter(sampler="ddim", sampling_steps=4).eval()
    with torch.no_grad():
        torch.nn.init.normal_(module.ema_unet.out[-1].weight, std=0.1)
    seen = []
    module.ema_unet.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        drawn = module.generate([3, 4])
        ones = torch.ones(2, 1, 16, 16)
        explicit = module.generate([3, 4], condition={"known": torch.zeros(2, 3, 16, 16), "mask": ones})
        batch = {"index": torch.arange(2), "noise_seed": torch.tensor([3, 4]), "label": torch.zeros(2, dtype=torch.long)}
        predicted = module.predict_step(batch, 0)["images"]
    assert drawn.shape == (2, 3, 16, 16) and torch.isfinite(drawn).all() and drawn.std() > 0
    assert torch.equal(drawn, explicit) and torch.equal(drawn, predicted)
    assert all(torch.equal(x[:, 3:6], torch.zeros(2, 3, 16, 16)) and torch.equal(x[:, 6:], ones) for x in seen)


def test_mask_weighted_loss():
    x0 = torch.zeros(1, 3, 16, 16)
    noise = torch.ones(1, 3, 16, 16)
    mask = centre_hole(1)  # a quarter of the pixels
    plain = tiny_inpainter()  # zero-initialised output: eps = 0, squared error 1 everywhere
    cond = {"known": x0, "mask": mask, "class_labels": None}
    t = torch.tensor([5])
    assert plain.diffusion_loss(x0, t, noise, cond, plain.unet).item() == pytest.approx(1.0)
    # A model that is right outside the mask and wrong inside:
    noise_half = torch.where(mask.expand(-1, 3, -1, -1) > 0, 1.0, 0.0)
    weighted = tiny_inpainter(mask_loss_weight=10.0)
    only = tiny_inpainter(loss_on_mask_only=True)
    frac = 0.25
    assert plain.diffusion_loss(x0, t, noise_half, cond, plain.unet).item() == pytest.approx(frac)
    expected = 10 * frac / (10 * frac + (1 - frac))
    assert weighted.diffusion_loss(x0, t, noise_half, cond, weighted.unet).item() == pytest.approx(expected)
    assert only.diffusion_loss(x0, t, noise_half, cond, only.unet).item() == pytest.approx(1.0)


@pytest.mark.parametrize("inpainting", [True, False], ids=["7-channel", "phase1-replacement"])
@pytest.mark.parametrize("resample_times", [1, 3])
def test_known_pixels_are_exact(inpainting, resample_times):
    module = tiny_inpainter(inpainting=inpainting, resample_times=resample_times, resample_jump=2)
    with torch.no_grad():
        for p in module.ema_unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    known = torch.rand(3, 3, 16, 16) * 2 - 1
    mask = centre_hole(3)
    out = module.generate([1, 2, 3], condition={"known": known, "mask": mask, "class_labels": None},
                          sampler="ddim", steps=6)  # fmt: skip
    keep = mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(out[keep], known[keep])
    assert not torch.allclose(out[~keep], known[~keep])


def test_metrics_behave():
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = centre_hole(2)
    perfect = inpainting_metrics(target, target, mask)
    assert torch.all(perfect["mse"] == 0) and torch.all(perfect["seam"] == 0)
    assert torch.allclose(perfect["ssim"], torch.ones(2), atol=1e-4)
    noisy = target + 0.2 * torch.randn_like(target) * mask
    worse = inpainting_metrics(noisy, target, mask)
    assert torch.all(worse["psnr"] < 60) and torch.all(worse["ssim"] < 0.99)
    # Errors outside the mask do not count.
    outside = target + 0.5 * (1 - mask)
    assert torch.all(masked_psnr(outside, target, mask) > 90)
    # A constant patch pasted into a textured image makes a seam.
    pasted = torch.where(mask > 0, torch.zeros_like(target), target)
    assert torch.all(seam_score(pasted, target, mask) > seam_score(target, target, mask))
    assert boundary_ring(mask).sum() > 0


def test_datamodule_attaches_masks(small_sample, tmp_path):
    dm = CellDataModule(small_sample, image_size=16, batch_size=8, masks="box,brush", eval_masks="nucleus",
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["mask"].shape == (8, 1, 16, 16) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    # Evaluation masks are fixed per image, whatever the batch.
    val_a = dm.datasets["val"].get_batch(np.arange(len(dm.datasets["val"])))
    val_b = dm.datasets["val"].get_batch(np.arange(len(dm.datasets["val"]))[::-1])
    assert torch.equal(val_a["mask"], val_b["mask"].flip(0))
    with pytest.raises(Exception, match="center"):
        CellDataModule(small_sample, masks="center")


@pytest.fixture
def user_files(tmp_path):
    """Real cells of odd sizes with masks of other sizes, plus one file for each bad-input case."""
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    sources = sorted((SAMPLE / "lymphocyte").glob("*.jpg"))
    Image.open(sources[0]).save(images / "a.jpg")  # 360 x 363
    Image.open(sources[1]).resize((101, 77)).save(images / "b.png")  # odd size, PNG
    for stem, size in (("a", (50, 50)), ("b", (300, 200))):
        m = Image.new("L", size, 0)
        ImageDraw.Draw(m).ellipse((size[0] * 0.3, size[1] * 0.3, size[0] * 0.7, size[1] * 0.7), fill=255)
        m.save(masks / f"{stem}.png")
    shutil.copy(sources[2], images / "no_mask.jpg")
    shutil.copy(sources[2], images / "empty.jpg")
    Image.new("L", (40, 40), 0).save(masks / "empty.png")
    shutil.copy(sources[2], images / "full.jpg")
    Image.new("L", (40, 40), 255).save(masks / "full.png")
    shutil.copy(sources[2], images / "colour.jpg")
    shutil.copy(sources[3], masks / "colour.png")  # a photograph as a mask
    shutil.copy(sources[2], images / "grey.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(masks / "grey.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.new("L", (40, 40), 255).save(masks / "broken.png")
    return images, masks


def test_user_mask_validation(user_files):
    images, masks = user_files
    size = read_image(images / "a.jpg").size
    assert read_mask(masks / "a.png", size).shape == (size[1], size[0])
    for stem, message in (("empty", "empty"), ("full", "full"), ("colour", "colour"), ("grey", "binary")):
        with pytest.raises(ValueError, match=message):
            read_mask(masks / f"{stem}.png", size)


def test_tiny_inpainting_model_round_trips_through_predict(small_sample, user_files, tmp_path):
    images, masks = user_files
    run_dir = tmp_path / "run"
    tiny = ["--model.base_channels", "8", "--model.channel_mult", "[1, 2]", "--model.num_timesteps", "50",
            "--model.attention_resolutions", "[8]", "--model.num_heads", "2", "--data.image_size", "16"]  # fmt: skip
    run_cli(["fit", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--data.data_dir", str(small_sample),
             "--run_dir", str(run_dir), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks.every_n_epochs", "1", "--trainer.callbacks.steps", "3", "--data.batch_size", "16",
             *tiny], tmp_path)  # fmt: skip
    assert len(list((run_dir / "samples").glob("inpaint_epoch*.png"))) == 2
    assert "val_inpaint/psnr" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")

    # The test split, with the configured (fixed) masks.
    out = tmp_path / "test_split"
    run_cli(["predict", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--ckpt_path", ckpt,
             "--output_dir", str(out), "--data.data_dir", str(small_sample), "--model.sampling_steps", "3",
             "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
    panels = sorted(out.glob("*_panel.png"))
    assert len(panels) == len(list(out.glob("*_inpainted.png"))) > 0
    assert np.asarray(Image.open(panels[0])).shape[1] > 3 * 16  # masked | inpainted | original
    assert (out / "grid.png").is_file()

    # A user's own images: one line per bad file, exit code 1, the good ones written.
    out = tmp_path / "user"
    args = ["predict", "--config", str(REPO / "configs" / "demo_inpaint.yaml"), "--ckpt_path", ckpt,
            "--output_dir", str(out), "--data.predict_images", str(images), "--data.predict_masks", str(masks),
            "--samples_per_image", "2", "--model.sampling_steps", "3", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "celldiff.cli", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("celldiff: skipped")]
    assert len(skipped) == 6
    for stem in ("no_mask", "empty", "full", "colour", "grey", "broken"):
        assert any(f"/{stem}.jpg" in line for line in skipped), stem
    assert "Traceback" not in result.stderr
    for stem, ext in (("a", "jpg"), ("b", "png")):
        original = np.asarray(read_image(images / f"{stem}.{ext}"))
        missing = read_mask(masks / f"{stem}.png", (original.shape[1], original.shape[0]))
        for j in range(2):
            full = np.asarray(Image.open(out / f"{stem}_fullres_{j}.png"))
            assert full.shape == original.shape
            assert np.array_equal(full[~missing], original[~missing])  # every known pixel exact
            small = np.asarray(Image.open(out / f"{stem}_inpainted_{j}.png"))
            assert small.shape == (16, 16, 3)
        assert not np.array_equal(
            np.asarray(Image.open(out / f"{stem}_inpainted_0.png")), np.asarray(Image.open(out / f"{stem}_inpainted_1.png"))
        )  # two samples differ
