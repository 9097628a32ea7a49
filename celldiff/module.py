"""DiffusionModule: the LightningModule that trains a U-Net as an ε-predicting DDPM.

The module owns the network (``unet``), its exponential moving average (``ema_unet``) and the
noise schedule. The sampler (``celldiff.sampler``) never owns the network: the module hands it a
``model_fn(x_t, t) -> eps`` closure. The module knows nothing of ranks except that the noise
generator is offset by ``global_rank`` so that DDP ranks do not draw identical noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from celldiff.data import mix_seed as _mix_seed
from celldiff.masks import inpainting_condition
from celldiff.sampler import SAMPLING_METHODS, guided_model_fn
from celldiff.sampler import sample as run_sampler
from celldiff.schedule import LOSS_WEIGHTINGS, NoiseSchedule, min_snr_weight
from celldiff.unet import UNet

# Validation loss is also reported in these timestep ranges (fractions of T): the loss at small t
# (fine detail) and large t (global structure) move very differently during training.
TIMESTEP_BUCKETS = 4
SAMPLERS = SAMPLING_METHODS  # ("ddpm", "ddim", "dpmsolver")
NONFINITE_POLICIES = ("error", "skip", "ignore")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class UnsupportedPrecisionError(ValueError):
    """A ``--trainer.precision`` this model cannot train under; reported as one line."""


# Pure float16 weights train to NaN in one AdamW step: its eps (1e-8) and most squared gradients
# underflow to 0 in float16 (0 / 0), and *-true has no loss scaler. Inference in 16-true works.
FP16_TRUE_MESSAGE = (
    "--trainer.precision 16-true cannot train this model (float16 weights without loss scaling: "
    "AdamW's eps and squared gradients underflow, NaN after one step); use bf16-true, bf16-mixed, "
    "or 16-mixed on a GPU (16-true works for validate, test and predict)"
)


def generators_from_seeds(seeds: Sequence[int] | Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, so sample i is the same whatever the batch it is drawn in."""
    if isinstance(seeds, Tensor):
        seeds = seeds.tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio`` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _loss_dtype(x: Tensor) -> torch.dtype:
    """The dtype of noise and loss arithmetic for images ``x``: at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _network_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The floating dtype of ``net``'s parameters (bf16/fp16 under ``*-true`` precisions)."""
    for param in net.parameters():
        if param.is_floating_point():
            return param.dtype
    return default


