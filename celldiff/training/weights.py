"""Trained models as weights files: exported from a checkpoint, loaded into a model, checked against a config.

``export_weights`` turns a Lightning checkpoint into ``weights/NAME.safetensors``: the network's weights in
float16 (a diffusion model's EMA U-Net by default, or a cell classifier's ResNet) and, in the file's
metadata, the model's class path and all its hyperparameters (architecture, schedule, prediction type,
sampler defaults, class names) with the training step it was saved at. ``load_diffusion_module`` builds a
ready ``DiffusionModule`` from such a file (or from a checkpoint); ``load_into_module`` loads one into a
model a config built (``--ckpt_path NAME.safetensors``), ``init_weights_for_fit`` starts a fine-tuning run
from one (``--model.init_weights``). Weights files are read with safetensors and checkpoints with
``torch.load(weights_only=True)``: nothing is unpickled. The file format itself lives in
``celldiff.nets.weightsfile``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from celldiff.errors import UsageError
from celldiff.masks.mixture import spec_weights
from celldiff.nets.classifier import nest_flat_keys
from celldiff.nets.weightsfile import (
    FORMAT_KEY,
    FORMAT_TAG,
    SUFFIX,
    WeightsFileError,
    is_weights_file,
    read_tensors,
    read_weights_metadata,
    same_weights_file,
    write_weights_file,
)

__all__ = ["WeightsFileError", "check_fits", "export_weights", "init_weights_for_fit", "is_weights_file",
           "load_diffusion_module", "load_into_module", "load_weights", "mismatch_line", "read_init_weights_metadata",
           "read_weights_metadata"]  # fmt: skip

# The classes a weights file can hold (the names celldiff.evaluation.judge gives them), and their older names.
DIFFUSION_CLASS_PATH = "celldiff.training.module.DiffusionModule"
CLASSIFIER_CLASS_PATH = "celldiff.training.classifier.CellClassifier"
_ALIASES = {"celldiff.module.DiffusionModule": DIFFUSION_CLASS_PATH, "celldiff.classifier.CellClassifier": CLASSIFIER_CLASS_PATH}
_KINDS = {DIFFUSION_CLASS_PATH: "a diffusion model", CLASSIFIER_CLASS_PATH: "a cell classifier"}
WEIGHTS_CHOICES = ("ema", "raw")
# Paths on the machine that trained the model: kept out of a shipped file's hyperparameters.
LOCAL_HPARAMS = ("init_weights",)
RESERVED_METADATA = (FORMAT_KEY, "class_path", "hparams", "weights", "dtype", "training_masks")


def _where(path: str | Path, option: str) -> str:
    return f"{option} {path}" if option else str(path)


def _kind(class_path: str | None) -> str:
    return _KINDS.get(str(class_path), f"a {class_path}" if class_path else "an unrecognised model")


def _model_class(class_path: str) -> type[L.LightningModule]:
    """The LightningModule class of a known class path (never an arbitrary import named by a file)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _read_checkpoint(path: str | Path, option: str) -> dict[str, Any]:
    """A Lightning checkpoint, ``torch.load(weights_only=True)``; ``WeightsFileError`` (one line) if unusable."""
    where = _where(path, option)
    if not Path(path).is_file():
        raise WeightsFileError(f"{where}: no such checkpoint file" if not Path(path).exists() else f"{where} is a directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsFileError(f"{where}: not a readable checkpoint ({err.__class__.__name__}: truncated or corrupt)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise WeightsFileError(f"{where}: not a Lightning checkpoint (it holds no state_dict)")
    return ckpt


def _checkpoint_class_path(ckpt: dict[str, Any]) -> str | None:
    """The class a checkpoint was saved from: its ``_class_path``, else told by its parameter names."""
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if class_path:
        return _ALIASES.get(str(class_path), str(class_path))
    keys = list(ckpt["state_dict"])
    if any(k.startswith("unet.") for k in keys):
        return DIFFUSION_CLASS_PATH
    if any(k.startswith(("head.", "net.head.")) for k in keys):
        return CLASSIFIER_CLASS_PATH
    return None


def _network_state(ckpt: dict[str, Any], class_path: str, weights: str, where: str) -> tuple[dict[str, Tensor], str]:
    """The exported network's state dict (keys without the module's prefix) and which weights they are."""
    state = dict(ckpt["state_dict"])
    if class_path == CLASSIFIER_CLASS_PATH:
        nest_flat_keys(state)  # a checkpoint from before the redesign
        prefix, which = "net.", "net"
    else:
        prefix, which = ("ema_unet." if weights == "ema" else "unet."), weights
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        hint = "; export the raw weights with --weights raw" if weights == "ema" else ""
        raise WeightsFileError(f"{where}: holds no {prefix}* weights{hint}")
    return out, which


def _half(name: str, tensor: Tensor, where: str) -> Tensor:
    """A floating tensor in float16 (others unchanged); refused if float16 cannot hold its values."""
    if not tensor.is_floating_point():
        return tensor.detach().contiguous()
    half = tensor.detach().to(torch.float16).contiguous()
    if not torch.isfinite(half).all() and torch.isfinite(tensor).all():
        raise WeightsFileError(f"{where}: {name} has values beyond float16's range (±65504); it cannot be exported in fp16")
    return half


def _images_seen(ckpt: dict[str, Any]) -> int | None:
    """Training images one process saw: its completed training batches times ``data.batch_size``."""
    try:
        batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
        return int(batches) * int(ckpt["datamodule_hyper_parameters"]["batch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def _parent_images_seen(path: Path) -> int | None:
    """The images the ``--model.init_weights`` file's weights had seen (its lineage's total), when it is here to ask."""
    try:
        meta = read_weights_metadata(path)
        return int(meta.get("images_seen_total") or meta["images_seen"])
    except (WeightsFileError, KeyError, ValueError, OSError):
        return None


def export_weights(
    checkpoint_path: str | Path,
    output_path: str | Path,
    *,
    weights: str = "ema",
    extra_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write a checkpoint's network as a float16 safetensors weights file with its hyperparameters.

    Args:
        checkpoint_path: A Lightning checkpoint of a ``DiffusionModule`` or a ``CellClassifier``.
        output_path: The weights file to write (``NAME.safetensors``), atomically.
        weights: A diffusion model's ``ema`` (the averaged U-Net, what sampling uses) or ``raw`` weights; a
            classifier has one set of weights and ignores it.
        extra_metadata: More metadata (values become strings), e.g. a licence or ``images_seen`` for a DDP run.
        overwrite: Replace an existing file that holds other weights (one that holds these is left as it is).

    Returns:
        The metadata written (strings): ``celldiff_format``, ``class_path``, ``hparams`` (JSON), ``weights``,
        ``dtype``, ``global_step``, ``epoch``, ``images_seen`` (one process: batches x ``data.batch_size``),
        ``source`` (the checkpoint's file name), for a run started from ``--model.init_weights`` its file name
        (``fine_tuned_from``) and, when that file is still there, ``images_seen_total`` (its images, or its own
        total, plus this run's), and the extra metadata.

    Raises:
        WeightsFileError: one line: an unreadable checkpoint, one of another kind, no such weights, or an
            existing output file with other weights and no ``overwrite``.
    """
    where, out = _where(checkpoint_path, "--ckpt_path"), Path(output_path)
    if weights not in WEIGHTS_CHOICES:
        raise UsageError(f"--weights {weights}: expected one of {', '.join(WEIGHTS_CHOICES)}")
    if out.suffix != SUFFIX:
        raise UsageError(f"--output {out}: name the weights file NAME{SUFFIX}")
    if is_weights_file(checkpoint_path) and Path(checkpoint_path).is_file():
        raise WeightsFileError(f"{where} is a weights file already; export reads a Lightning checkpoint (.ckpt)")
    ckpt = _read_checkpoint(checkpoint_path, "--ckpt_path")
    class_path = _checkpoint_class_path(ckpt)
    if class_path not in _KINDS:
        raise WeightsFileError(f"{where} is {_kind(class_path)} checkpoint; celldiff export writes diffusion models and cell classifiers")
    state, which = _network_state(ckpt, class_path, weights, where)
    raw_hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    if not raw_hparams:
        raise WeightsFileError(f"{where}: holds no hyperparameters, so the file could not say which network it is")
    hparams = {k: v for k, v in raw_hparams.items() if k not in LOCAL_HPARAMS}
    meta = {FORMAT_KEY: FORMAT_TAG, "class_path": class_path, "hparams": json.dumps(hparams, sort_keys=True, default=str),
            "weights": which, "dtype": "float16", "global_step": str(ckpt.get("global_step", "")),
            "epoch": str(ckpt.get("epoch", "")), "source": Path(checkpoint_path).name}  # fmt: skip
    if _images_seen(ckpt) is not None:
        meta["images_seen"] = str(_images_seen(ckpt))
    masks = (ckpt.get("datamodule_hyper_parameters") or {}).get("masks")
    if masks:  # the training mask mixture: with the "full" family an inpainting model also generates
        meta["training_masks"] = json.dumps(spec_weights(masks), sort_keys=True)
    if raw_hparams.get("init_weights"):
        parent = Path(str(raw_hparams["init_weights"]))
        meta["fine_tuned_from"] = parent.name
        before = _parent_images_seen(parent)
        if before is not None and "images_seen" in meta:  # a run in legs on fresh machines: the lineage's total
            meta["images_seen_total"] = str(before + int(meta["images_seen"]))
    if ckpt.get("pytorch-lightning_version"):
        meta["lightning_version"] = str(ckpt["pytorch-lightning_version"])
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_METADATA:
            raise UsageError(f"--meta {key}: a reserved metadata key ({', '.join(RESERVED_METADATA)})")
        meta[str(key)] = str(value)
    tensors = {name: _half(name, tensor, where) for name, tensor in state.items()}
    if out.exists():
        if same_weights_file(out, tensors, meta):
            return meta
        if not overwrite:
            raise WeightsFileError(f"--output {out} exists and holds other weights; give --overwrite to replace it (nothing was written)")
    try:
        write_weights_file(out, tensors, meta)
    except OSError as err:
        raise UsageError(f"--output {out}: could not be written ({err.strerror or err}); any previous file is intact") from None
    return meta


def load_weights(path: str | Path, option: str = "") -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """A weights file's model: (its class path, its hyperparameters, its state dict in float32).

    Raises ``WeightsFileError`` (one line naming the file) for a file that is not safetensors, is
    truncated, is not a celldiff weights file, or holds a model celldiff does not know.
    """
    meta = read_weights_metadata(path, option)
    class_path = _ALIASES.get(meta["class_path"], meta["class_path"])
    if class_path not in _KINDS:
        raise WeightsFileError(f"{_where(path, option)}: holds {_kind(class_path)}, which celldiff cannot load")
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_tensors(path, option).items()}
    return class_path, meta["hparams"], state


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists alike


def check_fits(file_hparams: Mapping[str, Any], config_hparams: Mapping[str, Any], class_path: str = DIFFUSION_CLASS_PATH) -> list[str]:
    """The architecture keys (the model class's ``CHECKPOINT_ARCH_KEYS``) whose values differ between a file and a config.

    A key the config leaves out counts as the class's default; a key the file leaves out is not compared.
    """
    cls = _model_class(_ALIASES.get(class_path, class_path))
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    keys = getattr(cls, "CHECKPOINT_ARCH_KEYS", ())
    return [k for k in keys if k in file_hparams and _normal(file_hparams[k]) != _normal(config_hparams.get(k, defaults.get(k)))]


def mismatch_line(keys: list[str], file_hparams: Mapping[str, Any], config_hparams: Mapping[str, Any]) -> str:
    """``base_channels: config 64, file 32; ...`` for the keys of ``check_fits``."""
    return "; ".join(f"{k}: config {_normal(config_hparams.get(k))}, file {_normal(file_hparams.get(k))}" for k in keys)


def load_into_module(module: L.LightningModule, path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """Load a weights file (or a checkpoint) into a built model; a diffusion model's ``unet`` and ``ema_unet`` both.

    Args:
        module: A ``DiffusionModule`` or ``CellClassifier`` of the file's architecture.
        path: A weights file; a Lightning checkpoint is loaded whole (``weights_only``).
        option: The flag the file came with, named in errors.

    Returns:
        The file's (or checkpoint's) hyperparameters.

    Raises:
        WeightsFileError: one line: an unusable file, a file of another kind, or one whose architecture
            differs from the model's (naming each key, ``config X, file Y``).
    """
    where = _where(path, option)
    if not is_weights_file(path):
        ckpt = _read_checkpoint(path, option)
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise WeightsFileError(f"{where}: its weights do not fit the model ({str(err).strip().splitlines()[0]})") from None
        return dict(ckpt.get("hyper_parameters") or {})
    class_path, hparams, state = load_weights(path, option)
    if not isinstance(module, _model_class(class_path)):
        raise WeightsFileError(f"{where} holds {_kind(class_path)}, but the model is {type(module).__name__}")
    mismatch = check_fits(hparams, dict(module.hparams), class_path)
    if mismatch:
        raise WeightsFileError(f"{where} does not fit the config ({mismatch_line(mismatch, hparams, dict(module.hparams))})")
    _set_networks(module, class_path, state, where)
    return hparams


def _set_networks(module: L.LightningModule, class_path: str, state: Mapping[str, Tensor], where: str) -> None:
    """A file's network weights into the module's network: a diffusion model's ``unet`` and ``ema_unet`` alike."""
    nets = (module.unet, module.ema_unet) if class_path == DIFFUSION_CLASS_PATH else (module.net,)
    for net in nets:
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsFileError(f"{where}: its weights do not fit the model ({str(err).strip().splitlines()[0]})") from None


def read_init_weights_metadata(path: str | Path) -> dict[str, Any]:
    """``--model.init_weights``'s metadata (``read_weights_metadata``); a Lightning checkpoint is refused with a hint."""
    if Path(path).is_file() and not is_weights_file(path):
        raise WeightsFileError(
            f"--model.init_weights {path}: expected a weights file ({SUFFIX}); export the checkpoint first"
            f" (celldiff export --ckpt_path {path} --output NAME{SUFFIX}), or resume it with --ckpt_path"
        )
    return read_weights_metadata(path, "--model.init_weights")


def init_weights_for_fit(module: L.LightningModule, stage: str) -> None:
    """``--model.init_weights``: a fit starts from the file's weights (a resumed checkpoint then overrides them)."""
    path = module.hparams.get("init_weights")
    if stage != "fit" or not path:
        return
    read_init_weights_metadata(path)
    load_into_module(module, path, "--model.init_weights")


def _build(class_path: str, hparams: Mapping[str, Any], where: str) -> L.LightningModule:
    cls = _model_class(class_path)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted and k not in LOCAL_HPARAMS}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise WeightsFileError(f"{where}: its hyperparameters do not build {_kind(class_path)} ({err})") from None


def load_diffusion_module(path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """A ready ``DiffusionModule`` (eval mode) from a weights file or a Lightning checkpoint, nothing unpickled.

    From a weights file both the EMA U-Net and the raw U-Net hold the file's weights, so ``generate()``
    samples the same with ``use_ema`` either way; from a checkpoint both are the checkpoint's.
    Raises ``WeightsFileError`` (one line naming the file) for anything but a diffusion model.
    """
    if is_weights_file(path):
        class_path, hparams, state = load_weights(path)
    else:
        ckpt = _read_checkpoint(path, "")
        class_path = _checkpoint_class_path(ckpt)
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    if class_path != DIFFUSION_CLASS_PATH:
        raise WeightsFileError(f"{path} holds {_kind(class_path)}; expected a diffusion model")
    module = _build(class_path, hparams, str(path))
    if is_weights_file(path):
        _set_networks(module, class_path, state, str(path))
    else:
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise WeightsFileError(f"{path}: its weights do not fit its hyperparameters ({str(err).strip().splitlines()[0]})") from None
    return module.to(map_location).eval()
