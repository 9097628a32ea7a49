"""Run by tests/training/test_ddp.py: train the same global batches on 1 process or on 2 (gloo) and save the result.

    python tests/training/ddp_equivalence.py OUT.pt WORLD            # the model: same global batches in, same weights out
    python tests/training/ddp_equivalence.py OUT.pt WORLD DATA_DIR   # the data: CellDataModule with masks and
        augmentation; every rank saves the batches it trained on to OUT.pt.rank<R>
"""

from __future__ import annotations

import sys

import lightning as L
import torch

from celldiff.data import CellDataModule
from celldiff.images import to_uint8
from celldiff.training.module import DiffusionModule

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


class BalancedInLastEpoch(CellDataModule):
    """Epochs 0-1 shuffle the train split, epoch 2 draws it class-balanced (the loader is rebuilt every epoch)."""

    def train_dataloader(self):
        self.class_balanced = self.trainer.current_epoch == DATA_EPOCHS - 1
        return super().train_dataloader()


class BatchRecorder(L.LightningModule):
    """Records the (index, label, image, mask) batches this rank trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"epoch": torch.tensor(self.current_epoch), "index": batch["index"].clone(),
                          "label": batch["label"].clone(), "image": to_uint8(batch["image"]),
                          "mask": batch["mask"].to(torch.uint8)})  # fmt: skip
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


DATA_EPOCHS = 3


def main_data(out: str, world: int, data_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = BalancedInLastEpoch(
        data_dir, image_size=16, batch_size=GLOBAL_BATCH // world, masks="box,brush,nucleus", augment=True,
        num_workers=2 if world > 1 else 0,  # workers must not change the draws either
    )  # fmt: skip
    recorder = BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=DATA_EPOCHS,
        reload_dataloaders_every_n_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # Lightning's default use_distributed_sampler=True: it must keep celldiff's sampler  # fmt: skip
    trainer.fit(recorder, datamodule=datamodule)
    torch.save(recorder.seen, f"{out}.rank{trainer.global_rank}")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        main_data(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1], int(sys.argv[2]))
