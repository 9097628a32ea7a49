"""``celldiff`` command line: LightningCLI with run directories, data→model links and a W&B guard.

Every run gets its own directory (``celldiff.cli.rundirs``). ``celldiff fit --config X --ckpt_path last``
resumes the newest run of config X (or the one named by ``--run_dir``); ``celldiff evaluate`` is the
``test`` parser followed by ``celldiff.cli.evaluate``. ``--ckpt_path NAME.safetensors`` (a weights file,
``celldiff.training.weights``) loads its weights into the model the config builds; ``celldiff export``
(``celldiff.cli.export``) writes one and ``celldiff app`` starts the browser app (``celldiff.app``), both
outside LightningCLI. Errors in the user's input are one line each, with an exit code per kind (``main``).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from celldiff.cli.checkpoints import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    CheckpointReadError,
    CheckpointWriteError,
    check_resumable,
    checkpoint_update,
)
from celldiff.cli.cpu import slow_bf16_warning
from celldiff.cli.evaluate import check_evaluate_args, run_evaluate
from celldiff.cli.loggers import default_logger_save_dir, has_wandb, patch_loggers
from celldiff.cli.parsing import (
    CellDiffArgumentParser,
    check_config_yaml,
    check_seeds,
    check_trainer,
    invalid_configuration,
    join_negative_numbers,
    list_evaluate_in_help,
)
from celldiff.cli.rundirs import (
    RUN_DIR_ENV,
    RUNS_ROOT,
    RunConfigSaver,
    config_stem,
    is_child_rank,
    output_dir,
    run_directory,
    runs_root,
    use_run_split,
)
from celldiff.cli.stopping import install_sigterm_handler, report_stop
from celldiff.data import CellDataModule
from celldiff.data.datamodule import predicts_with_masks
from celldiff.errors import DataError, NonFiniteLossError, PartialFailure, UnsupportedPrecisionError, UsageError
from celldiff.evaluation.judge import DIFFUSION_CLASS_PATH
from celldiff.training.callbacks import RNGState, SaveSplit, Throughput
from celldiff.training.module import FP16_TRUE_MESSAGE
from celldiff.training.prediction import PredictionWriter
from celldiff.training.stopping import STOP, GracefulStop, SaveOnSigterm
from celldiff.training.weights import is_weights_file, load_into_module

NUM_SAMPLES_HELP = (
    "predict from noise: images to generate (with --classes: per class); evaluate: images to generate and"
    " measure (default 512). (With an inpainting predict, a deprecated spelling of --samples_per_image.)"
)
SAMPLES_PER_IMAGE_HELP = (
    "predict with masks (data.masks with a split predict_source, or --data.predict_images): samples drawn per"
    " masked image (model.samples_per_image); how many cells: --data.num_predict_samples."
)
EXIT_CODES = {DataError: 2, UsageError: 2, UnsupportedPrecisionError: 2, CheckpointReadError: 2, PartialFailure: 1,
              NonFiniteLossError: 3}  # fmt: skip


class CellDiffCLI(LightningCLI):
    """LightningCLI for celldiff (see the README for the commands)."""

    def __init__(self, *args: Any, evaluate: bool = False, **kwargs: Any) -> None:
        self.evaluate_mode = evaluate  # `celldiff evaluate` = the test parser + celldiff.cli.evaluate
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

    @property
    def command(self) -> str:
        """What the user typed: ``evaluate`` runs as the ``test`` subcommand."""
        return "evaluate" if self.evaluate_mode else str(self.subcommand)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            list_evaluate_in_help(self.parser)

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
            "--output_dir", type=str | None, default=None, help="predict, evaluate: directory for the images (new or empty)."
        )
        parser.add_argument("--num_samples", type=int | None, default=None, help=NUM_SAMPLES_HELP)
        parser.add_argument("--samples_per_image", type=int | None, default=None, help=SAMPLES_PER_IMAGE_HELP)
        parser.add_argument("--seed", type=int | None, default=None, help="Seed of everything, incl. sample noise.")
        for flag, text in (
            ("--classes", "predict with a class-conditional model: class names or ids, e.g. eosinophil,platelet or all."),
            ("--classifier_ckpt", "evaluate: cell classifier checkpoint."),
            ("--baseline", "evaluate: measure a non-learned inpainting fill (mean_fill, blur_fill) instead of a checkpoint."),
        ):
            parser.add_argument(flag, type=str | None, default=None, help=text)
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
        parser.add_argument("--morphology", type=bool, default=False,
                            help="evaluate: also compare nucleus and cell morphology per class, real vs generated (docs/morphology.md).")  # fmt: skip
        # predict's files: --prediction.nrow, --prediction.max_grid_panels (grid.png)
        parser.add_class_arguments(PredictionWriter, "prediction", skip={"output_dir"}, instantiate=False)
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model": {"class_path": DIFFUSION_CLASS_PATH},
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
        """Checks of ``--ckpt_path`` and what it brings, before anything is built (``checkpoint_update``)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        if self.evaluate_mode:
            check_evaluate_args(cfg)
        update = checkpoint_update(cfg, sub, "evaluate" if self.evaluate_mode else sub)
        if update is not None:
            self.config = self.parser.parse_object({sub: update}, self.config)

    # ------------------------------------------------------------------ checks before any work
    def _set_seed(self) -> None:  # LightningCLI's first step after parsing: check first
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            check_trainer(cfg.trainer)
            if cfg.trainer.get("enable_checkpointing") is False:
                if self.subcommand == "fit":
                    raise UsageError(
                        "--trainer.enable_checkpointing false: celldiff always keeps <run_dir>/checkpoints/last.ckpt (resume,"
                        " predict and evaluate need it); to keep only that file, use --checkpoint.save_top_k 0"
                    )
                cfg.trainer.enable_checkpointing = None  # only fit writes checkpoints: nothing to switch off
        if self.subcommand == "fit" and str(cfg.trainer.get("precision")) == "16-true":
            raise UsageError(FP16_TRUE_MESSAGE)  # before the run directory is written (module.setup checks too)
        check_seeds(cfg)
        super()._set_seed()

    # ------------------------------------------------------------------ run directory
    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        STOP.command = self.command
        root = runs_root(cfg)
        if cfg.seed is not None:
            from lightning.pytorch import seed_everything

            cfg.seed_everything = cfg.seed
            cfg.data.predict_seed = cfg.seed
            seed_everything(cfg.seed, workers=True)
        if cfg.classes is not None:
            cfg.data.predict_classes = cfg.classes
        if sub == "predict":
            _set_predict_counts(cfg)
        if sub == "predict" or self.evaluate_mode:
            run_dir = output_dir(cfg, root, self.command)
        else:
            run_dir = run_directory(sub, cfg, root, check_resumable)
        STOP.run_dir = str(run_dir)
        use_run_split(sub, cfg, run_dir)
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
        if sub == "predict" or (self.evaluate_mode and not has_wandb(cfg.trainer.logger)):
            cfg.trainer.logger = False
        else:
            cfg.trainer.logger = patch_loggers(cfg.trainer.logger, run_dir, config_stem(cfg))
        print(f"celldiff: {self.command} run directory: {run_dir}", file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except DataError:
            raise
        except (MisconfigurationException, ModuleNotFoundError) as err:  # Lightning's checks; a missing package
            raise UsageError(f"invalid configuration: {str(err).strip().splitlines()[0]}") from None
        except (ValueError, TypeError) as err:
            raise invalid_configuration(err) from None
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path and is_weights_file(ckpt_path):  # a weights file: loaded here, never by Lightning (torch.load)
            load_into_module(self.model, ckpt_path, "--ckpt_path")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config_init[self.subcommand]
        callbacks = list(cfg.trainer.get("callbacks") or [])
        if self.subcommand == "fit":
            callbacks += [SaveSplit(), Throughput(), RNGState(), SaveOnSigterm()]
        if self.subcommand == "predict":
            grid = cfg.get("prediction") or Namespace()  # --prediction.nrow, --prediction.max_grid_panels
            callbacks.append(PredictionWriter(cfg.output_dir, **grid.as_dict()))
        callbacks.append(GracefulStop())  # Ctrl-C stops at the end of a step, like SIGTERM
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        warning = slow_bf16_warning(trainer.precision, isinstance(trainer.accelerator, CPUAccelerator))
        if warning and trainer.is_global_zero:
            print(warning, file=sys.stderr)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user configured
            # Lightning's writes via the system temp folder and copies: a full disk truncates last.ckpt.
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    # ------------------------------------------------------------------ running
    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") and is_weights_file(kwargs["ckpt_path"]):
            kwargs["ckpt_path"] = None  # its weights are in the model already (instantiate_classes)
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        if not self.evaluate_mode:
            return super()._run_subcommand(subcommand)
        run_evaluate(self.model, self.datamodule, self.trainer, self.config_init[subcommand])

    def after_predict(self) -> None:
        problems = getattr(self.datamodule, "predict_problems", [])
        if problems:
            raise PartialFailure(f"{len(problems)} input file(s) could not be used (listed above); the others were written")


def _set_predict_counts(cfg: Namespace) -> None:
    """predict: ``--num_samples`` (images from noise) and ``--samples_per_image`` (per masked image) to their settings.

    With masks (``predicts_with_masks``) ``--num_samples`` keeps its old meaning, samples per image, with
    a deprecation note; from noise ``--samples_per_image`` cannot apply.
    """
    data = cfg.data
    inpainting = predicts_with_masks(data.get("predict_images"), data.get("predict_source", "noise"), data.get("masks"),
                                     data.get("eval_masks"))  # fmt: skip
    num, per_image = cfg.get("num_samples"), cfg.get("samples_per_image")
    for flag, value in (("--num_samples", num), ("--samples_per_image", per_image)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not inpainting:
        if per_image is not None:
            raise UsageError(
                f"--samples_per_image {per_image}: this predict generates from noise (no masks); --num_samples sets how"
                " many images; --samples_per_image is for inpainting (data.masks with a split predict_source, or"
                " --data.predict_images)"
            )
        if num is not None:
            cfg.data.num_predict_samples = num
        return
    if num is not None:
        if per_image is not None:
            raise UsageError(
                f"--num_samples {num} and --samples_per_image {per_image}: this predict inpaints, where --num_samples is"
                " the old spelling of --samples_per_image; give only --samples_per_image"
            )
        if not is_child_rank():
            print(f"celldiff: note: --num_samples with inpainting is deprecated: use --samples_per_image {num}"
                  " (samples per masked image; --num_samples will only count images generated from noise)",
                  file=sys.stderr)  # fmt: skip
        per_image = num
    if per_image is not None:
        cfg.model.init_args.samples_per_image = per_image


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``celldiff`` console script (and of ``python -m celldiff.cli``).

    Exit codes: 0 done; 1 some inputs failed (the rest written) or a checkpoint could not be written;
    2 a usage or data error; 3 a non-finite loss; 130 / 143 stopped by Ctrl-C / SIGTERM. ``export`` and
    ``app`` run outside LightningCLI (``celldiff.cli.export``, ``celldiff.app``).
    """
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in ("export", "app"):
        code = _run_tool(args[0], args[1:])
        if code:
            sys.exit(code)
        return
    torch.set_float32_matmul_precision("high")
    # main() always hands LightningCLI the (adjusted) command line, which it warns about.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = join_negative_numbers(default_logger_save_dir(args, RUNS_ROOT))
    evaluate = bool(args) and args[0] == "evaluate"
    if evaluate:  # the test subcommand's parser, then celldiff.cli.evaluate instead of trainer.test
        args = ["test", *args[1:]]
    STOP.reset()
    previous_sigterm = install_sigterm_handler()
    try:
        check_config_yaml(args)
        CellDiffCLI(args=args, evaluate=evaluate)
    except tuple(EXIT_CODES) as err:
        if not is_child_rank():  # every DDP rank meets the same bad input: one line, from the rank the user started
            print(f"celldiff: error: {err}", file=sys.stderr)
        sys.exit(next(code for kind, code in EXIT_CODES.items() if isinstance(err, kind)))
    except CheckpointWriteError as err:  # a full disk while saving: not the user's input, but one line too
        print(f"celldiff: error: {err.strerror}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        report_stop()
    except KeyboardInterrupt:  # Ctrl-C outside a Lightning loop (parsing, data preparation, evaluate)
        STOP.signal, STOP.hard = "SIGINT", True
        report_stop()
    except SystemExit as err:
        if STOP.hard and err.code == 1:  # Lightning's sys.exit(1) after it handled a KeyboardInterrupt
            report_stop()
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run_tool(name: str, args: list[str]) -> int:
    """``celldiff export`` / ``celldiff app``: their own argument parsers, imported only when asked for."""
    if name == "export":
        from celldiff.cli.export import main as export_main

        return export_main(args)
    try:
        from celldiff.app import main as app_main
    except ImportError as err:  # the app's packages are an extra (or the app is not in this installation)
        missing = f" (no module named {err.name!r})" if getattr(err, "name", None) else ""
        print(f"celldiff: error: celldiff app needs the app extra: pip install 'celldiff[app]'{missing}", file=sys.stderr)
        return 2
    return int(app_main(args) or 0)


if __name__ == "__main__":
    main()
