"""DiffusionModule: the loss trains, the EMA follows the weights, sampling is reproducible."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from celldiff.errors import NonFiniteLossError
from celldiff.seeds import mix_seed
from celldiff.training.module import DiffusionModule
from celldiff.training.nonfinite import PendingFinite
from celldiff.training.optim import lr_factor
from tests.training.helpers import TINY, FixedImages, cpu_trainer, tiny_module


def test_overfits_a_handful_of_images():
    module = tiny_module(lr=3e-3, warmup_steps=10, lr_schedule="constant", ema_decay=0.9)
    data = FixedImages(steps=300)
    x0 = data.images
    t = torch.arange(8) * 12  # fixed evaluation points
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    def eval_loss() -> float:
        with torch.no_grad():
            return module.diffusion_loss(x0, t, noise, {}, module.unet).mean().item()

    before = eval_loss()
    trainer = L.Trainer(
        max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    after = eval_loss()
    # The zero-initialised output predicts eps = 0, so the loss starts at E[eps^2] = 1.
    assert before == pytest.approx(1.0, abs=0.15)
    assert after < 0.35 * before, (before, after)
    assert int(module.ema_updates) == 300


def test_ema_follows_weights_with_warmup():
    module = tiny_module(ema_decay=0.999, ema_warmup=True)
    raw = list(module.unet.parameters())
    ema = list(module.ema_unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(raw, ema, strict=False))
    assert not any(p.requires_grad for p in ema)
    with torch.no_grad():
        for p in raw:
            p.add_(1.0)
    module.update_ema()  # n = 0: warm-up decay min(0.999, 1/10) = 0.1
    for p_raw, p_ema, p_old in zip(raw, ema, [p - 1.0 for p in raw], strict=False):
        torch.testing.assert_close(p_ema, 0.1 * p_old + 0.9 * p_raw)
    assert int(module.ema_updates) == 1


def test_ema_start_step_copies_weights():
    module = tiny_module(ema_start_step=10)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.5)
    module.update_ema()  # global_step 0 <= start step: the EMA is a copy
    assert all(torch.equal(a, b) for a, b in zip(module.unet.parameters(), module.ema_unet.parameters(), strict=False))
    assert int(module.ema_updates) == 0


def test_checkpoint_holds_ema_and_counter():
    module = tiny_module()
    keys = module.state_dict().keys()
    assert any(k.startswith("ema_unet.") for k in keys)
    assert "ema_updates" in keys
    assert not any(k.startswith("schedule.") for k in keys)  # recomputed from hyperparameters


def test_noise_differs_per_rank_and_step(monkeypatch):
    assert mix_seed(0, 0, 0, 5) != mix_seed(0, 1, 0, 5)
    assert mix_seed(0, 0, 0, 5) != mix_seed(0, 0, 0, 6)
    assert mix_seed(3, 1, 2) == mix_seed(3, 1, 2)
    module = tiny_module()
    x0 = torch.zeros(2, 3, 16, 16)
    train, val = {}, {}
    for rank in (0, 1):  # what the module hands the loss on each rank of two
        monkeypatch.setattr(DiffusionModule, "global_rank", property(lambda self, r=rank: r))
        train[rank] = module.loss.draws(x0, 7, 0, module.global_rank, world=2).noise
        val[rank] = module.loss.validation_draws(x0, 0, module.global_rank)[1]
    assert not torch.equal(train[0], train[1])
    assert not torch.equal(val[0], val[1])
    assert not torch.equal(module.loss.draws(x0, 7, 0).noise, module.loss.draws(x0, 8, 0).noise)  # and per step


def test_generate_is_reproducible_per_seed():
    module = tiny_module()
    with torch.no_grad():  # make the network non-trivial so images depend on it
        for p in module.ema_unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a = module.generate([11, 12, 13], sampler="ddim", steps=5)
    b = module.generate([13, 99], sampler="ddim", steps=5)
    c = module.generate([11, 12, 13], sampler="ddim", steps=5)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, c)
    torch.testing.assert_close(a[2], b[0])  # image of seed 13, whatever its batch
    assert not torch.allclose(a[0], a[1])
    assert a.min() >= -1 and a.max() <= 1


def test_predict_step_returns_images_and_indices():
    module = tiny_module(sampler="ddim", sampling_steps=3)
    batch = {"index": torch.tensor([4, 5]), "noise_seed": torch.tensor([40, 50]), "label": torch.tensor([0, 1])}
    out = module.predict_step(batch, 0)
    assert out["images"].shape == (2, 3, 16, 16)
    assert out["index"].tolist() == [4, 5]


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="sampler"):
        tiny_module(sampler="euler")
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_module(ema_decay=1.0)


def test_lr_warmup_then_cosine():
    lrs = [lr_factor(step, warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.1) for step in range(111)]
    assert lrs[0] == pytest.approx(0.1)  # (0 + 1) / 10 of the peak
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_factor(500, 10, 110, "constant", 0.1) == 1.0


class Exploding(FixedImages):
    """Images that turn to NaN at batch ``bad``."""

    def __init__(self, bad: int, steps: int = 6) -> None:
        super().__init__(steps=steps)
        self.bad = bad

    def train_dataloader(self):
        items = [{"image": self.images.clone(), "label": torch.zeros(8, dtype=torch.long)} for _ in range(self.steps)]
        items[self.bad]["image"][0, 0, 0, 0] = float("nan")
        return torch.utils.data.DataLoader(items, batch_size=None)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_nonfinite_loss_stops_the_run_naming_the_step():
    module = tiny_module(nonfinite_loss="error")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        _trainer(6).fit(module, datamodule=Exploding(bad=3))
    assert module.global_step == 4  # stopped right after the bad step, not at the end


def test_nonfinite_loss_skip_keeps_weights_finite():
    module = tiny_module(nonfinite_loss="skip")
    _trainer(6).fit(module, datamodule=Exploding(bad=3))
    assert module.nonfinite.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema_unet.parameters())


def test_v_prediction_converts_back_to_eps():
    module = tiny_module(prediction_type="v")
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    noise = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 10, 50, 99])
    x_t = module.schedule.q_sample(x0, t, noise)
    v = module.schedule.velocity(x0, t, noise)

    class Oracle(torch.nn.Module):  # returns the exact v for this x_t
        def forward(self, x, t, class_labels=None):
            return v

    eps = module.denoiser.model_fn(Oracle(), {})(x_t, t)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)
    # The loss of the oracle is zero; the zero-initialised network's is E[v^2] = 1.
    assert module.diffusion_loss(x0, t, noise, {}, Oracle()).max() < 1e-10
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_module(prediction_type="x0")


def test_update_ema_reads_nothing_from_the_device(monkeypatch):
    """The EMA step must not wait for the device: no int()/item()/bool() of any tensor in it."""
    module = tiny_module(ema_start_step=1)

    def no_sync(self, *args, **kwargs):
        raise AssertionError("update_ema read a tensor on the host (a device->host sync)")

    for name in ("__int__", "__index__", "__float__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    module.update_ema()  # before ema_start_step: a copy
    monkeypatch.setattr(DiffusionModule, "global_step", property(lambda self: 5))
    module.update_ema()
    module.update_ema()
    monkeypatch.undo()
    assert int(module.ema_updates) == 2 == module.ema.updates


def test_ema_counter_follows_a_loaded_state_dict():
    trained = tiny_module(ema_decay=0.999)
    for _ in range(7):
        trained.update_ema()
    fresh = tiny_module(ema_decay=0.999)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.ema.updates == 7
    with torch.no_grad():
        for a, b in zip(trained.unet.parameters(), fresh.unet.parameters(), strict=True):
            a.add_(1.0)
            b.add_(1.0)
    trained.update_ema()  # warm-up decay (1 + 7) / (10 + 7) in both, not (1 + 0) / 10 in the fresh one
    fresh.update_ema()
    for a, b in zip(trained.ema_unet.parameters(), fresh.ema_unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resumed_fit_has_the_uninterrupted_ema(tmp_path):
    """Two epochs straight == one epoch, then a resume from its checkpoint: the EMA warm-up included."""
    hp = dict(ema_decay=0.99, warmup_steps=1, lr_schedule="constant")  # the warm-up decay reads the counter

    def fit(epochs: int, ckpt_path=None, **kwargs) -> DiffusionModule:
        module = tiny_module(**hp)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, **kwargs)  # fmt: skip
        trainer.fit(module, datamodule=FixedImages(steps=3), ckpt_path=ckpt_path)
        return module

    straight = fit(2, enable_checkpointing=False)
    fit(1, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="epoch1")])
    resumed = fit(2, ckpt_path=tmp_path / "epoch1.ckpt", enable_checkpointing=False)
    assert resumed.ema.updates == straight.ema.updates == 6
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("bad, step, steps_done", [(2, 1, 1), (3, 1, 2)], ids=["first-micro-batch", "last-micro-batch"])
def test_nonfinite_loss_in_an_accumulated_micro_batch_names_its_step(bad, step, steps_done):
    """accumulate_grad_batches 2: batches 2 and 3 both belong to optimizer step 1."""
    module = tiny_module(nonfinite_loss="error")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=rf"at step {step} \(batch {bad}\): stopping"):
        trainer.fit(module, datamodule=Exploding(bad=bad, steps=8))
    assert module.global_step == steps_done
    if bad == 2:  # caught by the next micro-batch, before the optimizer step: the weights are intact
        assert all(torch.isfinite(p).all() for p in module.unet.parameters())


def test_pending_finite_flag_is_read_only_once_its_copy_has_landed():
    """On CUDA the flag is copied to the host without waiting; reading it before the copy is a race."""
    pending = PendingFinite(3, 7, torch.tensor(False), torch.tensor(float("nan")))
    stale = torch.tensor(True)  # what a pinned buffer holds before the asynchronous copy lands

    class CopyInFlight:
        synchronized = False

        def synchronize(self):
            self.synchronized = True
            stale.fill_(False)  # the copy lands

    pending.flag, pending.event = stale, CopyInFlight()
    assert pending.is_finite() is False and pending.event.synchronized


# --------------------------------------------------------------------------- every flag set by a test
def test_image_channels_must_be_3_which_old_checkpoints_store():
    with pytest.raises(ValueError, match=r"model.image_channels must be 3 \(the images are RGB\), got 1"):
        tiny_module(image_channels=1)
    module = tiny_module(image_channels=3)  # what every checkpoint's hyperparameters hold
    assert module.unet.in_channels == 3 and module.generate([0], sampler="ddim", steps=2).shape == (1, 3, 16, 16)


def test_optimizer_flags_reach_adamw_and_the_schedule():
    """adam_betas and weight_decay are the optimizer's; min_lr_ratio is the LR the cosine reaches at the last step."""
    module = tiny_module(lr=1e-3, adam_betas=(0.8, 0.95), weight_decay=0.05, warmup_steps=1, min_lr_ratio=0.25)
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = cpu_trainer(max_steps=4, callbacks=[RecordLR()])
    trainer.fit(module, datamodule=FixedImages(steps=4))
    group = trainer.optimizers[0].param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.05
    # Warm-up step 0 at lr / 1, then cosine from lr (step 1) down to min_lr_ratio * lr after the last step.
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 3))),
                                 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(2 * math.pi / 3)))])  # fmt: skip
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.25e-3)


