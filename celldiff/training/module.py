"""DiffusionModule: the LightningModule that trains a U-Net as a DDPM and samples from it.

It reads top to bottom: the hyperparameter checks, the network and its denoiser, the training step
(the loss of ``celldiff.diffusion.loss``), validation, the optimiser (``celldiff.training.optim``), the EMA
(``celldiff.training.ema``), then generation and predict (``celldiff.diffusion.samplers``). The module owns
the network (``unet``), its moving average (``ema_unet``) and the schedule (``schedule``); the sampler
gets a ``model_fn`` from the denoiser and never owns the network. Of ranks the module knows only what it
hands the loss (rank and world size) so that the global batch draws its randomness once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from celldiff.diffusion.denoiser import PREDICTION_TYPES, Denoiser
from celldiff.diffusion.loss import LOSS_WEIGHTINGS, DiffusionLoss
from celldiff.diffusion.samplers import check_sampler, sample
from celldiff.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule
from celldiff.diffusion.trajectory import SPACINGS
from celldiff.errors import UnsupportedPrecisionError
from celldiff.nets.unet import UNet, UNetConfig
from celldiff.seeds import generators_from_seeds, mix_seed
from celldiff.training.ema import EMA, keep_float32
from celldiff.training.nonfinite import NONFINITE_POLICIES, NonFiniteGuard
from celldiff.training.optim import LR_SCHEDULES, adamw_with_warmup
from celldiff.training.weights import init_weights_for_fit

# Pure float16 weights train to NaN in one AdamW step: its eps (1e-8) and most squared gradients
# underflow to 0 in float16 (0 / 0), and *-true has no loss scaler. Inference in 16-true works.
FP16_TRUE_MESSAGE = (
    "--trainer.precision 16-true cannot train this model (float16 weights without loss scaling: "
    "AdamW's eps and squared gradients underflow, NaN after one step); use bf16-true, bf16-mixed, "
    "or 16-mixed on a GPU (16-true works for validate, test and predict)"
)


def check_hyperparameters(hp: Mapping[str, Any]) -> None:
    """Names and numbers that cannot work: one ValueError naming the ``model.`` flag, before anything is built."""
    check_sampler(hp["sampler"], "model.sampler")
    choices = {"lr_schedule": LR_SCHEDULES, "prediction_type": PREDICTION_TYPES, "nonfinite_loss": NONFINITE_POLICIES,
               "loss_weighting": LOSS_WEIGHTINGS, "beta_schedule": BETA_SCHEDULES}  # fmt: skip
    for name, valid in choices.items():
        if hp[name] not in valid:
            raise ValueError(f"model.{name} must be one of {valid}, got {hp[name]!r}")
    if hp["sampling_spacing"] is not None and hp["sampling_spacing"] not in SPACINGS:
        raise ValueError(f"model.sampling_spacing must be one of {SPACINGS} or null, got {hp['sampling_spacing']!r}")
    if hp["image_channels"] != 3:
        raise ValueError(f"model.image_channels must be 3 (the images are RGB), got {hp['image_channels']}")
    if hp["class_conditional"] and hp["num_classes"] < 1:
        raise ValueError("model.class_conditional needs num_classes >= 1 (linked from the data module)")
    for name in ("lr", "mask_loss_weight"):
        if not hp[name] > 0:
            raise ValueError(f"model.{name} must be > 0, got {hp[name]}")
    for name in ("num_timesteps", "base_channels", "num_res_blocks", "num_heads", "image_size", "samples_per_image",
                 "resample_jump", "resample_times"):  # fmt: skip
        if not hp[name] >= 1:
            raise ValueError(f"model.{name} must be >= 1, got {hp[name]}")
    for name in ("warmup_steps", "weight_decay", "grad_clip_norm", "ddim_eta", "ema_start_step", "guidance_scale"):
        if not hp[name] >= 0:
            raise ValueError(f"model.{name} must be >= 0, got {hp[name]}")
    for name in ("label_dropout", "ema_decay", "dropout"):
        if not 0.0 <= hp[name] < 1.0:
            raise ValueError(f"model.{name} must be in [0, 1), got {hp[name]}")
    if not 0.0 <= hp["min_lr_ratio"] <= 1.0:
        raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {hp['min_lr_ratio']}")
    if not all(0.0 <= b < 1.0 for b in hp["adam_betas"]):
        raise ValueError(f"model.adam_betas must be in [0, 1), got {list(hp['adam_betas'])}")
    if hp["sampling_steps"] is not None and hp["sampling_steps"] < 1:
        raise ValueError(f"model.sampling_steps must be >= 1 (or null: the sampler's), got {hp['sampling_steps']}")
    gamma = hp["min_snr_gamma"]
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"model.min_snr_gamma must be a finite number > 0, got {gamma!r}")


def _sync_ema_counter(module: DiffusionModule, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the host-side EMA counter follows the loaded ``ema_updates`` buffer."""
    module.ema.load_counter(module.ema_updates)


