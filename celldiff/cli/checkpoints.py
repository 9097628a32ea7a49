"""Checkpoints on the command line: what ``--ckpt_path`` brings, checked before any work; atomic writes.

``checkpoint_update`` reads a checkpoint's kind and hyperparameters (``weights_only=True``: no code is
unpickled), or a weights file's metadata (``celldiff.training.weights``: safetensors), and returns the
config values it brings; it also checks ``--model.init_weights`` against the config. ``AtomicCheckpointIO``
and ``AtomicModelCheckpoint`` write checkpoints so that a full disk or a crash never leaves a truncated
``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import shutil
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from celldiff.cli.loggers import class_path_of
from celldiff.cli.rundirs import is_child_rank, last_checkpoint
from celldiff.errors import UsageError
from celldiff.evaluation.judge import (
    CLASSIFIER_CLASS_PATH,
    DIFFUSION_CLASS_PATH,
    CheckpointKindError,
    canonical_class_path,
    checkpoint_class_path,
    describe_kind,
    read_checkpoint,
)
from celldiff.masks.mixture import spec_weights
from celldiff.training.weights import (
    check_fits,
    is_weights_file,
    mismatch_line,
    read_init_weights_metadata,
    read_weights_metadata,
)

LIGHTNING_ONLY = ("best", "hpc", "registry")  # --ckpt_path values only fit understands


class CheckpointReadError(Exception):
    """A checkpoint file that cannot be read: truncated, corrupt or not a checkpoint (reported as one line)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, no permission); the previous file is intact."""


# ------------------------------------------------------------------------------------ what --ckpt_path brings
def checkpoint_update(cfg: Namespace, sub: str, command: str) -> dict[str, Any] | None:
    """The config values a checkpoint brings: its architecture (so any config can load any checkpoint).

    Only the keys the model class lists in ``CHECKPOINT_ARCH_KEYS`` (shapes and the diffusion process)
    are taken; sampling choices stay with the config and the command line. A class-conditional model or
    a classifier also brings its class list (``class_names``): its labels mean those classes, so the data
    is read with them. ``--ckpt_path last`` is resolved here for validate / test / predict / evaluate
    (``cfg.ckpt_path`` becomes the file). A weights file (``NAME.safetensors``) brings the same from its
    metadata, for every command but fit (the CLI then loads its weights into the built model). fit with
    ``--model.init_weights`` checks that file's architecture against the config and brings its classes.

    Checked here, before anything is built (``UsageError``, one line each): a checkpoint of the wrong kind
    for the command (a classifier for predict or evaluate; for fit, a checkpoint of another kind than the
    config trains), predict without a checkpoint, ``--ckpt_path last`` with no run to take it from,
    ``--classes`` with an unconditional model, an inpainting model without masks, and a class list that
    contradicts the checkpoint's.

    Args:
        cfg: The subcommand's config. sub: The Lightning subcommand. command: What the user typed
            (``evaluate`` runs as ``test``).

    Returns:
        ``{"model": {"class_path", "init_args"}, "data": {...}}`` for ``parse_object``, or None.
    """
    ckpt_path = cfg.get("ckpt_path")
    if command == "predict" and not ckpt_path:
        raise UsageError(
            "predict needs --ckpt_path: a diffusion checkpoint file, or 'last' for the newest run of this config"
            " (without one it would sample from untrained, random weights)"
        )
    if sub != "fit" and ckpt_path in LIGHTNING_ONLY:
        raise UsageError(
            f"--ckpt_path {ckpt_path}: only fit knows a '{ckpt_path}' checkpoint; {command} needs a checkpoint file"
            " or 'last' (the newest run of this config, or the run given by --run_dir)"
        )
    read_path = ckpt_path
    if ckpt_path == "last":
        found, missing = last_checkpoint(cfg)
        if sub == "fit":  # resolved again (and reported) with the run directory; read here for its kind
            if found is None:
                return None
            read_path = str(found)
        else:
            if found is None:
                raise UsageError(
                    f"--ckpt_path last: {missing}; give --run_dir of the run, or a checkpoint file"
                    f" (without a checkpoint {command} would use untrained, random weights)"
                )
            if not is_child_rank():
                print(f"celldiff: --ckpt_path last: {found}", file=sys.stderr)
            cfg.ckpt_path = ckpt_path = read_path = str(found)
    if not ckpt_path or ckpt_path in LIGHTNING_ONLY:
        return _init_weights_update(cfg, command) if sub == "fit" and not ckpt_path else None
    if is_weights_file(read_path):
        if sub == "fit":
            raise UsageError(
                f"--ckpt_path {ckpt_path} is a weights file (weights only: no optimizer or loop state to resume);"
                f" start a new run from it with --model.init_weights {ckpt_path}"
            )
        meta = read_weights_metadata(read_path, "--ckpt_path")  # one line if unusable (WeightsFileError)
        class_path, hparams, noun = canonical_class_path(meta["class_path"]), dict(meta["hparams"]), "weights file"
        training_masks = json.loads(meta.get("training_masks") or "{}")
    else:
        try:
            ckpt = read_checkpoint(read_path, "--ckpt_path")
        except CheckpointKindError as err:
            if ckpt_path == "last":  # fit: reported with the run directory, and what to resume from instead
                return None
            raise UsageError(str(err)) from None
        class_path, noun = checkpoint_class_path(ckpt), "checkpoint"
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k not in ("_class_path", "_instantiator")}
        training_masks = (ckpt.get("datamodule_hyper_parameters") or {}).get("masks") or {}
    hparams["_generates"] = spec_weights(training_masks).get("full", 0) > 0  # trained with nothing observed too
    kind = describe_kind(class_path)
    if command in ("predict", "evaluate") and class_path != DIFFUSION_CLASS_PATH:
        swapped = " (--ckpt_path and --classifier_ckpt swapped?)" if command == "evaluate" and class_path == CLASSIFIER_CLASS_PATH else ""
        raise UsageError(
            f"--ckpt_path {ckpt_path} is {kind} {noun}; {command} needs a diffusion model {noun}"
            f" ({DIFFUSION_CLASS_PATH}){swapped}"
        )
    if noun == "checkpoint" and (not class_path or not (ckpt.get("hyper_parameters") or {}).get("_class_path")):
        return None  # not saved by the celldiff CLI: Lightning loads it into the configured model as it is
    run_config = Path(str(read_path)).resolve().parent.parent / "config.yaml"
    own_config = f" ({run_config})" if run_config.is_file() and noun == "checkpoint" else ""
    _check_against_config(cfg, sub, command, str(ckpt_path), class_path, hparams, own_config)
    model_cls = _import(class_path)
    keys = getattr(model_cls, "CHECKPOINT_ARCH_KEYS", ())
    update: dict[str, Any] = {"model": {"class_path": class_path, "init_args": {k: hparams[k] for k in keys if k in hparams}}}
    if "image_size" in hparams:  # the data must match the network the checkpoint holds
        update["data"] = {"image_size": hparams["image_size"]}
    trained_classes = hparams.get("class_names")
    if trained_classes and (class_path == CLASSIFIER_CLASS_PATH or hparams.get("class_conditional")):
        classes = _data_classes(cfg, command, str(ckpt_path), [str(c) for c in trained_classes])
        if classes is not None:
            update.setdefault("data", {})["classes"] = classes
    return update


def _check_against_config(
    cfg: Namespace, sub: str, command: str, ckpt_path: str, class_path: str, hparams: dict[str, Any], own_config: str
) -> None:
    """A checkpoint that cannot work with this config or command: one line that says what to change."""
    kind = describe_kind(class_path)
    config_class = canonical_class_path(class_path_of(cfg.get("model")))
    if sub == "fit" and config_class and config_class != class_path:
        raise UsageError(
            f"--ckpt_path {ckpt_path} is {kind} checkpoint but the config trains {describe_kind(config_class)};"
            f" resuming continues the checkpoint's training: use the config it was trained with{own_config}"
        )
    if class_path != DIFFUSION_CLASS_PATH:
        return
    init_args = (cfg.get("model") or Namespace()).get("init_args") or Namespace()
    if sub == "fit":
        for key, what in (("inpainting", "an inpainting"), ("class_conditional", "a class-conditional")):
            if bool(hparams.get(key)) != bool(init_args.get(key)):
                raise UsageError(
                    f"--ckpt_path {ckpt_path}: resuming continues the checkpoint's training, but model.{key} is"
                    f" {bool(hparams.get(key))} in the checkpoint and {bool(init_args.get(key))} in the config"
                    f" ({'it is' if hparams.get(key) else 'the config trains'} {what} model); resume with the"
                    f" config it was trained with{own_config}, or start a new run"
                )
    if command == "predict" and cfg.get("classes") is not None and not hparams.get("class_conditional"):
        raise UsageError(
            f"--classes {cfg.classes}: the checkpoint {ckpt_path} is unconditional (trained without class labels),"
            " so it cannot generate chosen classes; drop --classes or use a class-conditional (Phase 3) checkpoint"
        )
    eval_masks = cfg.data.get("eval_masks")
    if command == "evaluate" and hparams.get("inpainting") and eval_masks and spec_weights(eval_masks).keys() == {"full"}:
        if not hparams["_generates"]:
            raise UsageError(f"--data.eval_masks {eval_masks}: the inpainting model {ckpt_path} was not trained with the"
                             " 'full' mask family (nothing observed), so it cannot be evaluated as a generator")  # fmt: skip
    if hparams.get("inpainting") and command != "evaluate":
        data = cfg.data
        if sub == "fit":
            ok, needs = data.get("masks") is not None, "data.masks (the masks it trains on)"
        elif sub == "predict":
            from_noise = data.get("predict_source", "noise") == "noise"
            ok = data.get("predict_images") is not None or (hparams["_generates"] if from_noise else (
                data.get("eval_masks") is not None or data.get("masks") is not None))  # fmt: skip
            needs = ("data.predict_source test with data.masks or data.eval_masks, or --data.predict_images (it was"
                     " not trained with the 'full' mask family, so it cannot generate from noise)")  # fmt: skip
        else:
            ok, needs = data.get("eval_masks") is not None or data.get("masks") is not None, "data.masks or data.eval_masks"
        if not ok:
            raise UsageError(
                f"--ckpt_path {ckpt_path} is an inpainting model (model.inpainting: true), which needs a mask with"
                f" every image, but this config sets none: set {needs}, e.g. with the config it was trained"
                f" with{own_config or ' (configs/phase2.yaml)'}"
            )


def _init_weights_update(cfg: Namespace, command: str) -> dict[str, Any] | None:
    """fit ``--model.init_weights FILE``: the file must hold the config's kind and architecture; it brings its classes."""
    init_args = (cfg.get("model") or Namespace()).get("init_args") or Namespace()
    path = init_args.get("init_weights")
    if not path:
        return None
    meta = read_init_weights_metadata(path)  # one line if unusable (WeightsFileError)
    class_path, hparams = canonical_class_path(meta["class_path"]), meta["hparams"]
    config_class = canonical_class_path(class_path_of(cfg.get("model"))) or DIFFUSION_CLASS_PATH
    if class_path != config_class:
        raise UsageError(
            f"--model.init_weights {path} holds {describe_kind(class_path)}, but the config trains {describe_kind(config_class)}"
        )
    config = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args)
    mismatch = check_fits(hparams, config, class_path)
    if mismatch:
        raise UsageError(
            f"--model.init_weights {path} does not fit the config ({mismatch_line(mismatch, hparams, config)});"
            " fine-tuning keeps the file's architecture: set these as the file has them"
        )
    if not is_child_rank():
        step = f" of step {meta['global_step']}" if meta.get("global_step") else ""
        print(f"celldiff: fit starts from {path} ({meta.get('weights', '')} weights{step})", file=sys.stderr)
    trained = hparams.get("class_names")
    if trained and (class_path == CLASSIFIER_CLASS_PATH or hparams.get("class_conditional")):
        classes = _data_classes(cfg, command, str(path), [str(c) for c in trained], "--model.init_weights")
        if classes is not None:
            return {"data": {"classes": classes}}
    return None


