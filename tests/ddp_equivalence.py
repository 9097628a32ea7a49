"""Run by tests/test_ddp.py: train the same global batches on 1 process or on 2 (gloo) and save the result.

    python tests/ddp_equivalence.py OUT.pt WORLD
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from celldiff.module import DiffusionModule

GLOBAL_BATCH, STEPS, SIZE = 8, 6, 16


class GlobalBatches(L.LightningDataModule):
    """The same global batches for every world size; rank r gets the r-th contiguous slice."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(STEPS, GLOBAL_BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1
        labels = torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=g)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        b = GLOBAL_BATCH // world
        items = [{"image": images[s, rank * b : (rank + 1) * b], "label": labels[s, rank * b : (rank + 1) * b]}
                 for s in range(STEPS)]  # fmt: skip
        return torch.utils.data.DataLoader(items, batch_size=None)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main(out: str, world: int) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = DiffusionModule(
        image_size=SIZE, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
        num_heads=2, dropout=0.0, num_timesteps=50, class_conditional=True, num_classes=4, label_dropout=0.3,
        lr=1e-3, warmup_steps=2, ema_decay=0.9,
    )  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=STEPS,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(module, datamodule=GlobalBatches())
    if trainer.is_global_zero:
        torch.save({"losses": recorder.losses, "ema": module.ema_unet.state_dict(), "steps": trainer.global_step}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