class HugeGradients(DiffusionModule):
    """Blows every gradient up by 1e6 just before clipping, and records the norm after it."""

    norms: list[float]

    def configure_gradient_clipping(self, optimizer, *args, **kwargs):
        for p in self.unet.parameters():
            if p.grad is not None:
                p.grad.mul_(1e6)
        super().configure_gradient_clipping(optimizer, *args, **kwargs)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        self.norms = [*getattr(self, "norms", []), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()]


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_grad_clip_norm_clips_a_huge_gradient(clip):
    torch.manual_seed(0)
    module = HugeGradients(**{**TINY, "grad_clip_norm": clip, "warmup_steps": 1})
    cpu_trainer(max_steps=2).fit(module, datamodule=FixedImages(steps=2))
    if clip:
        assert module.norms == pytest.approx([clip, clip], rel=1e-4)
    else:  # 0 disables clipping: the huge gradient reaches AdamW as it is
        assert min(module.norms) > 1e3
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())


@pytest.mark.parametrize("spacing", ["trailing", "leading", None])
def test_sampling_spacing_picks_the_timesteps_generate_visits(spacing):
    from celldiff.diffusion.trajectory import timestep_sequence

    module = tiny_module(sampler="ddim", sampling_steps=4, sampling_spacing=spacing)
    seen = []
    module.generate([0], callback=lambda state: seen.append(state["t"]))
    expected = timestep_sequence(TINY["num_timesteps"], 4, spacing or "uniform")  # ddim's default: uniform
    assert seen == expected.flip(0).tolist()
    with pytest.raises(ValueError, match="model.sampling_spacing must be one of"):
        tiny_module(sampling_spacing="log")


def test_the_old_module_path_resolves_with_a_deprecation_warning(monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "celldiff.module", raising=False)
    with pytest.warns(DeprecationWarning, match="celldiff.training.module.DiffusionModule"):
        old = importlib.import_module("celldiff.module")
    assert old.DiffusionModule is DiffusionModule and old.NonFiniteLossError is NonFiniteLossError
    assert old.lr_factor is lr_factor
