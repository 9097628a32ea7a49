"""Run directories: where a run's files go, which run ``--ckpt_path last`` means, and the run's split.

Every run gets its own directory (config.yaml, checkpoints/ with last.ckpt, split.json, samples/,
logs) under ``<root>/<config name>/``, ``<root>`` being ``--trainer.default_root_dir`` or ``runs/``.
Every process of one DDP job agrees on it (``CELLDIFF_RUN_DIR``, SLURM's or torchrun's job id).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback

from celldiff.errors import UsageError

RUNS_ROOT = "runs"
RUN_DIR_ENV = "CELLDIFF_RUN_DIR"


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def is_child_rank() -> bool:
    """A DDP process other than the one the user started (Lightning, torchrun and srun set these)."""
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def config_stem(cfg: Namespace) -> str:
    """The name of the run's config file (``demo`` for configs/demo.yaml), ``celldiff`` without one."""
    return Path(str(cfg.config[0])).stem if cfg.get("config") else "celldiff"


def check_dir_target(flag: str, path: Path) -> None:
    """``path`` must be a directory or creatable as one, in a writable place: else one line."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; expected a directory (a new one, or an existing directory)")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {parent}")


def runs_root(cfg: Namespace, check: bool = True) -> Path:
    """Where run directories go: ``--trainer.default_root_dir`` (Lightning's flag for it), else ``runs/``."""
    root = cfg.trainer.get("default_root_dir")
    if not root:
        return Path(RUNS_ROOT)
    if check:
        check_dir_target("--trainer.default_root_dir", Path(str(root)))
        if cfg.get("run_dir"):
            print(f"celldiff: --run_dir {cfg.run_dir} given: --trainer.default_root_dir {root} is not used", file=sys.stderr)
    return Path(str(root))


def newest_last_checkpoint(root: Path, stem: str) -> Path | None:
    """``<run>/checkpoints/last.ckpt`` of the newest run of config ``stem`` under ``root`` (None: no such run)."""
    candidates = sorted(Path(root, stem).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def last_checkpoint(cfg: Namespace) -> tuple[Path | None, str]:
    """``--ckpt_path last``: the run's last.ckpt (``--run_dir``, else the newest run of the config), and why none."""
    if cfg.get("run_dir"):
        candidate = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
        return (candidate if candidate.is_file() else None), f"{candidate} does not exist"
    root, stem = runs_root(cfg, check=False), config_stem(cfg)
    return newest_last_checkpoint(root, stem), f"no run of config '{stem}' under {root}/{stem}/ has checkpoints/last.ckpt"


def shared_default_run_dir(parent: Path) -> Path:
    """A new run directory under ``parent`` that every process of one job agrees on.

    The run directory a launching process chose (inherited through the environment), else the SLURM
    job id or torchrun's run id, else a timestamp.
    """
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return parent / (f"slurm-{os.environ['SLURM_JOB_ID']}" + (f"-{task}" if task else ""))
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return parent / f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    run_dir = parent / timestamp()
    while run_dir.exists():  # two runs started in the same second
        run_dir = run_dir.with_name(run_dir.name + "-" + uuid.uuid4().hex[:4])
    return run_dir


def output_dir(cfg: Namespace, root: Path, command: str) -> Path:
    """predict / evaluate: ``--output_dir`` (new or empty), default ``<run of the checkpoint>/<command>-<time>``."""
    out = cfg.output_dir
    if out is None:
        base = Path(cfg.ckpt_path).resolve().parent.parent if cfg.ckpt_path else root / config_stem(cfg)
        out = base / f"{command}-{timestamp()}"
    out = Path(out)
    check_dir_target("--output_dir", out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output_dir {out} is not empty; choose a new or empty directory (nothing was overwritten)")
    cfg.output_dir = str(out)
    return out


def run_directory(sub: str, cfg: Namespace, root: Path, check_checkpoint: Callable[[Path], None]) -> Path:
    """fit / validate / test: the run's directory.

    fit ``--ckpt_path last`` resumes ``--run_dir``, else the newest run of the config (its last.ckpt
    checked by ``check_checkpoint``); a new fit takes ``--run_dir`` (never one that holds a run) or a
    new directory under the root; validate and test write ``<root>/<config>/<time>-<command>``.
    """
    stem = config_stem(cfg)
    if cfg.run_dir:
        check_dir_target("--run_dir", Path(cfg.run_dir))
    if sub != "fit":
        return Path(cfg.run_dir) if cfg.run_dir else root / stem / f"{timestamp()}-{sub}"
    if cfg.ckpt_path == "last":
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
        else:
            found = newest_last_checkpoint(root, stem)
            if found is None:
                raise UsageError(
                    f"--ckpt_path last: no run of config '{stem}' under {root}/{stem}/ has checkpoints/last.ckpt;"
                    " pass --run_dir of the run to resume"
                )
            run_dir = found.parent.parent
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise UsageError(f"--ckpt_path last: {last} does not exist")
        check_checkpoint(last)
        print(f"celldiff: resuming {run_dir}/checkpoints/last.ckpt", file=sys.stderr)
        return run_dir
    if not cfg.run_dir:
        return shared_default_run_dir(root / stem)
    run_dir = Path(cfg.run_dir)
    requeued = any(run_dir.glob("hpc_ckpt_*.ckpt"))  # SLURM requeue: Lightning resumes it
    if (run_dir / "config.yaml").exists() and not requeued and not cfg.ckpt_path and not is_child_rank():
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise UsageError(
                f"--run_dir {run_dir} holds the config.yaml of a run that saved no last.ckpt, so there is nothing"
                " to resume; choose a new --run_dir (or delete that one)"
            )
        raise UsageError(f"--run_dir {run_dir} already holds a run; resume it with --ckpt_path last or choose a new --run_dir")
    return run_dir


def use_run_split(sub: str, cfg: Namespace, run_dir: Path) -> None:
    """Make the run's ``split.json`` the split of every later command on that run.

    Resuming (``fit --ckpt_path``) and validate / test / predict / evaluate of a checkpoint reuse the
    split saved beside it (``<run>/split.json``, the run being the checkpoint's grandparent folder):
    the split is never recomputed, and a file it lists that is gone from the data is reported as an
    error. ``--data.split_file`` given explicitly wins.
    """
    if cfg.data.get("split_file") or not cfg.get("ckpt_path"):
        return
    if sub == "fit" and cfg.ckpt_path == "last":
        source = run_dir
    elif Path(str(cfg.ckpt_path)).is_file():
        source = Path(str(cfg.ckpt_path)).resolve().parent.parent
    else:
        return
    split_file = source / "split.json"
    if split_file.is_file():
        cfg.data.split_file = str(split_file)
        print(f"celldiff: using the run's split {split_file}", file=sys.stderr)
    elif str(cfg.ckpt_path).endswith(".ckpt"):
        print(
            f"celldiff: no split.json beside {cfg.ckpt_path} (expected {split_file}); the split is computed from"
            f" data.split_seed={cfg.data.get('split_seed')}",
            file=sys.stderr,
        )


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run directory without ever overwriting one.

    A resumed run keeps its original config.yaml and writes config.resumed-<time>.yaml beside it;
    with W&B the resolved config also goes to the run's config panel.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and trainer.log_dir:
            if (Path(trainer.log_dir) / self.config_filename).exists():
                self.config_filename = f"config.resumed-{timestamp()}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                logger.experiment.config.update({"celldiff": json.loads(config)}, allow_val_change=True)
