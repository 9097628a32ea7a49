"""A tiny DiffusionModule and a few fixed images to train it on (shared by the training and diffusion tests)."""

from __future__ import annotations

import lightning as L
import torch

from celldiff.training.module import DiffusionModule

TINY = dict(
    image_size=16,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
    dropout=0.0,
    num_timesteps=100,
)


def tiny_module(**overrides) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(**{**TINY, **overrides})


class FixedImages(L.LightningDataModule):
    """A handful of real-looking images (smooth random blobs), repeated as one batch per step."""

    def __init__(self, n: int = 8, size: int = 16, steps: int = 200) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.images = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
        self.steps = steps

    def train_dataloader(self):
        items = [{"image": self.images, "label": torch.zeros(len(self.images), dtype=torch.long)}] * self.steps
        return torch.utils.data.DataLoader(items, batch_size=None)


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer: no logger, checkpoints, progress bar or model summary (unless given)."""
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})