def nothing_observed(count: int, channels: int, size: int, device: torch.device) -> dict[str, Tensor]:
    """An inpainting condition with every pixel missing: a zero known image and an all-ones mask.

    An inpainting model trained with the ``full`` mask family generates from it (one model, four tasks).
    """
    return {"known": torch.zeros(count, channels, size, size, device=device), "mask": torch.ones(count, 1, size, size, device=device)}


class DiffusionModule(L.LightningModule):
    """A DDPM (Ho et al. 2020) on a timestep-conditioned U-Net: ε- or v-prediction, inpainting, classes.

    Args:
        image_size: Side of the square training images (linked from ``data.image_size``).
        image_channels: Channels of the images: 3 (RGB), the only value (configs and checkpoints name it).
        num_classes: Number of cell classes in the data (linked from the data module); used if ``class_conditional``.
        class_names: Names of the classes (linked from the data module); used in file names.
        class_conditional: Condition the U-Net on the class label with a learned embedding added
            to the timestep embedding (Phase 3).
        label_dropout: Class-conditional training: probability of replacing a label by the null class, so
            the same network also learns the unconditional model (classifier-free guidance, Ho & Salimans 2022).
        guidance_scale: Classifier-free guidance at sampling: eps = eps_u + s (eps_c - eps_u);
            1 = conditional only, 0 = unconditional, > 1 stronger class features.
        base_channels: Channels of the first U-Net level.
        channel_mult: Channel multiplier of each U-Net level (one level per entry).
        num_res_blocks: Residual blocks per level.
        attention_resolutions: Feature-map sizes (e.g. 16 for 16 x 16) that get self-attention.
        num_heads: Attention heads.
        dropout: Dropout inside the residual blocks.
        beta_schedule: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal).
        num_timesteps: Number of diffusion steps T.
        prediction_type: What the network predicts: ``eps`` (ε, Ho et al.) or ``v`` (Salimans & Ho 2022), which
            learns colour and layout at high noise much sooner (short CPU runs). Samplers always receive ε.
        loss_weighting: Per-timestep weight of the training loss: ``uniform`` (the plain MSE of Ho et al.) or
            ``min_snr`` (Min-SNR-γ, Hang et al. 2023: min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v,
            SNR = abar / (1 - abar)): the easy low-noise steps stop dominating. Validation stays the plain MSE.
        min_snr_gamma: The clamp γ of ``min_snr`` (> 0; 5 in the paper).
        inpainting: Phase 2: the U-Net also sees the masked image and the mask (``cat(x_t, masked_image,
            mask)``, 7 channels); batches must carry masks (``data.masks``). Any model inpaints by
            replacement at sampling when the batch has a mask; this one is trained for it.
        mask_loss_weight: Inpainting: weight of the squared error inside the mask relative to outside (1: plain MSE).
        loss_on_mask_only: Inpainting: compute the loss inside the mask only.
        resample_jump: RePaint jump length (reverse steps) when inpainting at sampling.
        resample_times: RePaint resamplings per jump (1 = plain replacement).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        warmup_steps: Linear learning-rate warm-up steps.
        lr_schedule: ``cosine`` (decay to ``min_lr_ratio * lr`` at the last step) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for the cosine schedule.
        grad_clip_norm: Clip the gradient norm to this value (0 disables).
        ema_decay: Decay of the exponential moving average of the weights.
        ema_warmup: Decay warm-up ``min(decay, (1 + n) / (10 + n))``: the initialisation fades fast.
        ema_start_step: Optimizer steps before the EMA starts averaging (until then it copies).
        sampler: A name of ``celldiff.diffusion.samplers.SAMPLERS``: ``ddpm`` (ancestral, Ho et al.
            Alg. 2), ``ddim`` (Song et al.) or ``dpmsolver`` (DPM-Solver++ 2M, Lu et al. 2022).
        sampling_steps: Reverse steps; ``None``: the sampler's default (T for ddpm, 50 for ddim, 20 for dpmsolver).
        sampling_spacing: Timesteps the reverse steps visit: ``uniform``, ``leading``, ``trailing`` or
            ``logsnr``; ``None`` means the sampler's default (``logsnr`` for ``dpmsolver``, else ``uniform``).
        ddim_eta: DDIM stochasticity (0 = deterministic).
        use_ema: Sample with the EMA weights (validation grids, predict).
        samples_per_image: Inpainting predict: samples drawn per masked image (diversity).
        noise_seed: Seed of the training/validation noise and timesteps (mixed with the step).
        nonfinite_loss: What a NaN/inf training loss does: ``error`` stops the run naming the step (and the
            micro-batch under gradient accumulation; checked one micro-batch later, so the device never stalls),
            ``skip`` skips that step (or micro-batch) on every rank (one sync per step), ``ignore`` trains on.
        channels_last: Run the U-Net in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the U-Net for training (the first steps are slow while it compiles).
        init_weights: fit: start from a weights file (``celldiff export``): its weights in ``unet`` and ``ema_unet``.
    """

    # Hyperparameters that fix the parameter shapes and the diffusion process: the CLI takes them
    # from a checkpoint so that any config can load it.
    CHECKPOINT_ARCH_KEYS = ("image_channels", "class_conditional", "base_channels", "channel_mult", "num_res_blocks",
                            "attention_resolutions", "num_heads", "beta_schedule", "num_timesteps", "prediction_type",
                            "inpainting")  # fmt: skip

    def __init__(
        self,
        image_size: int = 64,
        image_channels: int = 3,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        class_conditional: bool = False,
        label_dropout: float = 0.1,
        guidance_scale: float = 1.0,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 4,
        dropout: float = 0.1,
        beta_schedule: str = "linear",
        num_timesteps: int = 1000,
        prediction_type: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        inpainting: bool = False,
        mask_loss_weight: float = 1.0,
        loss_on_mask_only: bool = False,
        resample_jump: int = 1,
        resample_times: int = 1,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        grad_clip_norm: float = 1.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        ema_start_step: int = 0,
        sampler: str = "ddpm",
        sampling_steps: int | None = None,
        sampling_spacing: str | None = None,
        ddim_eta: float = 0.0,
        use_ema: bool = True,
        samples_per_image: int = 1,
        noise_seed: int = 0,
        nonfinite_loss: str = "error",
        channels_last: bool = False,
        compile: bool = False,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_hyperparameters(self.hparams)
        # The network (x_t, masked image and mask for inpainting -> eps or v), its EMA copy (a frozen
        # submodule: it moves with the module, lands in the checkpoint, DDP ignores it) and the schedule.
        in_channels = 2 * image_channels + 1 if inpainting else image_channels
        self.unet = UNet(UNetConfig.from_mapping(self.hparams, in_channels=in_channels, out_channels=image_channels,
                                                 num_classes=num_classes if class_conditional else 0))  # fmt: skip
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.schedule = NoiseSchedule(beta_schedule, num_timesteps)
        self.denoiser = Denoiser(self.schedule, prediction_type, inpainting, num_classes, channels_last)
        self.loss = DiffusionLoss(self.schedule, prediction_type, loss_weighting, min_snr_gamma, mask_loss_weight,
                                  loss_on_mask_only, noise_seed)  # fmt: skip
        self.ema = EMA(ema_decay, ema_warmup, ema_start_step)
        self.register_load_state_dict_post_hook(_sync_ema_counter)
        self.nonfinite = NonFiniteGuard()
        self._compiled: dict[str, nn.Module] = {}  # kept out of the state dict

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and str(self.trainer.precision) == "16-true":
            raise UnsupportedPrecisionError(FP16_TRUE_MESSAGE)
        init_weights_for_fit(self, stage)  # --model.init_weights (fit only; a resumed checkpoint overrides it)
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.ema_unet.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit" and "unet" not in self._compiled:
            self._compiled["unet"] = torch.compile(self.unet)

    def network_condition(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """What the denoiser conditions on, from a batch: class labels, and the known image and mask."""
        condition: dict[str, Any] = {"class_labels": batch["label"] if self.hparams.class_conditional else None}
        if "mask" in batch:
            condition["known"], condition["mask"] = batch["image"], batch["mask"]
        elif self.hparams.inpainting and self.training:  # (sampling without a mask: generate() observes nothing)
            raise KeyError("an inpainting model needs a mask with every image: set data.masks (e.g. --data.masks box) "
                           "or give --data.predict_masks")  # fmt: skip
        return condition

    def network_forward(self, net: nn.Module, x_t: Tensor, t: Tensor, **condition: Any) -> Tensor:
        """``net``'s raw output (B, C, H, W) at x_t (B, C, H, W), t (B,) with its condition (the denoiser's)."""
        return self.denoiser.forward(net, x_t, t, condition)

    def diffusion_loss(self, x0: Tensor, t: Tensor, noise: Tensor, condition: dict[str, Any], net: nn.Module) -> Tensor:
        """Per-sample loss (B,) of ``net`` on images x0 (B, C, H, W) at timesteps t (B,) and noise (B, C, H, W)."""
        mask = condition.get("mask") if self.hparams.inpainting else None
        return self.loss(lambda x_t, t: self.denoiser.forward(net, x_t, t, condition), x0, t, noise, mask)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        x0, condition = batch["image"], self.network_condition(batch)
        labels = condition.get("class_labels")
        world = self.trainer.world_size if self._trainer is not None else 1
        draws = self.loss.draws(x0, self.global_step, batch_idx, self.global_rank, world, labels is not None)
        if labels is not None and self.hparams.label_dropout > 0:  # the null class, for guidance
            dropped = draws.label_drop < self.hparams.label_dropout
            condition["class_labels"] = torch.where(dropped, self.denoiser.null_class, labels)
        per_sample = self.diffusion_loss(x0, draws.t, draws.noise, condition, self._compiled.get("unet", self.unet))
        # sync_dist: the logged losses are the global batch's (an all-reduce, no host sync).
        if self.loss.weighting != "uniform":
            self.log("train/loss_unweighted", per_sample.mean(), batch_size=x0.shape[0], sync_dist=True)
        loss = self.loss.weighted(per_sample, draws.t).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        return self.nonfinite(self, self.hparams.nonfinite_loss, loss, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self.hparams.nonfinite_loss == "error":
            self.nonfinite.check(self)

    def _shared_eval_step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> Tensor:
        """The plain (unweighted) loss at stratified timesteps and noise fixed per batch index."""
        x0, condition = batch["image"], self.network_condition(batch)
        t, noise = self.loss.validation_draws(x0, batch_idx, self.global_rank)
        per_sample = self.diffusion_loss(x0, t, noise, condition, self.unet)
        loss = per_sample.mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=x0.shape[0], sync_dist=True)
        if self.hparams.use_ema:
            ema_loss = self.diffusion_loss(x0, t, noise, condition, self.ema_unet).mean()
            self.log(f"{stage}/loss_ema", ema_loss, batch_size=x0.shape[0], sync_dist=True)
        for name, value, count in self.loss.timestep_buckets(per_sample):
            self.log(f"{stage}/{name}", value, batch_size=count, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_eval_step(batch, batch_idx, "test")

    # ------------------------------------------------------------------ optimisation and EMA
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches if self._trainer else 1
        return adamw_with_warmup(self.unet.parameters(), hp.lr, total, hp.warmup_steps, hp.lr_schedule, hp.min_lr_ratio,
                                 tuple(hp.adam_betas), hp.weight_decay, fused=self.device.type == "cuda")  # fmt: skip

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip the gradient norm to ``grad_clip_norm`` (a ``--trainer.gradient_clip_val`` takes precedence)."""
        clip = gradient_clip_val if gradient_clip_val else self.hparams.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, clip, gradient_clip_algorithm or "norm")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """EMA of the weights after each optimizer step, without a device->host sync (see ``EMA.update``)."""
        self.ema.update(self.ema_unet, self.unet, self.global_step, self.ema_updates)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DiffusionModule:
        """Casts to bf16/fp16 (``*-true`` precisions) leave the EMA float32 (``keep_float32``)."""
        keep_float32(self._modules.get("ema_unet"), lambda: super(DiffusionModule, self)._apply(fn, recurse))
        return self

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        noise_seeds: Sequence[int] | Tensor,
        condition: dict[str, Any] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Sample images (B, C, H, W), float32 in [-1, 1], with one seeded generator per image.

        Args:
            noise_seeds: One seed per image (length B); image i depends only on its seed.
            condition: Network conditioning (see ``network_condition``); with a mask: inpainting.
            sampler, steps, guidance_scale: A name in ``SAMPLERS``, reverse steps, classifier-free guidance (defaults:
                the hyperparameters). callback: Called at every step with the sampler's state. progress: A progress bar.
        """
        hp, condition = self.hparams, dict(condition or {})
        if hp.inpainting and "mask" not in condition:  # nothing observed: generation (the "full" mask family)
            condition.update(nothing_observed(len(noise_seeds), hp.image_channels, hp.image_size, self.device))
        inpaint: dict[str, Any] = {}
        if "mask" in condition:  # inpainting by replacement, with RePaint resampling
            inpaint = dict(known=condition["known"].float(), missing_mask=condition["mask"],
                           resample_jump=hp.resample_jump, resample_times=hp.resample_times)  # fmt: skip
        net = self.ema_unet if hp.use_ema else self.unet
        model_fn = self.denoiser.model_fn(net, condition, hp.guidance_scale if guidance_scale is None else guidance_scale)
        shape = (len(noise_seeds), hp.image_channels, hp.image_size, hp.image_size)
        was_training = net.training
        net.eval()
        try:
            images = sample(model_fn, self.schedule, shape, method=check_sampler(sampler or hp.sampler),
                            steps=hp.sampling_steps if steps is None else steps, eta=hp.ddim_eta, spacing=hp.sampling_spacing,
                            generator=generators_from_seeds(noise_seeds), device=self.device, callback=callback,
                            progress=progress, **inpaint)  # fmt: skip
        finally:
            net.train(was_training)
        return images.clamp(-1, 1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate (or, when the batch has masks, inpaint) images for a predict batch.

        With masks, ``samples_per_image`` samples are drawn per image (and per requested class in
        ``target_classes``: a counterfactual per cell), each with its own seed. Returns ``images``
        (B, C, H, W), or (B, K, C, H, W) when inpainting, in [-1, 1], plus the batch's ``index``,
        ``label``, and for inpainting ``known``, ``mask`` and ``sample_labels`` (and ``path`` /
        ``mask_path`` of a user's images).
        """
        condition = self.network_condition(batch)
        out: dict[str, Any] = {"index": batch["index"]}
        if "mask" not in condition:
            out["images"] = self.generate(batch["noise_seed"], condition=condition)
        else:
            k, targets = self.hparams.samples_per_image, batch.get("target_classes")
            per_image = [(label, j) for label in ([None] if targets is None else targets.tolist()) for j in range(k)]
            seeds = [mix_seed(int(s), j) for s in batch["noise_seed"].tolist() for _, j in per_image]
            n = len(per_image)
            repeated = {key: value.repeat_interleave(n, dim=0) if isinstance(value, Tensor) else value
                        for key, value in condition.items()}  # fmt: skip
            if targets is not None:
                repeated["class_labels"] = targets.repeat_interleave(k).repeat(len(batch["index"]))
                out["sample_labels"] = targets.repeat_interleave(k)
            images = self.generate(seeds, condition=repeated)
            out.update(images=images.unflatten(0, (-1, n)), known=batch["image"], mask=batch["mask"])
        out.update({key: batch[key] for key in ("label", "path", "mask_path") if key in batch})
        return out
