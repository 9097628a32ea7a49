"""The eps-prediction U-Net (Ho et al. 2020, App. B; Nichol & Dhariwal 2021 refinements): a network only.

The network knows nothing about the diffusion schedule: it maps (x_t, t, class label) to a tensor
of the same spatial size. Structure: sinusoidal timestep embedding -> MLP; residual blocks with
the embedding injected into every block (scale-shift of the second GroupNorm by default);
multi-head self-attention at chosen resolutions and in the middle; strided-conv downsampling,
nearest + conv upsampling; skip connections; zero-initialised residual branches and output conv,
so a fresh network outputs exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; DDPM App. B).

    Args:
        t: Timesteps, shape (B,), long or float.
        dim: Embedding width.
        max_period: Longest wavelength.

    Returns:
        ``[cos(t * f_k), sin(t * f_k)]`` with f_k = max_period^(-k / (dim // 2)), float32 (B, dim)
        (zero-padded when ``dim`` is odd).
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``num_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with timestep injection.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (1x1 skip conv when different).
        emb_dim: Width of the timestep (+ class) embedding.
        dropout: Dropout before the second conv.
        num_groups: GroupNorm groups (clamped to divide the channels).
        use_scale_shift_norm: Inject the embedding as h = norm(h) (1 + scale) + shift (Nichol &
            Dhariwal 2021) instead of adding it before the second norm (Ho et al.).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool = True,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(
            emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels
        )
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, in, H, W); emb: (B, emb_dim) -> (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output.

    Args:
        channels: Channels C (divisible by ``num_heads``).
        num_heads: Attention heads.
        num_groups: GroupNorm groups (clamped to divide C).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        # reshape, not view, so channels_last works; (B, 3, heads, d, HW) -> 3 x (B, heads, HW, d)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the layers that take one (ResBlocks)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's arguments: the one place they are listed (``UNet(**kwargs)`` and the diffusion module read it).

    Args:
        in_channels: Input channels (3 for RGB; more when conditions are concatenated, e.g. 7 =
            x_t + masked image + mask for inpainting).
        out_channels: Output channels (eps has the image's channels).
        base_channels: Channels at the first level; the embedding width is 4x this.
        channel_mult: Channel multiplier per resolution level; the image is halved between levels.
        num_res_blocks: Residual blocks per level on the way down (one more on the way up).
        attention_resolutions: Feature-map sizes (for ``image_size`` inputs) that get
            self-attention, e.g. 16 = the 16x16 level of a 64x64 model.
        image_size: Nominal input size, used to place attention; H and W must be divisible
            by 2 ** (len(channel_mult) - 1).
        dropout: Dropout in the residual blocks.
        num_heads: Attention heads (must divide the channels where attention is used).
        num_groups: GroupNorm groups, clamped per layer to a divisor of its channels.
        num_classes: Number of classes for class conditioning (0 = unconditional). Index
            ``num_classes`` is the null class (no / dropped label); it is what ``class_labels=None``
            uses, so the class embedding always takes part in the graph (DDP-safe).
        use_scale_shift_norm: Scale-shift timestep injection (else additive).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    image_size: int = 64
    dropout: float = 0.1
    num_heads: int = 4
    num_groups: int = 32
    num_classes: int = 0
    use_scale_shift_norm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        counts = ("in_channels", "out_channels", "base_channels", "num_res_blocks", "num_heads", "num_groups", "image_size")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**(len(channel_mult) - 1) = {factor}")
        reachable = [self.image_size // 2**level for level in range(len(self.channel_mult))]
        unreachable = [r for r in self.attention_resolutions if r not in reachable]
        if unreachable:
            raise ValueError(
                f"attention_resolutions {unreachable} are not feature-map sizes of this model; reachable: {reachable}"
            )
        # Attention runs at the listed levels and in the middle (the last level's channels).
        attention_levels = [reachable.index(r) for r in self.attention_resolutions] + [len(self.channel_mult) - 1]
        for level in attention_levels:
            channels = self.channel_mult[level] * self.base_channels
            if channels % self.num_heads:
                raise ValueError(f"num_heads {self.num_heads} must divide the {channels} attention channels")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> UNetConfig:
        """A config from the entries of ``values`` named like its fields (others ignored), then ``overrides``."""
        named = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        return cls(**{**named, **overrides})


class UNet(nn.Module):
    """eps-prediction U-Net for (B, in_channels, H, W) images.

    Built from a :class:`UNetConfig` (``UNet(config)``) or its fields as keywords (``UNet(base_channels=32)``).
    """

    def __init__(self, config: UNetConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("UNet takes a UNetConfig or keyword arguments, not both")
        self.config = config
        base_channels, channel_mult, num_groups = config.base_channels, config.channel_mult, config.num_groups
        attention_resolutions = config.attention_resolutions
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.base_channels = base_channels
        self.num_classes = config.num_classes
        self.null_class = config.num_classes
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * base_channels

        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes > 0 else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, config.dropout, num_groups, config.use_scale_shift_norm)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, config.num_heads, num_groups)

        # Encoder: every block's output is a skip connection for the decoder.
        self.down = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, base_channels, 3, padding=1))])
        skip_channels = [base_channels]
        ch, resolution = base_channels, config.image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * base_channels)]
                ch = mult * base_channels
                if resolution in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2

        self.middle = EmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * base_channels)]
                ch = mult * base_channels
                if resolution in attention_resolutions:
                    layers.append(attention(ch))
                if level != 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, num_groups), nn.SiLU(), zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Predict eps.

        Args:
            x: Noisy input (B, in_channels, H, W).
            t: Timesteps (B,), long or float (a scalar is broadcast).
            class_labels: (B,) long in [0, num_classes] (num_classes = null class), or None
                (all null). Must be None for an unconditional model.

        Returns:
            (B, out_channels, H, W), in the compute dtype (the autocast dtype under autocast).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(
                f"H and W must be divisible by {self.downsample_factor}, got {tuple(x.shape[-2:])}"
            )
        batch = x.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        emb = self.time_embed(
            timestep_embedding(t, self.base_channels).to(self.time_embed[0].weight.dtype)
        )
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full(
                    (batch,), self.null_class, dtype=torch.long, device=x.device
                )
            elif not (self.training or torch.compiler.is_compiling()):
                # The value check reads the labels on the host (a device sync): done when
                # sampling/evaluating, not in the training hot path.
                _check_labels(class_labels, batch, self.num_classes)
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes=0)")

        h = x
        skips = []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def _check_labels(class_labels: Tensor, batch: int, num_classes: int) -> None:
    if (
        class_labels.shape != (batch,)
        or class_labels.is_floating_point()
        or class_labels.is_complex()
    ):
        raise ValueError(
            f"class_labels must be integers of shape ({batch},), got {class_labels.dtype} "
            f"{tuple(class_labels.shape)}"
        )
    if bool(((class_labels < 0) | (class_labels > num_classes)).any()):
        raise ValueError(
            f"class_labels must lie in [0, {num_classes}] ({num_classes} = null class), "
            f"got min {int(class_labels.min())}, max {int(class_labels.max())}"
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with requires_grad if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
