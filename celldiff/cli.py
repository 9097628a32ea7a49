"""``celldiff`` command line: LightningCLI with run directories, data→model links and W&B guard.

Every run gets its own directory (config.yaml, checkpoints/ with last.ckpt, split.json, samples/,
logs). ``celldiff fit --config X --ckpt_path last`` resumes the newest run of config X (or the one
named by ``--run_dir``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from celldiff.callbacks import (
    STOP,
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    CheckpointReadError,
    CheckpointWriteError,
    GracefulStop,
    PredictionWriter,
    RNGState,
    SaveOnSigterm,
    SaveSplit,
    Throughput,
    check_checkpoint_file,
)
from celldiff.data import CellDataModule, DataError
from celldiff.module import FP16_TRUE_MESSAGE, NonFiniteLossError, UnsupportedPrecisionError

RUNS_ROOT = "runs"


class UsageError(Exception):
    """A command-line value that cannot work; reported as one line, exit code 2."""


class PartialFailure(Exception):
    """Some inputs failed (each reported already) while the rest ran; exit code 1."""


RUN_DIR_ENV = "CELLDIFF_RUN_DIR"

SUBCOMMANDS = ("fit", "validate", "test", "predict", "evaluate")
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit unsigned


def _condense_parser_error(message: str) -> str:
    """jsonargparse's multi-line report (a Union of subtypes, the given value and its type) in one line."""
    keys = re.findall(r'Parser key "([^"]+)"', message)  # nested: "model", then "lr" inside its init_args
    key = re.match(r"(.*)", ".".join(dict.fromkeys(keys))) if keys else None
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip()) for line in message.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return message
    invalid = re.search(r"invalid choice: '([^']*)' \(choose from 'fit'", message)
    if invalid or ("subcommand" in message and "not provided" in message):
        return f"{f'unknown command {invalid.group(1)!r}' if invalid else 'no command given'}; expected one of {', '.join(SUBCOMMANDS)}"
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    literals: list[str] = []
    for values in re.findall(r"Literal\[([^\]]*)\]", message):
        literals += [v.strip().strip("'\"") for v in values.split(",") if v.strip()]
    noise = re.compile(r"(Does not validate|Subtypes|Errors|Given value|Expected a (<class '[^']+'>|typing\..*|collections.*)$)")
    reasons = [line.lstrip("- ").strip() for line in lines]
    reasons = [r for r in reasons if not noise.match(r)]
    reasons = [r for r in reasons if not r.startswith("Problem with given class_path")] or reasons
    if key:
        given_value = given.group(1) if given else ""
        nested = re.match(r"NestedArg\(key='([^']*)', val='(.*)'\)$", given_value)
        name = key.group(1)
        if nested:
            name = name if name.endswith(nested.group(1)) else f"{name}.{nested.group(1)}"
            given_value = nested.group(2)
        where = f"--{name}" + (f" {given_value}" if given_value else "")
        types = [t.rsplit(".", 1)[-1].replace("NoneType", "null") for t in re.findall(r"Expected a <class '([^']+)'>", message)]
        if not reasons and literals:
            return f"{where}: expected one of {', '.join(dict.fromkeys(literals + [t for t in types if t == 'null']))}"
        if not reasons and types:
            return f"{where}: expected {' or '.join(dict.fromkeys(types))}"
        return f"{where}: {'; '.join(reasons[:2]) if reasons else lines[0].lstrip('- ')}"
    return lines[0] + (f" {reasons[1]}" if len(reasons) > 1 and lines[0].endswith(":") else "")


class CellDiffArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (``celldiff: error: ...``), not a usage wall."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        print(f"celldiff: error: {_condense_parser_error(message)} (see --help)", file=sys.stderr)
        sys.exit(2)


def _check_dir_target(flag: str, path: Path) -> None:
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


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _is_child_rank() -> bool:
    """A DDP process other than the one the user started (Lightning, torchrun and srun set these)."""
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


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
    run_dir = parent / _timestamp()
    while run_dir.exists():  # two runs started in the same second
        run_dir = run_dir.with_name(run_dir.name + "-" + uuid.uuid4().hex[:4])
    return run_dir


def _has_wandb(value: Any) -> bool:
    """Whether a trainer.logger config value includes a W&B logger."""
    values = value if isinstance(value, list) else [value]
    return any(_class_path(v).endswith("WandbLogger") for v in values)


