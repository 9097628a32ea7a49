"""Stopping by SIGTERM or Ctrl-C at a step boundary, and the record of what stopped a command.

Lightning turns SIGTERM into a flag its loops check after each step; ``GracefulStop`` makes the first
Ctrl-C set the same flag, ``SaveOnSigterm`` writes ``last.ckpt`` from the state at that step, and
``STOP`` keeps what happened for the command line's last line (``celldiff.cli.stopping``).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopRecord:
    """What stopped a command (SIGTERM or Ctrl-C) and what it left, for the CLI's last line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" (Ctrl-C)
        self.hard = False  # a KeyboardInterrupt went through (a second Ctrl-C, or one outside a loop)
        self.saved_step: int | None = None  # fit: the step last.ckpt holds after the stop
        self.message: str | None = None  # predict: what was written
        self.graceful = False  # a Lightning loop is running that stops at the next step/batch on its own
        self.command: str | None = None  # the celldiff subcommand
        self.run_dir: str | None = None  # its run directory (fit) or output directory (predict, evaluate)


STOP = StopRecord()


def main_thread() -> bool:
    """Whether this is the main thread (the only one that may install signal handlers)."""
    return threading.current_thread() is threading.main_thread()


class GracefulStop(L.Callback):
    """Ctrl-C stops like SIGTERM: at the end of the current step (fit) or batch (validate, test, predict).

    Lightning turns SIGTERM into a flag that its loops check after each step; a Ctrl-C (SIGINT) would
    instead raise ``KeyboardInterrupt`` wherever the process is, so Lightning can save nothing
    consistent. While a loop runs, this callback makes the first Ctrl-C set the same flag (then
    ``SaveOnSigterm`` writes ``last.ckpt`` at that step and ``celldiff`` exits 130 with the resume
    command); a second Ctrl-C stops at once. Lightning restores the previous SIGINT handler when the
    loop ends. It also records in ``STOP`` what stopped the run, for the CLI's last line.
    """

    def _install(self, trainer: L.Trainer) -> None:
        STOP.graceful = True
        if not main_thread() or trainer.received_sigterm:
            return

        def on_sigint(signum: int, frame: Any) -> None:
            STOP.signal = "SIGINT"
            trainer._signal_connector.received_sigterm = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            if trainer.is_global_zero:
                what = "step" if trainer.training else "batch"
                print(f"\ncelldiff: Ctrl-C: stopping after the current {what} (Ctrl-C again stops at once)", file=sys.stderr)

        signal.signal(signal.SIGINT, on_sigint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        STOP.graceful = False
        if isinstance(exception, KeyboardInterrupt):
            STOP.signal, STOP.hard = "SIGINT", True
        elif isinstance(exception, SIGTERMException) and STOP.signal is None:
            STOP.signal = "SIGTERM"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STOP.graceful = False


class SaveOnSigterm(L.Callback):
    """``last.ckpt`` always holds the last step: on SIGTERM (pre-emption, ``scancel``, ``kill``), Ctrl-C and at the end.

    On SIGTERM (and, with ``GracefulStop``, on the first Ctrl-C), Lightning finishes the current
    optimizer step and raises ``SIGTERMException`` on every rank; this callback writes the checkpoint
    from that exact state (all ranks take part, rank 0 writes; a Ctrl-C meanwhile is ignored), so a run
    stopped between periodic checkpoints loses nothing; ``celldiff`` then exits with status 143
    (SIGTERM) or 130 (Ctrl-C) and says how to resume. At the end of training it also saves when the
    last step is not a multiple of the checkpoint interval.
    """

    _started = False  # the training loop has begun (before it, e.g. in data preparation, there is nothing to save)

    def _save(self, trainer: L.Trainer, why: str) -> None:
        checkpoint = trainer.checkpoint_callback
        if getattr(checkpoint, "_last_global_step_saved", None) == trainer.global_step:
            STOP.saved_step = trainer.global_step
            return  # ModelCheckpoint has just written this step
        dirpath = getattr(checkpoint, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        STOP.saved_step = trainer.global_step
        if checkpoint is not None and hasattr(checkpoint, "_last_global_step_saved"):
            checkpoint._last_global_step_saved = trainer.global_step
        if trainer.is_global_zero:
            print(f"celldiff: {why}: saved {path} at step {trainer.global_step}", file=sys.stderr)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, "end of training")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training and self._started:
            why = "Ctrl-C" if STOP.signal == "SIGINT" else "SIGTERM"
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread() else None
            try:  # a Ctrl-C now would only cut the checkpoint short (the old one would survive, but be older)
                self._save(trainer, why)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
