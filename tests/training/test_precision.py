"""``--trainer.precision bf16-true`` trains, validates, samples and predicts; ``16-true`` training is refused."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from celldiff.errors import UnsupportedPrecisionError
from celldiff.training.module import DiffusionModule
from tests.cli.helpers import fit_args, run_cli
from tests.training.helpers import FixedImages, tiny_module

pytestmark = pytest.mark.filterwarnings("ignore")
TINY_T = 100  # tests.training.helpers.TINY's num_timesteps


class WithValAndPredict(FixedImages):
    def val_dataloader(self):
        items = [{"image": self.images, "label": torch.zeros(len(self.images), dtype=torch.long)}]
        return torch.utils.data.DataLoader(items, batch_size=None)

    def predict_dataloader(self):
        items = [{"index": torch.tensor([0, 1]), "noise_seed": torch.tensor([7, 8]), "label": torch.tensor([0, 0])}]
        return torch.utils.data.DataLoader(items, batch_size=None)


def _trainer(precision: str, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(prediction_type="v", loss_weighting="min_snr", class_conditional=True, num_classes=2)],
    ids=["eps", "v-min_snr-conditional"],
)
def test_bf16_true_trains_validates_samples_and_predicts(overrides):
    module = tiny_module(lr=1e-3, warmup_steps=1, ema_decay=0.999, ema_warmup=False, sampler="ddim",
                         sampling_steps=3, **overrides)  # fmt: skip
    ema_before = [p.clone() for p in module.ema_unet.parameters()]
    data = WithValAndPredict(steps=4)
    trainer = _trainer("bf16-true", max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, datamodule=data)
    # Lightning cast the network; the schedule stays float64 and the EMA float32.
    assert next(module.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.ema_unet.parameters())
    assert module.schedule.alpha_bar.dtype == torch.float64
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema_unet.parameters())
    # decay 0.999: each update moves the EMA by 1e-3 of the gap, which a bf16 EMA would round away.
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, module.ema_unet.parameters(), strict=True))
    assert int(module.ema_updates) == 4 == module.ema.updates
    for key in ("train/loss", "val/loss", "val/loss_ema"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    images = module.generate([1, 2], sampler="ddim", steps=3)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    module.hparams.use_ema = False  # the bf16 network itself samples too
    assert torch.isfinite(module.generate([1], sampler="ddpm", steps=3)).all()
    module.hparams.use_ema = True
    out = _trainer("bf16-true").predict(module, datamodule=data)
    assert out[0]["images"].dtype == torch.float32 and torch.isfinite(out[0]["images"]).all()


def test_the_ema_stays_float32_when_the_module_is_cast_to_half():
    module = tiny_module(ema_decay=0.999, ema_warmup=False)
    module.to(torch.bfloat16)
    assert next(module.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.ema_unet.parameters())
    before = [p.clone() for p in module.ema_unet.parameters()]
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.25)
    targets = [p.float() for p in module.unet.parameters()]
    module.update_ema()  # moves each EMA weight by 1e-3 of its gap (~2.5e-4): below bf16's resolution
    for old, target, new in zip(before, targets, module.ema_unet.parameters(), strict=True):
        torch.testing.assert_close(new, torch.lerp(old, target, 0.001), atol=1e-7, rtol=0)
        assert not torch.equal(new, old)
    module.double()  # any other cast applies as usual
    assert all(p.dtype == torch.float64 for p in module.ema_unet.parameters())


def test_timesteps_and_noise_stay_exact_inside_a_true_precision_step():
    """Lightning's *-true forward context makes bf16 the default dtype inside training/validation steps."""
    module = tiny_module()
    expected = ((np.arange(64) + 0.5) * TINY_T / 64).astype(np.int64)
    with HalfPrecision("bf16-true").forward_context():
        assert torch.get_default_dtype() == torch.bfloat16
        stratified = module.loss.stratified_timesteps(64, torch.device("cpu"))
        _, noise, drop = module.loss.draws(torch.zeros(4, 3, 16, 16), 0, 0, with_labels=True)  # a bf16 batch
    assert stratified.tolist() == expected.tolist()
    assert noise.dtype == torch.float32 and drop.dtype == torch.float32


def test_16_true_training_is_refused_at_setup_but_inference_works():
    module = tiny_module()
    with pytest.raises(UnsupportedPrecisionError, match="16-true cannot train this model.*bf16-true"):
        _trainer("16-true", max_steps=1).fit(module, datamodule=WithValAndPredict(steps=1))
    assert module.global_step == 0
    module = tiny_module(sampler="ddim", sampling_steps=3, use_ema=False)
    out = _trainer("16-true").predict(module, datamodule=WithValAndPredict())
    assert next(module.unet.parameters()).dtype == torch.float16
    assert torch.isfinite(out[0]["images"]).all()
    metrics = _trainer("16-true").validate(module, datamodule=WithValAndPredict())[0]
    assert np.isfinite(metrics["val/loss"])


def test_cli_bf16_true_fit_and_16_true_refusal(small_sample, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_cli(fit_args(small_sample, run_dir, "--trainer.precision", "bf16-true", "--trainer.max_epochs", "1"), tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3 and int(ckpt["state_dict"]["ema_updates"]) == 3
    assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(small_sample, tmp_path / "run16", "--trainer.precision", "16-true"), tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("celldiff: error:")]
    assert len(lines) == 1 and "16-true cannot train" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run16").exists()  # refused before any work: the same --run_dir works next time


def test_loading_a_bf16_true_checkpoint_into_a_float32_module():
    module = tiny_module()
    module.to(torch.bfloat16)
    state = module.state_dict()
    fresh = DiffusionModule(**module.hparams)
    fresh.load_state_dict(state)
    assert next(fresh.unet.parameters()).dtype == torch.float32