def _class_path(value: Any) -> str:
    if isinstance(value, Namespace | dict):
        return str(value.get("class_path", ""))
    return ""


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
        import socket

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


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run directory without ever overwriting one.

    A resumed run keeps its original config.yaml and writes config.resumed-<time>.yaml beside it;
    with W&B the resolved config also goes to the run's config panel.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and trainer.log_dir:
            if (Path(trainer.log_dir) / self.config_filename).exists():
                self.config_filename = f"config.resumed-{_timestamp()}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update({"celldiff": json.loads(config)}, allow_val_change=True)


class CellDiffCLI(LightningCLI):
    """LightningCLI for celldiff (see the README for the commands)."""

    def __init__(self, *args: Any, evaluate: bool = False, **kwargs: Any) -> None:
        self.evaluate_mode = evaluate  # `celldiff evaluate` = the test parser + run_evaluation
        kwargs.setdefault("model_class", None)
        kwargs.setdefault("datamodule_class", CellDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", CellDiffArgumentParser)
        kwargs.setdefault(
            "parser_kwargs", {"description": "celldiff: denoising diffusion models for blood-cell microscopy (see the README)."}
        )
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None)
        if add_subcommands and action is not None:
            # `celldiff evaluate` is `test`'s parser run by main(): list it in --help like the others.
            import argparse

            action.metavar = "{" + ",".join(SUBCOMMANDS) + "}"
            help_text = "Generate samples and measure them against the test split (FID, KID, classifier metrics)."
            action._choices_actions.append(argparse._SubParsersAction._ChoicesPseudoAction("evaluate", (), help_text))

    # ------------------------------------------------------------------ parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help=(
                "Directory of this run (default <root>/<config name>/<time>, where <root> is --trainer.default_root_dir"
                " or runs/); with --ckpt_path last, the run to resume (default: the newest run of the config under"
                " <root>). Given both, --run_dir wins."
            ),
        )
        parser.add_argument(
            "--output_dir", type=str | None, default=None, help="predict: directory for the images (new or empty)."
        )
        parser.add_argument("--num_samples", type=int | None, default=None, help="predict: number of images.")
        parser.add_argument("--seed", type=int | None, default=None, help="Seed of everything, incl. sample noise.")
        parser.add_argument(
            "--classes",
            type=str | None,
            default=None,
            help="predict with a class-conditional model: class names or ids, e.g. eosinophil,platelet or all.",
        )
        parser.add_argument("--classifier_ckpt", type=str | None, default=None, help="evaluate: cell classifier checkpoint.")
        parser.add_argument(
            "--baseline",
            type=str | None,
            default=None,
            help="evaluate: measure a non-learned inpainting fill (mean_fill, blur_fill) instead of a checkpoint.",
        )
        parser.add_argument(
            "--metrics.inception_weights",
            type=str | None,
            default=None,
            help="evaluate: local Inception weights (torch-fidelity's .pth) for FID/KID; never downloaded.",
        )
        parser.add_argument(
            "--metrics.lpips_weights",
            type=str | None,
            default=None,
            help="evaluate: local AlexNet weights (torchvision's alexnet-owt-7be5be79.pth) for LPIPS; never downloaded.",
        )
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model": {"class_path": "celldiff.module.DiffusionModule"},
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:04d}-step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
                # Every run has its own directory, so a name never needs a -v1: a run resumed in a moved or
                # renamed directory (Lightning then cannot restore the callback's record of its files)
                # must still overwrite last.ckpt, or `--ckpt_path last` and evaluate would load the old one.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments("data.image_size", "model.init_args.image_size")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Take the architecture from the checkpoint, so any config can load any checkpoint.

        Only the keys the model class lists in ``CHECKPOINT_ARCH_KEYS`` (shapes and the diffusion
        process) are taken; sampling choices stay with the config and the command line. A class-
        conditional model or a classifier also brings its class list (``class_names``): its labels
        mean those classes, so the data is read with them.

        Checked here, before anything is built (one line each): a checkpoint of the wrong kind for
        the command (a classifier for predict or evaluate; for fit, a checkpoint of another kind than
        the config trains), predict without a checkpoint, ``--ckpt_path last`` with no run to take
        it from (validate / test / predict / evaluate then use that file), ``--classes`` with an
        unconditional model, an inpainting model without masks, and a class list that contradicts the
        checkpoint's. The file is read with ``weights_only=True`` (never unpickles code).
        """
        from celldiff.classifier import (
            CLASSIFIER_CLASS_PATH,
            DIFFUSION_CLASS_PATH,
            CheckpointKindError,
            checkpoint_class_path,
            describe_kind,
            read_checkpoint,
        )

        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        command = "evaluate" if self.evaluate_mode else sub
        ckpt_path = cfg.get("ckpt_path")
        if self.evaluate_mode and ckpt_path and cfg.get("baseline"):
            raise UsageError("evaluate takes either --ckpt_path (a diffusion model) or --baseline (a non-learned fill), not both")
        if self.evaluate_mode and cfg.get("classes") is not None:
            raise UsageError(
                f"--classes {cfg.classes}: evaluate generates every class in turn and takes no --classes (it is a predict option)"
            )
        if command == "predict" and not ckpt_path:
            raise UsageError(
                "predict needs --ckpt_path: a diffusion checkpoint file, or 'last' for the newest run of this config"
                " (without one it would sample from untrained, random weights)"
            )
        if sub != "fit" and ckpt_path in ("best", "hpc", "registry"):
            raise UsageError(
                f"--ckpt_path {ckpt_path}: only fit knows a '{ckpt_path}' checkpoint; {command} needs a checkpoint file"
                " or 'last' (the newest run of this config, or the run given by --run_dir)"
            )
        read_path = ckpt_path
        if ckpt_path == "last":
            stem = Path(str(cfg.config[0])).stem if cfg.get("config") else "celldiff"
            root = Path(str(cfg.trainer.get("default_root_dir") or RUNS_ROOT))
            if cfg.get("run_dir"):
                candidate = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
                found = candidate if candidate.is_file() else None
                missing = f"{candidate} does not exist"
            else:
                candidates = sorted(Path(root, stem).glob("*/checkpoints/last.ckpt"), key=lambda f: f.stat().st_mtime)
                found = candidates[-1] if candidates else None
                missing = f"no run of config '{stem}' under {root}/{stem}/ has checkpoints/last.ckpt"
            if sub == "fit":  # resolved again (and reported) with the run directory; read here for its kind
                if found is None:
                    return
                read_path = str(found)
            else:
                if found is None:
                    raise UsageError(
                        f"--ckpt_path last: {missing}; give --run_dir of the run, or a checkpoint file"
                        f" (without a checkpoint {command} would use untrained, random weights)"
                    )
                if not _is_child_rank():
                    print(f"celldiff: --ckpt_path last: {found}", file=sys.stderr)
                cfg.ckpt_path = ckpt_path = read_path = str(found)
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
            return
        try:
            ckpt = read_checkpoint(read_path, "--ckpt_path")
        except CheckpointKindError as err:
            if ckpt_path == "last":  # fit: reported with the run directory, and what to resume from instead
                return
            raise UsageError(str(err)) from None
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        class_path = checkpoint_class_path(ckpt)
        kind = describe_kind(class_path)
        if command in ("predict", "evaluate") and class_path != DIFFUSION_CLASS_PATH:
            swapped = " (--ckpt_path and --classifier_ckpt swapped?)" if command == "evaluate" and class_path == CLASSIFIER_CLASS_PATH else ""
            raise UsageError(
                f"--ckpt_path {ckpt_path} is {kind} checkpoint; {command} needs a diffusion model checkpoint"
                f" ({DIFFUSION_CLASS_PATH}){swapped}"
            )
        if not class_path or not (ckpt.get("hyper_parameters") or {}).get("_class_path"):
            return  # not saved by the celldiff CLI: Lightning loads it into the configured model as it is
        run_config = Path(str(read_path)).resolve().parent.parent / "config.yaml"
        own_config = f" ({run_config})" if run_config.is_file() else ""
        config_class = _class_path(cfg.get("model"))
        if sub == "fit" and config_class and config_class != class_path:
            raise UsageError(
                f"--ckpt_path {ckpt_path} is {kind} checkpoint but the config trains {describe_kind(config_class)};"
                f" resuming continues the checkpoint's training: use the config it was trained with{own_config}"
            )
        diffusion = class_path == DIFFUSION_CLASS_PATH
        init_args = (cfg.get("model") or Namespace()).get("init_args") or Namespace()
        if sub == "fit" and diffusion:
            for key, what in (("inpainting", "an inpainting"), ("class_conditional", "a class-conditional")):
                if bool(hparams.get(key)) != bool(init_args.get(key)):
                    raise UsageError(
                        f"--ckpt_path {ckpt_path}: resuming continues the checkpoint's training, but model.{key} is"
                        f" {bool(hparams.get(key))} in the checkpoint and {bool(init_args.get(key))} in the config"
                        f" ({'it is' if hparams.get(key) else 'the config trains'} {what} model); resume with the"
                        f" config it was trained with{own_config}, or start a new run"
                    )
        if diffusion and command == "predict" and cfg.get("classes") is not None and not hparams.get("class_conditional"):
            raise UsageError(
                f"--classes {cfg.classes}: the checkpoint {ckpt_path} is unconditional (trained without class labels),"
                " so it cannot generate chosen classes; drop --classes or use a class-conditional (Phase 3) checkpoint"
            )
        if diffusion and hparams.get("inpainting") and command != "evaluate":
            data = cfg.data
            if sub == "fit":
                ok, needs = data.get("masks") is not None, "data.masks (the masks it trains on)"
            elif sub == "predict":
                ok = data.get("predict_images") is not None or (
                    data.get("predict_source", "noise") != "noise"
                    and (data.get("eval_masks") is not None or data.get("masks") is not None)
                )
                needs = "data.predict_source test with data.masks or data.eval_masks, or --data.predict_images"
            else:
                ok, needs = data.get("eval_masks") is not None or data.get("masks") is not None, "data.masks or data.eval_masks"
            if not ok:
                raise UsageError(
                    f"--ckpt_path {ckpt_path} is an inpainting model (model.inpainting: true), which needs a mask with"
                    f" every image, but this config sets none: set {needs}, e.g. with the config it was trained"
                    f" with{own_config or ' (configs/phase2.yaml)'}"
                )
        model_cls = _import(class_path)
        keys = getattr(model_cls, "CHECKPOINT_ARCH_KEYS", ())
        arch = {k: hparams[k] for k in keys if k in hparams}
        update: dict[str, Any] = {"model": {"class_path": class_path, "init_args": arch}}
        if "image_size" in hparams:  # the data must match the network the checkpoint holds
            update["data"] = {"image_size": hparams["image_size"]}
        trained_classes = hparams.get("class_names")
        if trained_classes and (class_path == CLASSIFIER_CLASS_PATH or hparams.get("class_conditional")):
            trained = [str(c) for c in trained_classes]
            listing, given = ", ".join(trained), cfg.data.get("classes")
            if given is not None:
                if sorted({str(c) for c in given}) != sorted(trained):
                    tip = "; to generate only some of them, name them in --classes" if command == "predict" else ""
                    raise UsageError(
                        f"--ckpt_path {ckpt_path} was trained on the classes {listing} (its labels mean these), but"
                        f" data.classes is {', '.join(map(str, given))}; drop --data.classes: the checkpoint brings its"
                        f" classes{tip}"
                    )
            else:
                from celldiff.data import resolve_data_dir
                from celldiff.imagecache import scan_dataset

                try:
                    available: list[str] | None = list(scan_dataset(resolve_data_dir(str(cfg.data.data_dir))).class_names)
                except Exception:  # a data problem: reported, as always, when the data module is built
                    available = None
                missing = [c for c in trained if available is not None and c not in available]
                if missing:
                    raise UsageError(
                        f"--ckpt_path {ckpt_path} was trained on the classes {listing}, but data_dir {cfg.data.data_dir}"
                        f" has no {', '.join(missing)} (it has {', '.join(available or [])})"
                    )
                if available != trained:  # e.g. trained on a subset: read the data with the checkpoint's classes
                    update.setdefault("data", {})["classes"] = trained
        self.config = self.parser.parse_object({sub: update}, self.config)

    # ------------------------------------------------------------------ checks before any work
    def _set_seed(self) -> None:  # LightningCLI's first step after parsing: check first
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            self._check_trainer(cfg)
            if cfg.trainer.get("enable_checkpointing") is False:
                if self.subcommand == "fit":
                    raise UsageError(
                        "--trainer.enable_checkpointing false: celldiff always keeps <run_dir>/checkpoints/last.ckpt (resume,"
                        " predict and evaluate need it); to keep only that file, use --checkpoint.save_top_k 0"
                    )
                cfg.trainer.enable_checkpointing = None  # only fit writes checkpoints: nothing to switch off
        if self.subcommand == "fit" and str(cfg.trainer.get("precision")) == "16-true":
            raise UsageError(FP16_TRUE_MESSAGE)  # before the run directory is written (module.setup checks too)
        for flag in ("seed", "seed_everything"):
            value = cfg.get(flag)
            if value is None or isinstance(value, bool):
                continue
            if not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
                raise UsageError(f"--{flag} {value}: a seed must be an integer in [0, {SEED_LIMIT - 1}] (numpy's range)")
        super()._set_seed()

    @staticmethod
    def _check_trainer(cfg: Namespace) -> None:
        """Trainer values that Lightning reports with a traceback, a misleading message, or not at all."""
        trainer = cfg.trainer
        accelerator = trainer.get("accelerator")
        if isinstance(accelerator, str):
            name = accelerator.lower()
            if name in ("gpu", "cuda") and not torch.cuda.is_available():
                why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
                raise UsageError(
                    f"--trainer.accelerator {accelerator}: this machine has no usable GPU ({why}); use --trainer.accelerator cpu or auto"
                )
            if name == "mps" and not torch.backends.mps.is_available():
                raise UsageError(f"--trainer.accelerator {accelerator}: Apple MPS is not available here; use cpu or auto")
        devices = trainer.get("devices")
        if isinstance(devices, (int, str)) and re.fullmatch(r"-?\d+", str(devices).strip()):
            if int(devices) == 0 or int(devices) < -1:
                raise UsageError(
                    f"--trainer.devices {devices}: expected a number of devices >= 1, -1 (all), 'auto' or a list of device ids"
                )
        bounds = {  # name: (smallest valid value, what it is)
            "num_nodes": (1, "machines"),
            "accumulate_grad_batches": (1, "batches per optimizer step"),
            "check_val_every_n_epoch": (1, "epochs between validations (or null)"),
            "log_every_n_steps": (0, "steps between log rows (0: only at epoch ends)"),
            "gradient_clip_val": (0, "a gradient norm or value (or null)"),
        }
        for name, (low, what) in bounds.items():
            value = trainer.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
                raise UsageError(f"--trainer.{name} {value}: expected >= {low} ({what})")
        interval = trainer.get("val_check_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
            raise UsageError(f"--trainer.val_check_interval {interval}: expected > 0 (a fraction of an epoch, or a number of steps)")

    def _runs_root(self, cfg: Namespace) -> Path:
        """Where run directories go: ``--trainer.default_root_dir`` (Lightning's flag for it), else ``runs/``."""
        root = cfg.trainer.get("default_root_dir")
        if root:
            _check_dir_target("--trainer.default_root_dir", Path(str(root)))
            if cfg.get("run_dir"):
                print(f"celldiff: --run_dir {cfg.run_dir} given: --trainer.default_root_dir {root} is not used", file=sys.stderr)
            return Path(str(root))
        return Path(RUNS_ROOT)

    # ------------------------------------------------------------------ run directory
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        stem = Path(str(cfg.config[0])).stem if cfg.get("config") else "celldiff"
        STOP.command = "evaluate" if self.evaluate_mode else sub
        self.runs_root = self._runs_root(cfg)
        if cfg.seed is not None:
            from lightning.pytorch import seed_everything

            cfg.seed_everything = cfg.seed
            cfg.data.predict_seed = cfg.seed
            seed_everything(cfg.seed, workers=True)
        if cfg.classes is not None:
            cfg.data.predict_classes = cfg.classes
        if cfg.num_samples is not None and not self.evaluate_mode:
            if cfg.num_samples < 1:
                raise UsageError(f"--num_samples must be at least 1, got {cfg.num_samples}")
            inpainting = cfg.data.masks is not None or cfg.data.predict_images is not None
            if inpainting:  # several samples per masked image
                cfg.model.init_args.samples_per_image = cfg.num_samples
            else:
                cfg.data.num_predict_samples = cfg.num_samples

        run_dir = self._resolve_run_dir(sub, cfg, stem)
        STOP.run_dir = str(run_dir)
        self._use_run_split(sub, cfg, run_dir)
        # Processes that Lightning's DDP launcher starts re-run this command: they must find the
        # same directory, not a new timestamp.
        os.environ[RUN_DIR_ENV] = str(run_dir)
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        cfg.checkpoint.dirpath = str(run_dir / "checkpoints")
        if cfg.checkpoint.every_n_train_steps and cfg.checkpoint.every_n_epochs:
            # Lightning takes one trigger: a step interval given on the command line wins over the
            # config's epoch interval (SLURM jobs save every N steps).
            cfg.checkpoint.every_n_epochs = None
        if sub == "predict" or (self.evaluate_mode and not _has_wandb(cfg.trainer.logger)):
            cfg.trainer.logger = False
        else:
            cfg.trainer.logger = self._patch_loggers(cfg.trainer.logger, run_dir, stem)
        print(f"celldiff: {'evaluate' if self.evaluate_mode else sub} run directory: {run_dir}", file=sys.stderr)

    def _use_run_split(self, sub: str, cfg: Namespace, run_dir: Path) -> None:
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

    def _resolve_run_dir(self, sub: str, cfg: Namespace, stem: str) -> Path:
        root = getattr(self, "runs_root", Path(RUNS_ROOT))
        if sub == "predict" or self.evaluate_mode:
            out = cfg.output_dir
            if out is None:
                base = Path(cfg.ckpt_path).resolve().parent.parent if cfg.ckpt_path else root / stem
                out = base / f"{'evaluate' if self.evaluate_mode else 'predict'}-{_timestamp()}"
            out = Path(out)
            _check_dir_target("--output_dir", out)
            if out.exists() and any(out.iterdir()):
                raise UsageError(f"--output_dir {out} is not empty; choose a new or empty directory (nothing was overwritten)")
            cfg.output_dir = str(out)
            return out
        if cfg.run_dir:
            _check_dir_target("--run_dir", Path(cfg.run_dir))
        if sub != "fit":
            return Path(cfg.run_dir) if cfg.run_dir else root / stem / f"{_timestamp()}-{sub}"
        if cfg.ckpt_path == "last":
            if cfg.run_dir:
                run_dir = Path(cfg.run_dir)
            else:
                candidates = sorted(Path(root, stem).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
                if not candidates:
                    raise UsageError(
                        f"--ckpt_path last: no run of config '{stem}' under {root}/{stem}/ has checkpoints/last.ckpt;"
                        " pass --run_dir of the run to resume"
                    )
                run_dir = candidates[-1].parent.parent
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise UsageError(f"--ckpt_path last: {last} does not exist")
            try:
                check_checkpoint_file(last)
            except CheckpointReadError as err:
                raise UsageError(f"--ckpt_path last: {err}; resume from another checkpoint in {last.parent} with --ckpt_path FILE") from None
            print(f"celldiff: resuming {run_dir}/checkpoints/last.ckpt", file=sys.stderr)
            return run_dir
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
            requeued = any(run_dir.glob("hpc_ckpt_*.ckpt"))  # SLURM requeue: Lightning resumes it
            if (run_dir / "config.yaml").exists() and not requeued and not cfg.ckpt_path and not _is_child_rank():
                if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                    raise UsageError(
                        f"--run_dir {run_dir} holds the config.yaml of a run that saved no last.ckpt, so there is nothing"
                        " to resume; choose a new --run_dir (or delete that one)"
                    )
                raise UsageError(
                    f"--run_dir {run_dir} already holds a run; resume it with --ckpt_path last or choose a new --run_dir"
                )
            return run_dir
        return shared_default_run_dir(root / stem)

    def _patch_loggers(self, value: Any, run_dir: Path, stem: str) -> Any:
        """Point every configured logger at the run directory; W&B keeps one run id per run dir."""
        if value is None or value is False:
            return False
        if value is True:
            value = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace())
        loggers = value if isinstance(value, list) else [value]
        for logger in loggers:
            class_path = _class_path(logger)
            if logger.get("init_args") is None:
                logger.init_args = Namespace()
            args = logger.init_args
            args.save_dir = str(run_dir)
            if class_path.endswith(("CSVLogger", "TensorBoardLogger")):
                args.name = ""
                args.version = ""
            if class_path == "lightning.pytorch.loggers.CSVLogger":
                logger.class_path = "celldiff.callbacks.AppendingCSVLogger"  # keeps a resumed run's history
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

    def _run_subcommand(self, subcommand: str) -> None:
        if not self.evaluate_mode:
            return super()._run_subcommand(subcommand)
        from celldiff.classifier import CheckpointKindError
        from celldiff.evaluate import EvaluationInputError, check_evaluation_inputs

        cfg = self.config_init[subcommand]
        out = Path(str(cfg.output_dir))
        try:
            try:  # every input, before any decoding or sampling
                self._judge, cfg.num_samples = check_evaluation_inputs(
                    self.model, self.datamodule, cfg.ckpt_path, cfg.classifier_ckpt, cfg.baseline, cfg.num_samples,
                    (cfg.get("metrics") or Namespace()).get("inception_weights"),
                    (cfg.get("metrics") or Namespace()).get("lpips_weights"),
                )  # fmt: skip
            except (CheckpointKindError, EvaluationInputError) as err:
                raise UsageError(str(err)) from None
            strategy = self.trainer.strategy
            launcher = getattr(strategy, "launcher", None)
            if launcher is not None:  # DDP: start the other ranks (as for fit), each generates its share
                launcher.launch(self._evaluate, cfg, trainer=self.trainer)
            else:
                self._evaluate(cfg)
        except BaseException:
            # --output_dir was new or empty when evaluate started, so what it holds now is this run's
            # unfinished output (a W&B id, logs), which would block the retry as "not empty".
            left = list(out.iterdir()) if out.is_dir() and not _is_child_rank() else []
            if left and not (out / "metrics.json").is_file():
                import shutil

                for entry in left:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                print(f"celldiff: evaluate did not finish: emptied {out} so that it can be retried", file=sys.stderr)
            raise

    def _evaluate(self, cfg: Any) -> None:
        from celldiff.classifier import CheckpointKindError, load_classifier
        from celldiff.evaluate import DEFAULT_NUM_SAMPLES, EvaluationInputError, run_evaluation

        strategy = self.trainer.strategy
        strategy.setup_environment()  # the process group under DDP, the device
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if strategy.global_rank == 0:
            self.datamodule.prepare_data()  # builds the image cache once
        if distributed:
            torch.distributed.barrier()
        device = strategy.root_device
        if cfg.baseline:
            from celldiff.baselines import FillBaseline

            model: Any = FillBaseline(cfg.baseline, self.datamodule.image_size)
        else:
            # Its kind and readability were checked (weights_only) in _parse_ckpt_path: no code is unpickled.
            state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
            self.model.load_state_dict(state)
            model = self.model
        model.to(device).eval()
        try:
            classifier = getattr(self, "_judge", None) or load_classifier(cfg.classifier_ckpt)
        except CheckpointKindError as err:
            raise UsageError(str(err)) from None
        classifier = classifier.to(device)
        try:
            run_evaluation(
                model,
                self.datamodule,
                classifier,
                cfg.output_dir,
                num_samples=DEFAULT_NUM_SAMPLES if cfg.num_samples is None else cfg.num_samples,
                seed=cfg.seed if cfg.seed is not None else 0,
                batch_size=self.datamodule.batch_size,
                inception_weights=cfg.metrics.inception_weights if cfg.get("metrics") else None,
                lpips_weights=cfg.metrics.lpips_weights if cfg.get("metrics") else None,
                loggers=self.trainer.loggers if strategy.global_rank == 0 else [],
                forward_context=self.trainer.precision_plugin.forward_context,  # --trainer.precision for the sampling
                network_precision=str(self.trainer.precision),
            )
        except EvaluationInputError as err:  # found once the test split is known (before any sampling)
            raise UsageError(str(err)) from None
        if distributed:
            torch.distributed.barrier()

    def after_predict(self) -> None:
        problems = getattr(self.datamodule, "predict_problems", [])
        if problems:
            raise PartialFailure(f"{len(problems)} input file(s) could not be used (listed above); the others were written")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except DataError:
            raise
        except (MisconfigurationException, ModuleNotFoundError) as err:  # Lightning's checks; a missing package
            raise UsageError(f"invalid configuration: {str(err).strip().splitlines()[0]}") from None
        except (ValueError, TypeError) as err:
            # A value the classes reject (jsonargparse wraps it in a Union report): one clear line.
            lines = [line.strip(" -") for line in str(err).splitlines() if line.strip()]
            reasons = [line for line in lines if not line.startswith(("Does not validate", "Subtypes", "Errors", "Given", "Expected a"))]
            raise UsageError(f"invalid configuration: {reasons[0] if reasons else lines[0]}") from None

    # ------------------------------------------------------------------ trainer
    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config_init[self.subcommand]
        callbacks = list(cfg.trainer.get("callbacks") or [])
        if self.subcommand == "fit":
            callbacks += [SaveSplit(), Throughput(), RNGState(), SaveOnSigterm()]
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(cfg.output_dir))
        callbacks.append(GracefulStop())  # Ctrl-C stops at the end of a step, like SIGTERM
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user configured
            # Lightning's writes via the system temp folder and copies: a full disk truncates last.ckpt.
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _import(class_path: str) -> type:
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default_logger_save_dir(args: list[str]) -> list[str]:
    """Let ``--trainer.logger CSVLogger`` (or TensorBoardLogger) work without a ``save_dir``.

    Those loggers require ``save_dir`` at parse time although celldiff always points it at the run
    directory; give them a placeholder that ``before_instantiate_classes`` replaces.
    """
    if any(a.startswith("--trainer.logger.save_dir") or a.startswith("--trainer.logger.init_args.save_dir") for a in args):
        return args
    out = list(args)
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--trainer.logger=") else None
        if arg == "--trainer.logger" and i + 1 < len(args):
            value = args[i + 1]
        if value and value.split(".")[-1] in ("CSVLogger", "TensorBoardLogger"):
            out.append(f"--trainer.logger.save_dir={RUNS_ROOT}")
    return out


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


