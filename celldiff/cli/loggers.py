"""Loggers of a run: every one writes into the run directory; W&B goes offline rather than hang.

A CSV log appends when a run resumes (``AppendingCSVLogger``); W&B keeps one run id per run
directory (``wandb_id.txt``), so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def class_path_of(value: Any) -> str:
    """The ``class_path`` of a config value (a Namespace or dict), '' for anything else."""
    if isinstance(value, Namespace | dict):
        return str(value.get("class_path", ""))
    return ""


def has_wandb(value: Any) -> bool:
    """Whether a trainer.logger config value includes a W&B logger."""
    values = value if isinstance(value, list) else [value]
    return any(class_path_of(v).endswith("WandbLogger") for v in values)


def wandb_mode_guard() -> None:
    """Switch W&B to offline mode, with one warning, when it cannot reach the server.

    With no API key and no terminal ``wandb.init`` fails, and with no network it waits for
    minutes; an offline run can be uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.
    """
    if os.environ.get("WANDB_MODE"):
        return
    reason = None
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        has_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not has_key:
        reason = "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    else:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=3).close()
        except OSError:
            reason = f"cannot reach {host}"
    if reason:
        os.environ["WANDB_MODE"] = "offline"
        warnings.warn(
            f"celldiff: W&B runs offline: {reason}; upload later with `wandb sync <run_dir>/wandb/offline-run-*`",
            stacklevel=2,
        )


def patch_loggers(value: Any, run_dir: Path, stem: str) -> Any:
    """Point every configured logger (``--trainer.logger``) at ``run_dir``; W&B keeps one run id per run dir.

    ``stem`` (the config's name) names the W&B run ``<stem>/<run dir name>`` unless the config names it.
    """
    if value is None or value is False:
        return False
    if value is True:
        value = Namespace(class_path=CSV_LOGGER, init_args=Namespace())
    loggers = value if isinstance(value, list) else [value]
    for logger in loggers:
        class_path = class_path_of(logger)
        if logger.get("init_args") is None:
            logger.init_args = Namespace()
        args = logger.init_args
        args.save_dir = str(run_dir)
        if class_path.endswith(("CSVLogger", "TensorBoardLogger")):
            args.name = ""
            args.version = ""
        if class_path == CSV_LOGGER:
            logger.class_path = "celldiff.cli.loggers.AppendingCSVLogger"  # keeps a resumed run's history
        elif class_path.endswith("WandbLogger"):
            wandb_mode_guard()
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12] + "\n")
            args.id = id_file.read_text().strip()
            args.project = args.get("project") or "celldiff"
            args.name = args.get("name") or f"{stem}/{run_dir.name}"
            args.resume = "allow"
    return value


def default_logger_save_dir(args: list[str], placeholder: str) -> list[str]:
    """Let ``--trainer.logger CSVLogger`` (or TensorBoardLogger) work without a ``save_dir``.

    Those loggers require ``save_dir`` at parse time although celldiff always points it at the run
    directory; give them ``placeholder``, which ``patch_loggers`` replaces.
    """
    if any(a.startswith("--trainer.logger.save_dir") or a.startswith("--trainer.logger.init_args.save_dir") for a in args):
        return args
    out = list(args)
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--trainer.logger=") else None
        if arg == "--trainer.logger" and i + 1 < len(args):
            value = args[i + 1]
        if value and value.split(".")[-1] in ("CSVLogger", "TensorBoardLogger"):
            out.append(f"--trainer.logger.save_dir={placeholder}")
    return out


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its metrics.csv.

    (Lightning's deletes an existing metrics.csv; a resumed run would lose its history.)
    """

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            from lightning.pytorch.loggers.csv_logs import ExperimentWriter

            class _AppendingWriter(ExperimentWriter):
                def _check_log_dir_exists(self) -> None:
                    if self._fs.isfile(self.metrics_file_path):
                        import csv

                        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                            self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
