"""``celldiff`` command line: LightningCLI with run directories, data→model links and W&B guard.

Every run gets its own directory (config.yaml, checkpoints/ with last.ckpt, split.json, samples/,
logs). ``celldiff fit --config X --ckpt_path last`` resumes the newest run of config X (or the one
named by ``--run_dir``).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from celldiff.callbacks import PredictionWriter, RNGState, SaveOnSigterm, SaveSplit, Throughput
from celldiff.data import CellDataModule, DataError
from celldiff.module import NonFiniteLossError

RUNS_ROOT = "runs"


class UsageError(Exception):
    """A command-line value that cannot work; reported as one line, exit code 2."""


class PartialFailure(Exception):
    """Some inputs failed (each reported already) while the rest ran; exit code 1."""


RUN_DIR_ENV = "CELLDIFF_RUN_DIR"


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
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory of this run (default runs/<config name>/<time>); with --ckpt_path last, the run to resume.",
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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        process) are taken; sampling choices stay with the config and the command line.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if self.evaluate_mode and ckpt_path and self.config[sub].get("baseline"):
            raise UsageError("evaluate takes either --ckpt_path (a diffusion model) or --baseline (a non-learned fill), not both")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or not Path(ckpt_path).is_file():
            if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
                raise UsageError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
            return
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:  # a truncated or foreign file
            raise UsageError(f"--ckpt_path {ckpt_path}: not a readable celldiff checkpoint ({err.__class__.__name__})") from None
        hparams = dict(ckpt.get("hyper_parameters", {}))
        class_path = hparams.pop("_class_path", None)
        if not class_path:
            return
        model_cls = _import(class_path)
        keys = getattr(model_cls, "CHECKPOINT_ARCH_KEYS", ())
        init_args = {k: hparams[k] for k in keys if k in hparams}
        update: dict[str, Any] = {"model": {"class_path": class_path, "init_args": init_args}}
        if "image_size" in hparams:  # the data must match the network the checkpoint holds
            update["data"] = {"image_size": hparams["image_size"]}
        self.config = self.parser.parse_object({sub: update}, self.config)

    # ------------------------------------------------------------------ run directory
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        stem = Path(str(cfg.config[0])).stem if cfg.get("config") else "celldiff"
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
        if sub == "predict" or self.evaluate_mode:
            out = cfg.output_dir
            if out is None:
                base = Path(cfg.ckpt_path).resolve().parent.parent if cfg.ckpt_path else Path(RUNS_ROOT) / stem
                out = base / f"{'evaluate' if self.evaluate_mode else 'predict'}-{_timestamp()}"
            out = Path(out)
            if out.exists() and any(out.iterdir()):
                raise UsageError(f"--output_dir {out} is not empty; choose a new or empty directory (nothing was overwritten)")
            cfg.output_dir = str(out)
            return out
        if sub != "fit":
            return Path(cfg.run_dir) if cfg.run_dir else Path(RUNS_ROOT) / stem / f"{_timestamp()}-{sub}"
        if cfg.ckpt_path == "last":
            if cfg.run_dir:
                run_dir = Path(cfg.run_dir)
            else:
                candidates = sorted(Path(RUNS_ROOT, stem).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
                if not candidates:
                    raise UsageError(
                        f"--ckpt_path last: no run of config '{stem}' under {RUNS_ROOT}/{stem}/ has checkpoints/last.ckpt;"
                        " pass --run_dir of the run to resume"
                    )
                run_dir = candidates[-1].parent.parent
            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                raise UsageError(f"--ckpt_path last: {run_dir}/checkpoints/last.ckpt does not exist")
            print(f"celldiff: resuming {run_dir}/checkpoints/last.ckpt", file=sys.stderr)
            return run_dir
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
            requeued = any(run_dir.glob("hpc_ckpt_*.ckpt"))  # SLURM requeue: Lightning resumes it
            if (run_dir / "config.yaml").exists() and not requeued and not cfg.ckpt_path and not _is_child_rank():
                raise UsageError(
                    f"--run_dir {run_dir} already holds a run; resume it with --ckpt_path last or choose a new --run_dir"
                )
            return run_dir
        return shared_default_run_dir(Path(RUNS_ROOT) / stem)

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
        cfg = self.config_init[subcommand]
        if not cfg.baseline and (not cfg.ckpt_path or not Path(cfg.ckpt_path).is_file()):
            raise UsageError(f"evaluate needs --ckpt_path of a diffusion checkpoint (got {cfg.ckpt_path})")
        if not cfg.classifier_ckpt or not Path(cfg.classifier_ckpt).is_file():
            raise UsageError(
                f"evaluate needs --classifier_ckpt of a cell classifier (celldiff fit --config configs/classifier.yaml); got {cfg.classifier_ckpt}"
            )
        strategy = self.trainer.strategy
        launcher = getattr(strategy, "launcher", None)
        if launcher is not None:  # DDP: start the other ranks (as for fit), each generates its share
            launcher.launch(self._evaluate, cfg, trainer=self.trainer)
        else:
            self._evaluate(cfg)

    def _evaluate(self, cfg: Any) -> None:
        from celldiff.classifier import load_classifier
        from celldiff.evaluate import judge_size_problem, run_evaluation

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
            state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
            self.model.load_state_dict(state)
            model = self.model
        model.to(device).eval()
        classifier = load_classifier(cfg.classifier_ckpt).to(device)
        problem = judge_size_problem(classifier.hparams.image_size, self.datamodule.image_size)
        if problem:
            raise UsageError(f"{problem} (--classifier_ckpt {cfg.classifier_ckpt})")
        run_evaluation(
            model,
            self.datamodule,
            classifier,
            cfg.output_dir,
            num_samples=cfg.num_samples or 512,
            seed=cfg.seed if cfg.seed is not None else 0,
            batch_size=self.datamodule.batch_size,
            inception_weights=cfg.metrics.inception_weights if cfg.get("metrics") else None,
            lpips_weights=cfg.metrics.lpips_weights if cfg.get("metrics") else None,
            loggers=self.trainer.loggers if strategy.global_rank == 0 else [],
            forward_context=self.trainer.precision_plugin.forward_context,  # --trainer.precision for the sampling
            network_precision=str(self.trainer.precision),
        )
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
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``celldiff`` console script."""
    torch.set_float32_matmul_precision("high")
    # main() always hands LightningCLI the (adjusted) command line, which it warns about.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = _default_logger_save_dir(sys.argv[1:] if args is None else args)
    evaluate = bool(args) and args[0] == "evaluate"
    if evaluate:  # the test subcommand's parser, then celldiff.evaluate instead of trainer.test
        args = ["test", *args[1:]]
    try:
        CellDiffCLI(args=args, evaluate=evaluate)
    except (DataError, UsageError) as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(2)
    except PartialFailure as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteLossError as err:
        print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(3)
    except SIGTERMException:
        run_dir = os.environ.get(RUN_DIR_ENV, "<run_dir>")
        print(f"celldiff: stopped by SIGTERM; resume with the same command plus --ckpt_path last --run_dir {run_dir}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports a terminated process


if __name__ == "__main__":
    main()