def _sync_ema_counter(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the host-side EMA counter follows the loaded buffer."""
    module._ema_updates_host = int(module.ema_updates)


class _PendingFinite:
    """A micro-batch's is-finite flag on its way to the host (copied without waiting).

    On CUDA the copy is asynchronous: the host may read it only once ``event`` has passed.
    Waiting on that event when the next micro-batch starts costs nothing in practice (the device
    finished that forward long ago; it is still busy with the backward queued after it).
    """

    def __init__(self, step: int, batch_idx: int, finite: Tensor, loss: Tensor) -> None:
        self.step, self.batch_idx, self.loss = step, batch_idx, loss
        self.event: torch.cuda.Event | None = None
        if finite.device.type == "cuda":
            self.flag = finite.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(finite.device))
        else:  # CPU: the flag itself; other devices: a plain (ordered) copy
            self.flag = finite.to("cpu")

    def is_finite(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # the copy has landed (usually long ago): no stall
        return bool(self.flag)


class DiffusionModule(L.LightningModule):
    """DDPM with ε-prediction (Ho et al. 2020) on a timestep-conditioned U-Net.

    Args:
        image_size: Side of the square training images (linked from ``data.image_size``).
        image_channels: Channels of the images (3 for RGB).
        num_classes: Number of cell classes in the data (linked from the data module). Only used
            when ``class_conditional`` is true.
        class_names: Names of the classes (linked from the data module); used in file names.
        class_conditional: Condition the U-Net on the class label with a learned embedding added
            to the timestep embedding (Phase 3).
        label_dropout: Class-conditional training: probability of replacing a label by the null
            class, so the same network also learns the unconditional model (classifier-free
            guidance, Ho & Salimans 2022). The null embedding is always in the graph.
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
        prediction_type: What the network predicts: ``eps`` (ε, Ho et al.; the default) or ``v``
            (Salimans & Ho 2022), which learns the image's colour and layout at high noise much
            sooner (useful for short CPU runs). Samplers always receive ε.
        loss_weighting: Per-timestep weight of the training loss: ``uniform`` (the plain MSE of
            Ho et al.) or ``min_snr`` (Min-SNR-γ, Hang et al. 2023: min(SNR, γ) / SNR for ε,
            min(SNR, γ) / (SNR + 1) for v, SNR = abar / (1 - abar)), which stops the easy
            low-noise steps from dominating. Validation and test losses stay the plain MSE.
        min_snr_gamma: The clamp γ of ``min_snr`` (> 0; 5 in the paper).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        warmup_steps: Linear learning-rate warm-up steps.
        lr_schedule: ``cosine`` (decay to ``min_lr_ratio * lr`` at the last step) or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for the cosine schedule.
        grad_clip_norm: Clip the gradient norm to this value (0 disables).
        ema_decay: Decay of the exponential moving average of the weights.
        ema_warmup: Use the decay warm-up ``min(decay, (1 + n) / (10 + n))`` so early EMA weights
            are not dominated by the random initialisation.
        ema_start_step: Optimizer steps before the EMA starts averaging (until then it copies).
        inpainting: Phase 2: the U-Net also sees the masked image and the mask
            (``cat(x_t, masked_image, mask)``, 2 * image_channels + 1 input channels) and the
            batches must carry masks (``data.masks``). Any model inpaints by replacement at
            sampling when the batch has a mask; this one is trained for it.
        mask_loss_weight: Inpainting: weight of the squared error inside the mask relative to
            outside (1 = plain MSE over the whole image; e.g. 10 stresses the missing region).
        loss_on_mask_only: Inpainting: compute the loss inside the mask only.
        resample_jump: RePaint jump length (reverse steps) when inpainting at sampling.
        resample_times: RePaint resamplings per jump (1 = plain replacement).
        sampler: ``ddpm`` (ancestral, Ho et al. Alg. 2), ``ddim`` (Song et al.) or ``dpmsolver``
            (DPM-Solver++ 2M, Lu et al. 2022; deterministic given x_T, "trailing" timesteps).
        sampling_steps: Reverse steps; ``None`` means T for ``ddpm``, 50 for ``ddim`` and 20 for
            ``dpmsolver``.
        ddim_eta: DDIM stochasticity (0 = deterministic).
        use_ema: Sample with the EMA weights (validation grids, predict).
        samples_per_image: Inpainting predict: samples drawn per masked image (diversity).
        noise_seed: Seed of the training/validation noise and timesteps; offset by rank and step.
        nonfinite_loss: What a NaN/inf training loss does: ``error`` stops the run with a message
            naming the step (and, under gradient accumulation, the batch; checked at the next
            micro-batch, so the device never stalls), ``skip`` skips that optimizer step (under
            accumulation: that micro-batch) on every rank (one sync per step), ``ignore`` trains on.
        channels_last: Run the U-Net in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the U-Net for training (the first steps are slow while it compiles).
    """

    # Hyperparameters that fix the parameter shapes and the diffusion process: the CLI takes them
    # from a checkpoint so that any config can load it.
    CHECKPOINT_ARCH_KEYS = (
        "image_channels",
        "class_conditional",
        "base_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "num_heads",
        "beta_schedule",
        "num_timesteps",
        "prediction_type",
        "inpainting",
    )

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
        ddim_eta: float = 0.0,
        use_ema: bool = True,
        samples_per_image: int = 1,
        noise_seed: int = 0,
        nonfinite_loss: str = "error",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"model.lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"model.label_dropout must be in [0, 1), got {label_dropout}")
        if class_conditional and num_classes < 1:
            raise ValueError("model.class_conditional needs num_classes >= 1 (linked from the data module)")
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"model.prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"model.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        if mask_loss_weight <= 0:
            raise ValueError(f"model.mask_loss_weight must be > 0, got {mask_loss_weight}")
        if resample_jump < 1 or resample_times < 1:
            raise ValueError("model.resample_jump and model.resample_times must be >= 1")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        # Numbers that cannot work (issue 13, CLI engineer): one line from the CLI instead of a traceback later.
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        for name, value in (("num_timesteps", num_timesteps), ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                            ("num_heads", num_heads), ("image_size", image_size), ("samples_per_image", samples_per_image)):  # fmt: skip
            if not value >= 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        for name, value in (("warmup_steps", warmup_steps), ("weight_decay", weight_decay), ("grad_clip_norm", grad_clip_norm),
                            ("ddim_eta", ddim_eta), ("ema_start_step", ema_start_step), ("guidance_scale", guidance_scale)):  # fmt: skip
            if not value >= 0:
                raise ValueError(f"model.{name} must be >= 0, got {value}")
        if not 0.0 <= min_lr_ratio <= 1.0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1] and model.dropout in [0, 1), got {min_lr_ratio}, {dropout}")
        if not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"model.adam_betas must be in [0, 1), got {list(adam_betas)}")
        if sampling_steps is not None and sampling_steps < 1:
            raise ValueError(f"model.sampling_steps must be >= 1 (or null: the sampler's default), got {sampling_steps}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if not (isinstance(min_snr_gamma, (int, float)) and math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise ValueError(f"model.min_snr_gamma must be a finite number > 0, got {min_snr_gamma!r}")
        self.save_hyperparameters()
        self.unet = UNet(
            in_channels=self.network_in_channels,
            out_channels=image_channels,
            base_channels=base_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            image_size=image_size,
            dropout=dropout,
            num_heads=num_heads,
            num_classes=num_classes if class_conditional else 0,
        )
        # The EMA copy is a frozen submodule: it moves with the module, lands in the checkpoint,
        # and DDP ignores it (no parameter requires grad).
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        # Host copy of ``ema_updates``: the EMA step reads it, never the buffer (a device->host
        # sync per step). The buffer is still advanced on the device for the checkpoint, and any
        # load_state_dict (resume, load_from_checkpoint, a weights file) re-reads it once.
        self._ema_updates_host = 0
        self.register_load_state_dict_post_hook(_sync_ema_counter)
        self.schedule = NoiseSchedule(beta_schedule, num_timesteps)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_finite: _PendingFinite | None = None  # the last micro-batch's flag, checked next
        self._compiled: dict[str, nn.Module] = {}  # kept out of the state dict

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and str(self.trainer.precision) == "16-true":
            raise UnsupportedPrecisionError(FP16_TRUE_MESSAGE)
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.ema_unet.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit" and "unet" not in self._compiled:
            self._compiled["unet"] = torch.compile(self.unet)

    @property
    def train_network(self) -> nn.Module:
        """The network the training step runs: the compiled U-Net when ``compile`` is on."""
        return self._compiled.get("unet", self.unet)

    # ------------------------------------------------------------------ conditioning
    @property
    def network_in_channels(self) -> int:
        """Channels the U-Net sees: x_t, plus masked image and mask when inpainting."""
        channels = self.hparams.image_channels
        return 2 * channels + 1 if self.hparams.inpainting else channels

    def network_condition(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """What the sampler and the loss condition on, from a batch: labels, known image, mask."""
        condition: dict[str, Any] = {"class_labels": batch["label"] if self.hparams.class_conditional else None}
        if "mask" in batch:
            condition["known"] = batch["image"]
            condition["mask"] = batch["mask"]
        elif self.hparams.inpainting:
            raise KeyError(
                "an inpainting model needs a mask with every image: set data.masks (e.g. --data.masks box) "
                "or give --data.predict_masks"
            )
        return condition

    @property
    def null_class(self) -> int:
        """Label index of the null (unconditional) class embedding."""
        return int(self.hparams.num_classes)

    def network_forward(self, net: nn.Module, x_t: Tensor, t: Tensor, **condition: Any) -> Tensor:
        """Run ``net`` on ``x_t`` with its conditioning (inpainting: 7-channel input)."""
        # The schedule, the loss and the samplers work in float32/float64; the network gets its
        # input in its own parameter dtype (bf16/fp16 under --trainer.precision *-true; under
        # autocast, *-mixed, the parameters are float32 and this is a no-op).
        dtype = _network_dtype(net, x_t.dtype)
        x_t = x_t.to(dtype)
        if self.hparams.inpainting:
            extra = inpainting_condition(condition["known"], condition["mask"]).to(dtype)
            x_t = torch.cat([x_t, extra], dim=1)
        return net(self._layout(x_t), t, class_labels=condition.get("class_labels"))

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    # ------------------------------------------------------------------ randomness
    def _generator(self, *seed_parts: int, per_rank: bool = True) -> torch.Generator:
        """A generator on this module's device, reseeded from (noise_seed, [rank,] *seed_parts).

        Reseeding from the step makes the noise a pure function of (seed, rank, step), so a
        resumed run draws exactly the noise the uninterrupted run would have drawn.
        """
        device = self.device
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        rank = (self.global_rank,) if per_rank else ()
        gen.manual_seed(_mix_seed(self.hparams.noise_seed, *rank, *seed_parts))
        return gen

    def _training_randomness(
        self, batch_size: int, batch_idx: int, with_labels: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Timesteps, noise and label-dropout draws of this rank's share of the global batch.

        Every rank draws the whole global batch's randomness from the same (seed, step) generator
        and keeps its own slice: each rank gets different noise, and N processes with batch b
        train exactly like one process with batch N * b on the same images.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank
        total = world * batch_size
        gen = self._generator(0, self.global_step, batch_idx, per_rank=False)  # batch_idx: accumulation
        device, shape = self.device, (self.hparams.image_channels, self.hparams.image_size, self.hparams.image_size)
        t = torch.randint(0, self.schedule.num_timesteps, (total,), device=device, generator=gen)
        # Explicit float32: under --trainer.precision *-true Lightning makes bf16/fp16 the default
        # dtype inside the step, which would quantise the noise (the target of the loss).
        noise = torch.randn((total, *shape), device=device, dtype=torch.float32, generator=gen)
        drop = torch.rand((total,), device=device, dtype=torch.float32, generator=gen) if with_labels else None
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        return t[mine], noise[mine], drop[mine] if drop is not None else None

    # ------------------------------------------------------------------ loss
    def diffusion_loss(
        self, x0: Tensor, t: Tensor, noise: Tensor, condition: dict[str, Any], net: nn.Module
    ) -> Tensor:
        """Per-sample ε-prediction MSE (Ho et al. eq. 14), in float32. Returns shape (B,).

        With ``prediction_type="v"`` the target is v = sqrt(abar) ε - sqrt(1 - abar) x0 instead.

        When inpainting with ``mask_loss_weight != 1`` or ``loss_on_mask_only``, a per-pixel
        weighted mean: weight 1 outside the mask and ``mask_loss_weight`` inside (or 0 / 1).
        """
        hp = self.hparams
        x_t = self.schedule.q_sample(x0, t, noise)
        output = self.network_forward(net, x_t, t, **condition)
        target = noise if hp.prediction_type == "eps" else self.velocity(x0, t, noise)
        error = F.mse_loss(output.float(), target.float(), reduction="none")
        if not hp.inpainting or (hp.mask_loss_weight == 1.0 and not hp.loss_on_mask_only):
            return error.flatten(1).mean(1)
        mask = condition["mask"].float().expand_as(error)
        weight = mask if hp.loss_on_mask_only else 1.0 + (hp.mask_loss_weight - 1.0) * mask
        return (weight * error).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the training loss at timesteps ``t`` (B,), float32.

        ``min_snr``: Min-SNR-γ for this model's prediction type, from the float64 alpha_bar
        (see ``celldiff.schedule.min_snr_weight``); ``uniform``: ones.
        """
        hp = self.hparams
        if hp.loss_weighting == "uniform":
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        alpha_bar = self.schedule.alpha_bar[t.to(self.schedule.alpha_bar.device)]
        return min_snr_weight(alpha_bar, hp.min_snr_gamma, hp.prediction_type).to(t.device, torch.float32)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0 = batch["image"]
        condition = self.network_condition(batch)
        labels = condition.get("class_labels")
        t, noise, drop = self._training_randomness(x0.shape[0], batch_idx, labels is not None)
        noise = noise.to(_loss_dtype(x0))  # float32 (or float64), never the bf16 of a *-true batch
        if labels is not None and self.hparams.label_dropout > 0:
            condition["class_labels"] = torch.where(drop < self.hparams.label_dropout, self.null_class, labels)
        per_sample = self.diffusion_loss(x0, t, noise, condition, self.train_network)
        if self.hparams.loss_weighting == "min_snr":  # "uniform" multiplies by nothing
            # sync_dist: the logged losses are the global batch's (an all-reduce, no host sync).
            self.log("train/loss_unweighted", per_sample.mean(), batch_size=x0.shape[0], sync_dist=True)
            per_sample = per_sample * self.loss_weight(t)
        loss = per_sample.mean()
        # sync_dist: the logged loss is the global batch's (an all-reduce, no host sync).
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        return self._guard_nonfinite(loss, batch_idx)

    def _accumulating(self) -> bool:
        return self._trainer is not None and self.trainer.accumulate_grad_batches > 1

    def _where(self, step: int, batch_idx: int) -> str:
        """'step 7', or under gradient accumulation 'step 7 (batch 15)': which micro-batch."""
        return f"step {step} (batch {batch_idx})" if self._accumulating() else f"step {step}"

    def _guard_nonfinite(self, loss: Tensor, batch_idx: int = 0) -> Tensor | None:
        policy = self.hparams.nonfinite_loss
        if policy == "ignore":
            return loss
        finite = torch.isfinite(loss.detach())
        if policy == "skip":
            # Every rank must agree, or DDP would wait forever for the rank that skipped.
            all_finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
            if not bool(all_finite):
                self._skipped_steps = getattr(self, "_skipped_steps", 0) + 1
                # Under gradient accumulation only this micro-batch is left out of the step.
                what = "batch skipped" if self._accumulating() else "step skipped"
                self.print(f"celldiff: non-finite loss at {self._where(self.global_step, batch_idx)}; {what}")
                return None
            return loss
        # "error": copy the flag to the host without waiting, and look at it at the next
        # micro-batch (under gradient accumulation several share one global_step, so each keeps
        # its own step and batch index); raising then stops the run before a second bad step.
        self._check_pending_finite()
        self._pending_finite = _PendingFinite(self.global_step, batch_idx, finite, loss.detach())
        return loss

    def _check_pending_finite(self) -> None:
        pending, self._pending_finite = self._pending_finite, None
        if pending is not None and not pending.is_finite():
            raise NonFiniteLossError(
                f"training loss is {pending.loss.item()} at {self._where(pending.step, pending.batch_idx)}: "
                "stopping (lower model.lr, use --trainer.precision 32-true or bf16-mixed, or set "
                "model.nonfinite_loss skip)"
            )

    def on_train_epoch_end(self) -> None:
        if self.hparams.nonfinite_loss == "error":
            self._check_pending_finite()

    def _stratified_timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        """Evenly spread timesteps over [0, T): a low-variance, repeatable validation estimate."""
        steps = self.schedule.num_timesteps
        # float64 explicitly: under *-true precisions the default dtype is bf16/fp16 in the step.
        grid = torch.arange(batch_size, device=device, dtype=torch.float64)
        return ((grid + 0.5) * steps / batch_size).long()

    def _shared_eval_step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> Tensor:
        x0 = batch["image"]
        b = x0.shape[0]
        t = self._stratified_timesteps(b, x0.device)
        # Fixed noise per batch index: validation losses of different epochs are comparable.
        noise = torch.randn(x0.shape, device=x0.device, dtype=_loss_dtype(x0), generator=self._generator(1, batch_idx))
        condition = self.network_condition(batch)
        per_sample = self.diffusion_loss(x0, t, noise, condition, self.unet)
        loss = per_sample.mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=b, sync_dist=True)
        if self.hparams.use_ema:
            ema_loss = self.diffusion_loss(x0, t, noise, condition, self.ema_unet).mean()
            self.log(f"{stage}/loss_ema", ema_loss, batch_size=b, sync_dist=True)
        # Bucket counts are known on the host (t is deterministic), so logging needs no sync.
        steps = self.schedule.num_timesteps
        host_t = self._stratified_timesteps(b, torch.device("cpu"))
        for k in range(TIMESTEP_BUCKETS):
            lo, hi = k * steps // TIMESTEP_BUCKETS, (k + 1) * steps // TIMESTEP_BUCKETS
            in_bucket = (host_t >= lo) & (host_t < hi)
            count = int(in_bucket.sum())
            if count:
                value = per_sample[in_bucket.to(per_sample.device)].mean()
                self.log(f"{stage}/loss_t{lo:04d}-{hi:04d}", value, batch_size=count, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_eval_step(batch, batch_idx, "test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = self.device.type == "cuda"  # fused AdamW: one kernel per step on GPU
        optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay, fused=fused
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val else self.hparams.grad_clip_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA of the weights after each optimizer step (identical on every DDP rank).

        No device->host sync: the warm-up reads the host-side counter (restored from the
        ``ema_updates`` buffer whenever a state dict is loaded) and the buffer is advanced on the
        device. Under ``*-true`` precisions the EMA stays float32 (see ``_apply``), so the lerp
        runs in float32 on a float32 copy of the bf16/fp16 weights.
        """
        hp = self.hparams
        n = self._ema_updates_host
        if self.global_step < hp.ema_start_step:
            decay = 0.0
        else:
            decay = min(hp.ema_decay, (1 + n) / (10 + n)) if hp.ema_warmup else hp.ema_decay
            self._ema_updates_host = n + 1
            self.ema_updates.add_(1)  # on the device, for the checkpoint
        ema_params = list(self.ema_unet.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(self.unet.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.ema_unet.buffers(), self.unet.buffers(), strict=True):
            ema_buf.copy_(buf)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DiffusionModule:
        """Keep the EMA weights float32 when the module is cast to bf16/fp16.

        Lightning's ``*-true`` precisions call ``module.to(bfloat16)`` on the whole module. An EMA
        stored in bf16 would stop moving: with decay 0.9999 each update is 1e-4 of the gap, far
        below bf16's resolution (2^-8 relative). Device moves and casts to float32/float64 apply
        as usual; the EMA network then samples in float32 (``network_forward`` casts its input).
        """
        ema = self._modules.get("ema_unet")
        kept = []
        if ema is not None:
            for module in ema.modules():
                for store in (module._parameters, module._buffers):
                    for name, value in store.items():
                        if value is not None and value.dtype == torch.float32:
                            kept.append((store, name, value.data))  # .data: the float32 storage itself
        super()._apply(fn, recurse)
        for store, name, original in kept:
            value = store[name]
            if value is not None and value.dtype in (torch.float16, torch.bfloat16):
                restored = original.to(value.device)
                if isinstance(value, nn.Parameter):
                    value.data = restored
                else:
                    store[name] = restored
        return self

    # ------------------------------------------------------------------ sampling
    def sampling_network(self) -> nn.Module:
        return self.ema_unet if self.hparams.use_ema else self.unet

    def make_model_fn(
        self, net: nn.Module, condition: dict[str, Any], guidance_scale: float | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """Close the network and the conditioning over a ``model_fn(x_t, t) -> eps``.

        For a class-conditional model with labels, classifier-free guidance with
        ``guidance_scale`` (default: the hyperparameter) combines the conditional and the
        null-class predictions; scale 1 and 0 give exactly one of the two.
        """
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        labels = condition.get("class_labels")
        if labels is not None and scale != 1.0:
            unconditional = {**condition, "class_labels": torch.full_like(labels, self.null_class)}
            return guided_model_fn(
                self.make_model_fn(net, condition, 1.0), self.make_model_fn(net, unconditional, 1.0), scale
            )

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            output = self.network_forward(net, x_t, t, **condition).float()
            if self.hparams.prediction_type == "v":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
                alpha_bar = self.schedule.alpha_bar[t].view(-1, 1, 1, 1)
                output = (alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t).float()
            return output

        return model_fn

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = sqrt(abar_t) ε - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, eq. 9 ff.), float32."""
        alpha_bar = self.schedule.alpha_bar[t].view(-1, 1, 1, 1)
        return (alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * x0.double()).float()

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
        """Sample images with one seeded generator per image.

        Args:
            noise_seeds: One seed per image (length B); image i depends only on its seed.
            condition: Network conditioning (see ``network_condition``).
            sampler: ``ddpm``, ``ddim`` or ``dpmsolver``; default from the hyperparameters.
            steps: Reverse steps; default from the hyperparameters.
            callback: Called at every reverse step with the sampler's state dict.
            progress: Show a progress bar.
            guidance_scale: Classifier-free guidance scale; default from the hyperparameters.

        Returns:
            Images (B, C, H, W), float32 in [-1, 1].
        """
        hp = self.hparams
        method = sampler or hp.sampler
        if method not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {method!r}")
        n = len(noise_seeds)
        shape = (n, hp.image_channels, hp.image_size, hp.image_size)
        net = self.sampling_network()
        was_training = net.training
        net.eval()
        try:
            images = run_sampler(
                self.make_model_fn(net, condition or {}, guidance_scale),
                self.schedule,
                shape,
                method=method,
                steps=steps if steps is not None else hp.sampling_steps,
                eta=hp.ddim_eta,
                generator=generators_from_seeds(noise_seeds),
                device=self.device,
                **self._inpainting_kwargs(condition or {}),
                callback=callback,
                progress=progress,
            )
        finally:
            net.train(was_training)
        return images.clamp(-1, 1)

    def _inpainting_kwargs(self, condition: dict[str, Any]) -> dict[str, Any]:
        """Replacement (and RePaint) arguments of the sampler when the condition has a mask."""
        if "mask" not in condition:
            return {}
        return {
            "known": condition["known"].float(),
            "missing_mask": condition["mask"],
            "resample_jump": self.hparams.resample_jump,
            "resample_times": self.hparams.resample_times,
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate (or, when the batch has masks, inpaint) images for a predict batch.

        With masks, ``samples_per_image`` samples are drawn per image, each with its own seed.
        Returns ``images`` (B, C, H, W), or (B, K, C, H, W) when inpainting, in [-1, 1], plus the
        batch's ``index``, ``label``, and for inpainting ``known`` and ``mask`` (and ``path`` /
        ``mask_path`` of a user's images).
        """
        condition = self.network_condition(batch)
        if "mask" not in condition:
            images = self.generate(batch["noise_seed"], condition=condition)
            out = {"images": images, "index": batch["index"]}
        else:
            k = self.hparams.samples_per_image
            # Class-conditional inpainting as each requested class: a counterfactual per cell.
            targets = batch.get("target_classes")
            labels = [None] if targets is None else targets.tolist()
            per_image = [(label, j) for label in labels for j in range(k)]
            seeds = [_mix_seed(int(s), j) for s in batch["noise_seed"].tolist() for _, j in per_image]
            n = len(per_image)
            repeated = {
                key: value.repeat_interleave(n, dim=0) if isinstance(value, Tensor) else value
                for key, value in condition.items()
            }
            if targets is not None:
                repeated["class_labels"] = targets.repeat_interleave(k).repeat(len(batch["index"]))
            images = self.generate(seeds, condition=repeated)
            out = {
                "images": images.unflatten(0, (-1, n)),
                "index": batch["index"],
                "known": batch["image"],
                "mask": batch["mask"],
            }
            if targets is not None:
                out["sample_labels"] = targets.repeat_interleave(k)
        for key in ("label", "path", "mask_path"):
            if key in batch:
                out[key] = batch[key]
        return out
