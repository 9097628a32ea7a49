"""``celldiff evaluate``: the ``test`` subcommand's parser, then ``celldiff.evaluation.run.run_evaluation``.

Every input is checked before any decoding or sampling; under DDP Lightning's launcher starts the other
ranks, each generates its share. A run that does not finish empties its ``--output_dir`` again, so the
same command can be retried.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace

from celldiff.cli.rundirs import is_child_rank
from celldiff.errors import UsageError
from celldiff.evaluation.baselines import FillBaseline
from celldiff.evaluation.inputs import DEFAULT_NUM_SAMPLES, EvaluationInputError, check_evaluation_inputs
from celldiff.evaluation.judge import CheckpointKindError, load_judge
from celldiff.evaluation.run import run_evaluation
from celldiff.training.weights import load_into_module


def check_evaluate_args(cfg: Namespace) -> None:
    """Options that evaluate does not take together, or at all (one line each, before anything is read)."""
    if cfg.get("ckpt_path") and cfg.get("baseline"):
        raise UsageError("evaluate takes either --ckpt_path (a diffusion model) or --baseline (a non-learned fill), not both")
    if cfg.get("classes") is not None:
        raise UsageError(
            f"--classes {cfg.classes}: evaluate generates every class in turn and takes no --classes (it is a predict option)"
        )
    if cfg.get("samples_per_image") is not None:
        raise UsageError(
            f"--samples_per_image {cfg.samples_per_image}: evaluate inpaints each test cell once and takes no"
            " --samples_per_image (it is a predict option); --num_samples sets how many images it measures"
        )


def _metrics_weights(cfg: Namespace) -> tuple[str | None, str | None]:
    metrics = cfg.get("metrics") or Namespace()
    return metrics.get("inception_weights"), metrics.get("lpips_weights")


def run_evaluate(model: L.LightningModule, datamodule: L.LightningDataModule, trainer: L.Trainer, cfg: Namespace) -> None:
    """Check every input, then evaluate on this process (or, under DDP, on every rank)."""
    out = Path(str(cfg.output_dir))
    try:
        try:  # every input, before any decoding or sampling
            judge, cfg.num_samples = check_evaluation_inputs(
                model, datamodule, cfg.ckpt_path, cfg.classifier_ckpt, cfg.baseline, cfg.num_samples, *_metrics_weights(cfg)
            )
        except (CheckpointKindError, EvaluationInputError) as err:
            raise UsageError(str(err)) from None
        launcher = getattr(trainer.strategy, "launcher", None)
        if launcher is not None:  # DDP: start the other ranks (as for fit), each generates its share
            launcher.launch(_evaluate, model, datamodule, trainer, cfg, judge, trainer=trainer)
        else:
            _evaluate(model, datamodule, trainer, cfg, judge)
    except BaseException:
        # --output_dir was new or empty when evaluate started, so what it holds now is this run's
        # unfinished output (a W&B id, logs), which would block the retry as "not empty".
        left = list(out.iterdir()) if out.is_dir() and not is_child_rank() else []
        if left and not (out / "metrics.json").is_file():
            for entry in left:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            print(f"celldiff: evaluate did not finish: emptied {out} so that it can be retried", file=sys.stderr)
        raise


def _evaluate(
    model: L.LightningModule, datamodule: L.LightningDataModule, trainer: L.Trainer, cfg: Namespace, judge: Any
) -> None:
    """One rank's evaluation: the image cache, the weights, the judge, then ``run_evaluation``."""
    strategy = trainer.strategy
    strategy.setup_environment()  # the process group under DDP, the device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if strategy.global_rank == 0:
        datamodule.prepare_data()  # builds the image cache once
    if distributed:
        torch.distributed.barrier()
    device = strategy.root_device
    if cfg.baseline:
        measured: Any = FillBaseline(cfg.baseline, datamodule.image_size)
    else:
        # Its kind and readability were checked (weights_only) before: no code is unpickled.
        load_into_module(model, cfg.ckpt_path)  # a checkpoint, or a weights file (NAME.safetensors)
        measured = model
    measured.to(device).eval()
    try:
        classifier = judge or load_judge(cfg.classifier_ckpt)
    except CheckpointKindError as err:
        raise UsageError(str(err)) from None
    inception_weights, lpips_weights = _metrics_weights(cfg)
    try:
        run_evaluation(
            measured,
            datamodule,
            classifier.to(device),
            cfg.output_dir,
            num_samples=DEFAULT_NUM_SAMPLES if cfg.num_samples is None else cfg.num_samples,
            seed=cfg.seed if cfg.seed is not None else 0,
            batch_size=datamodule.batch_size,
            inception_weights=inception_weights,
            lpips_weights=lpips_weights,
            loggers=trainer.loggers if strategy.global_rank == 0 else [],
            forward_context=trainer.precision_plugin.forward_context,  # --trainer.precision for the sampling
            network_precision=str(trainer.precision),
            morphology=bool(cfg.get("morphology")),  # --morphology: nucleus and cell morphology per class
        )
    except EvaluationInputError as err:  # found once the test split is known (before any sampling)
        raise UsageError(str(err)) from None
    if distributed:
        torch.distributed.barrier()