def _data_classes(cfg: Namespace, command: str, ckpt_path: str, trained: list[str], option: str = "--ckpt_path") -> list[str] | None:
    """``data.classes`` for a checkpoint trained on ``trained``: None to keep the config's (it matches)."""
    listing, given = ", ".join(trained), cfg.data.get("classes")
    if given is not None:
        if sorted({str(c) for c in given}) != sorted(trained):
            tip = "; to generate only some of them, name them in --classes" if command == "predict" else ""
            raise UsageError(
                f"{option} {ckpt_path} was trained on the classes {listing} (its labels mean these), but"
                f" data.classes is {', '.join(map(str, given))}; drop --data.classes: the checkpoint brings its"
                f" classes{tip}"
            )
        return None
    from celldiff.data.datamodule import resolve_data_dir
    from celldiff.data.scan import scan_dataset

    try:
        available: list[str] | None = list(scan_dataset(resolve_data_dir(str(cfg.data.data_dir))).class_names)
    except Exception:  # a data problem: reported, as always, when the data module is built
        available = None
    missing = [c for c in trained if available is not None and c not in available]
    if missing:
        raise UsageError(
            f"{option} {ckpt_path} was trained on the classes {listing}, but data_dir {cfg.data.data_dir}"
            f" has no {', '.join(missing)} (it has {', '.join(available or [])})"
        )
    return trained if available != trained else None  # e.g. trained on a subset: read the data with its classes


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------ atomic writes
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_beside(path: Path) -> Path:
    # Hidden and ending in .tmp: never taken for a checkpoint (Lightning's "last" lookup wants last*.ckpt).
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash, a full disk or a kill while saving leaves the previous file intact (the rename is
    atomic on one file system); the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            raise CheckpointWriteError(
                err.errno, f"could not write {path} ({err}); the previous file, if any, is intact"
            ) from None
        raise
    _fsync_dir(path.parent)


