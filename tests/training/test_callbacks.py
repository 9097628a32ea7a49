"""Callbacks: throughput logging across short epochs."""

from __future__ import annotations

import lightning as L

from celldiff.callbacks import Throughput
from tests.test_module import FixedImages, tiny_module


def test_throughput_is_logged_across_short_epochs():
    module = tiny_module()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Throughput(window=4)])  # fmt: skip
    trainer.fit(module, datamodule=FixedImages(steps=3))  # 3 steps per epoch, window 4
    rate = float(trainer.callback_metrics["perf/images_per_sec"])
    assert 0 < rate < 1e6
