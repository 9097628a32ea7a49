"""Callbacks: throughput logging across short epochs; the old ``celldiff.callbacks`` class paths."""

from __future__ import annotations

import importlib

import lightning as L
import pytest

from celldiff.training.callbacks import Throughput
from tests.training.helpers import FixedImages, tiny_module


def test_throughput_is_logged_across_short_epochs():
    module = tiny_module()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Throughput(window=4)])  # fmt: skip
    trainer.fit(module, datamodule=FixedImages(steps=3))  # 3 steps per epoch, window 4
    rate = float(trainer.callback_metrics["perf/images_per_sec"])
    assert 0 < rate < 1e6


def test_old_class_paths_resolve_with_a_deprecation_warning():
    import celldiff.callbacks
    from celldiff.cli.loggers import AppendingCSVLogger
    from celldiff.training import callbacks, prediction, stopping

    with pytest.warns(DeprecationWarning, match="celldiff.training.callbacks"):
        old = importlib.reload(celldiff.callbacks)
    assert old.SampleGrid is callbacks.SampleGrid and old.InpaintingPanels is callbacks.InpaintingPanels
    assert old.PredictionWriter is prediction.PredictionWriter and old.SaveOnSigterm is stopping.SaveOnSigterm
    assert old.AppendingCSVLogger is AppendingCSVLogger  # the logger class path of configs saved by old runs