def _join_negative_numbers(args: list[str]) -> list[str]:
    """``--model.lr -1e-4`` as ``--model.lr=-1e-4``: argparse takes ``-1e-4`` for an option and reports a missing value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args) and _NEGATIVE_NUMBER.match(args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``celldiff`` console script."""
    torch.set_float32_matmul_precision("high")
    # main() always hands LightningCLI the (adjusted) command line, which it warns about.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = _join_negative_numbers(_default_logger_save_dir(sys.argv[1:] if args is None else args))
    evaluate = bool(args) and args[0] == "evaluate"
    if evaluate:  # the test subcommand's parser, then celldiff.evaluate instead of trainer.test
        args = ["test", *args[1:]]
    STOP.reset()
    previous_sigterm = _install_sigterm_handler()
    try:
        _check_config_yaml(args)
        CellDiffCLI(args=args, evaluate=evaluate)
    except (DataError, UsageError, UnsupportedPrecisionError) as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(2)
    except PartialFailure as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteLossError as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(3)
    except CheckpointReadError as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointWriteError as err:  # a full disk while saving: not the user's input, but one line too
        print(f"celldiff: error: {err.strerror}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        _report_stop()
    except KeyboardInterrupt:  # Ctrl-C outside a Lightning loop (parsing, data preparation, evaluate)
        STOP.signal, STOP.hard = "SIGINT", True
        _report_stop()
    except SystemExit as err:
        if STOP.hard and err.code == 1:  # Lightning's sys.exit(1) after it handled a KeyboardInterrupt
            _report_stop()
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _install_sigterm_handler() -> Any:
    """Make SIGTERM outside Lightning's loops (data preparation, evaluate) stop with a line, not silently.

    Inside a loop (``STOP.graceful``) Lightning's own handler, which runs first, sets the flag that stops
    it at the end of the step; this one then does nothing. Returns the previous handler to restore, or
    None when another one was installed (a launcher's, a test's): that one is left alone.
    """
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def on_sigterm(signum: int, frame: Any) -> None:
        if STOP.graceful:
            return
        STOP.signal = STOP.signal or "SIGTERM"
        raise SIGTERMException

    signal.signal(signal.SIGTERM, on_sigterm)
    return signal.SIG_DFL


def _report_stop() -> None:
    """The last line after SIGTERM or Ctrl-C: what was saved or written, and how to go on; exit 143 or 130."""
    by_ctrl_c = STOP.signal == "SIGINT"
    name = "Ctrl-C" if by_ctrl_c else "SIGTERM"
    where = STOP.run_dir or os.environ.get(RUN_DIR_ENV) or "<run_dir>"
    if STOP.command == "fit":
        last = Path(where) / "checkpoints" / "last.ckpt"
        resume = f"resume with the same command plus --ckpt_path last --run_dir {where}"
        if STOP.saved_step is not None:
            message = f"{last} holds step {STOP.saved_step}; {resume}"
        elif last.is_file():
            lost = "the step in progress and those" if STOP.hard else "the steps"
            message = f"{lost} since the last checkpoint were not saved ({last} is older); {resume}"
        else:
            message = "no checkpoint had been saved yet, so there is nothing to resume: run the command again"
    elif STOP.message:
        message = STOP.message
    elif STOP.command == "evaluate":
        message = f"evaluate writes its results at the end, so nothing was written to {where}"
    elif STOP.command is None:
        message = "before the command started: nothing was written"
    else:
        message = "nothing was written"
    print(f"celldiff: stopped by {name}: {message}", file=sys.stderr)
    sys.exit(130 if by_ctrl_c else 143)  # 128 + the signal number, as a shell reports it


def _check_config_yaml(args: list[str]) -> None:
    """A YAML syntax error in a ``--config`` file: one line naming the file and the line (jsonargparse names neither)."""
    import yaml

    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in paths:
        path = Path(name)
        if not path.is_file():
            continue  # the parser reports a missing file
        try:
            yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UsageError(f"--config {path}: YAML syntax error{where}: {err.problem or err.context}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f"--config {path}: not a YAML file ({err.__class__.__name__}: {err})") from None


if __name__ == "__main__":
    main()