def _is_corrupt_checkpoint_error(err: BaseException) -> bool:
    text = str(err)
    if isinstance(err, (EOFError, zipfile.BadZipFile)):
        return True
    if isinstance(err, pickle.UnpicklingError):
        return "Weights only load failed" not in text  # that one is about what the file holds, not its bytes
    return isinstance(err, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)


def check_checkpoint_file(path: str | Path) -> None:
    """Raise ``CheckpointReadError`` if ``path`` is not a whole torch zip file (cheap: reads its directory only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            whole = any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointReadError(f"{path} is not a readable checkpoint (truncated or corrupt: {err})") from None
    if not whole:
        raise CheckpointReadError(f"{path} is not a readable checkpoint (a zip file without torch data)")


def check_resumable(last: Path) -> None:
    """fit ``--ckpt_path last``: the run's last.ckpt must be whole, else one line naming what to do."""
    try:
        check_checkpoint_file(last)
    except CheckpointReadError as err:
        raise UsageError(f"--ckpt_path last: {err}; resume from another checkpoint in {last.parent} with --ckpt_path FILE") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, except that a checkpoint is written beside its target and renamed.

    Lightning's writes through an fsspec transaction whose temporary file lies in the system temp
    folder and is then copied over the target: a full disk or a crash during the copy leaves a
    truncated ``last.ckpt`` in place of the good one. Here the checkpoint goes to a temporary file in
    the same directory, is fsynced and ``os.replace``d over the target (see ``atomic_torch_save``).
    Remote paths (``s3://`` ...) keep Lightning's behaviour. Loading a truncated or corrupt file raises
    ``CheckpointReadError`` (one line from the CLI) instead of a zip-reader traceback.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as err:
            if _is_corrupt_checkpoint_error(err):
                raise CheckpointReadError(f"{path} is not a readable checkpoint (truncated or corrupt: {err})") from None
            raise


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``save_last="link"`` replaces ``last.ckpt`` atomically.

    (Lightning's removes ``last.ckpt`` first and then links or copies: a crash in between leaves no
    ``last.ckpt``, or a partial copy.) Checkpoints themselves are written by ``AtomicCheckpointIO``.
    Its state in checkpoints is stored under ``ModelCheckpoint``'s key, so old runs resume alike.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            tmp = _temp_beside(Path(linkpath))
            try:
                try:
                    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                except OSError:  # no symlinks (Windows without the right): copy, still atomically
                    shutil.copyfile(filepath, tmp)
                    with open(tmp, "rb+") as file:
                        os.fsync(file.fileno())
                os.replace(tmp, linkpath)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(Path(linkpath).parent)
        trainer.strategy.barrier()
