"""The judge of generated cells: the trained cell classifier, loaded as a network, and how it sees cells.

A classifier checkpoint (trained by ``celldiff.training.classifier.CellClassifier``) is read with
``torch.load(weights_only=True)``, or its weights file (``celldiff export``) with safetensors, and its
weights go into a ``celldiff.nets.classifier.CellResNet``: no Lightning module is built and no code is
unpickled. The judge then gives features (N, D) for the distances of ``celldiff.evaluation.distances``
and class probabilities for ``classifier_report``.

Checkpoint kinds live here too (``read_checkpoint``, ``checkpoint_class_path``): the CLI refuses a
checkpoint of the wrong kind with one line before building anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

from celldiff.errors import file_problem
from celldiff.images import to_model_range
from celldiff.nets.classifier import CellResNet, nest_flat_keys
from celldiff.nets.weightsfile import WeightsFileError, is_weights_file, read_tensors, read_weights_metadata

# The class path each kind is reported and compared under, and the older names of the same class: configs
# and checkpoints written before the redesign name the deprecated shims (celldiff.module, celldiff.classifier).
DIFFUSION_CLASS_PATH = "celldiff.training.module.DiffusionModule"
CLASSIFIER_CLASS_PATH = "celldiff.training.classifier.CellClassifier"
CLASS_PATH_ALIASES = {
    "celldiff.module.DiffusionModule": DIFFUSION_CLASS_PATH,
    "celldiff.classifier.CellClassifier": CLASSIFIER_CLASS_PATH,
}
_KIND_WORDS = {DIFFUSION_CLASS_PATH: "a diffusion model", CLASSIFIER_CLASS_PATH: "a cell classifier"}
DEFAULT_JUDGE_SIZE = 64  # CellClassifier's default image_size, for a checkpoint that does not name its own


class CheckpointKindError(ValueError):
    """A checkpoint that cannot be read, or of another kind than where it was given (one line from the CLI)."""


# ----------------------------------------------------------------------------------- checkpoints


def canonical_class_path(class_path: str | None) -> str | None:
    """One class path per kind: ``CLASSIFIER_CLASS_PATH`` for any name of the classifier (old or new), and so on.

    Compare a checkpoint's class (``checkpoint_class_path``) with a config's through this; other
    class paths come back unchanged.
    """
    return CLASS_PATH_ALIASES.get(class_path, class_path) if class_path else class_path


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True``: tensors and plain containers, never code.

    Raises ``CheckpointKindError`` naming ``option`` and the file when it is missing, a directory,
    unreadable, truncated or corrupt, or not a Lightning checkpoint.
    """
    file = Path(path)
    problem = file_problem(file, f"{option} {path}", "checkpoint", "a checkpoint file (.ckpt)")
    if problem:
        raise CheckpointKindError(problem)
    try:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # an old (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointKindError(f"{option} {path}: no permission to read it") from None
    except Exception as err:
        raise CheckpointKindError(
            f"{option} {path}: not a readable checkpoint ({err.__class__.__name__}: truncated, corrupt, or not saved by "
            "celldiff / Lightning)"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointKindError(f"{option} {path}: not a Lightning checkpoint (it holds no state_dict)")
    return ckpt


def checkpoint_class_path(ckpt: dict[str, Any]) -> str | None:
    """The LightningModule class a checkpoint was saved from, as ``canonical_class_path`` names it.

    Its ``_class_path`` hyperparameter, else recognised by its parameter names: ``unet.`` for a
    diffusion model, ``stem.`` and ``head.`` (before the redesign) or ``net.stem.`` and ``net.head.``
    for a classifier.
    """
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if class_path:
        return canonical_class_path(str(class_path))
    keys = ckpt.get("state_dict", {}).keys()
    if any(k.startswith("unet.") for k in keys):
        return DIFFUSION_CLASS_PATH
    for prefix in ("", "net."):
        if any(k.startswith(f"{prefix}head.") for k in keys) and any(k.startswith(f"{prefix}stem.") for k in keys):
            return CLASSIFIER_CLASS_PATH
    return None


def describe_kind(class_path: str | None) -> str:
    """'a diffusion model', 'a cell classifier', or the class path of anything else."""
    if class_path is None:
        return "an unrecognised"
    class_path = canonical_class_path(class_path)
    return _KIND_WORDS.get(class_path, f"a {class_path}")


# ----------------------------------------------------------------------------------- the judge


class Judge(nn.Module):
    """A trained, frozen cell classifier: the ``CellResNet`` and the checkpoint's hyperparameters.

    ``hparams`` (attribute and key access) holds at least ``image_size`` (the side it was trained
    at), ``num_classes`` and ``class_names`` (None when the checkpoint names none), as the training
    module's did.
    """

    def __init__(self, net: CellResNet, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.hparams = AttributeDict(hparams)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, S, S) in [-1, 1]."""
        return self.net.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, 3, S, S) in [-1, 1]."""
        return self.net(x)


def load_judge(path: str | Path, map_location: str | torch.device = "cpu", option: str = "--classifier_ckpt") -> Judge:
    """Load a trained cell classifier as a frozen ``Judge``: eval mode, ``requires_grad`` False.

    ``path`` is a checkpoint, read with ``weights_only=True`` (checkpoints from before the redesign, with
    the network keys at the top level, load too), or a weights file (``celldiff export``, safetensors):
    no code is unpickled. A file that is not a cell classifier's (e.g. a diffusion model's), is not
    readable, or whose weights do not fit its hyperparameters raises ``CheckpointKindError`` with one
    line naming it.
    """
    hparams, state = _weights_file_parts(path, option) if is_weights_file(path) else _checkpoint_parts(path, option)
    try:
        net = CellResNet(**{k: hparams[k] for k in ("num_classes", "width", "feature_dim", "dropout") if k in hparams})
        net.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointKindError(f"{option} {path}: its weights do not fit a cell classifier ({first})") from None
    hparams = {"image_size": DEFAULT_JUDGE_SIZE, "class_names": None, **hparams, "num_classes": net.head.out_features}
    judge = Judge(net, hparams).to(map_location)
    return judge.eval().requires_grad_(False)


def _not_a_classifier(path: str | Path, option: str, class_path: str | None, noun: str) -> CheckpointKindError:
    hint = " (--ckpt_path and --classifier_ckpt swapped?)" if class_path == DIFFUSION_CLASS_PATH else ""
    return CheckpointKindError(
        f"{option} {path} is {describe_kind(class_path)} {noun}; expected a cell classifier "
        f"({CLASSIFIER_CLASS_PATH}, trained with celldiff fit --config configs/classifier.yaml){hint}"
    )


def _checkpoint_parts(path: str | Path, option: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A classifier checkpoint's hyperparameters and its network's state dict (keys without ``net.``)."""
    ckpt = read_checkpoint(path, option)
    class_path = checkpoint_class_path(ckpt)
    if class_path != CLASSIFIER_CLASS_PATH:
        raise _not_a_classifier(path, option, class_path, "checkpoint")
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    state = dict(ckpt["state_dict"])
    nest_flat_keys(state)
    return hparams, {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def _weights_file_parts(path: str | Path, option: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A classifier weights file's hyperparameters and its network's state dict in float32 (safetensors only)."""
    try:
        meta = read_weights_metadata(path, option)
        class_path = canonical_class_path(meta["class_path"])
        if class_path != CLASSIFIER_CLASS_PATH:
            raise _not_a_classifier(path, option, class_path, "weights file")
        tensors = read_tensors(path, option)
    except WeightsFileError as err:
        raise CheckpointKindError(str(err)) from None
    return meta["hparams"], {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


# ----------------------------------------------------------------------------------- how it sees cells


def judge_size_problem(classifier_size: int, model_size: int) -> str | None:
    """Why a classifier at ``classifier_size`` px cannot judge a model at ``model_size`` px, or None."""
    if classifier_size <= model_size:
        return None
    return (
        f"the classifier works at {classifier_size} px, the diffusion model at {model_size} px; expected a "
        f"classifier trained at {model_size} px or less (a smaller one judges the cells downsampled)"
    )


def judge_view(images_uint8: Tensor, size: int) -> Tensor:
    """Images (N, 3, S, S) uint8 as the classifier sees them: (N, 3, size, size) in [-1, 1].

    A classifier trained at a lower resolution than the diffusion model judges the generated and the
    real cells alike downsampled (antialiased bicubic, torch's match of PIL's filter, which made the
    classifier's own training images), so both sides of every comparison pass the same filter.
    """
    x = to_model_range(images_uint8)
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


@torch.no_grad()
def _batched(
    classifier: nn.Module, images: Tensor | np.ndarray, batch_size: int, fn: Callable[[nn.Module, Tensor], Tensor]
) -> Tensor:
    """``fn(classifier, batch)`` over images (N, 3, S, S) in batches, on the classifier's device, in eval mode.

    uint8 images are scaled to [-1, 1] first; the outputs (N, ...) come back float32 on the CPU and
    the classifier's mode is restored afterwards.
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        images = torch.as_tensor(images)
        outputs = [
            fn(classifier, to_model_range(images[i : i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        classifier.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


def extract_features(classifier: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> Tensor:
    """Classifier features (N, feature_dim) of images (N, 3, S, S) in [-1, 1] (or uint8), on the CPU.

    Runs in eval mode without gradients on the classifier's device; the mode is restored afterwards.
    """
    return _batched(classifier, images, batch_size, lambda model, x: model.features(x))


def predicted_classes(classifier: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> Tensor:
    """The class (N,) int64 the classifier gives each image (N, 3, S, S) in [-1, 1] (or uint8)."""
    return _batched(classifier, images, batch_size, lambda model, x: model(x).argmax(1)).long()


def classifier_report(
    classifier: nn.Module,
    images: Tensor | np.ndarray,
    requested_labels: Tensor | np.ndarray | Sequence[int],
    class_names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, Any]:
    """Does each generated cell (N, 3, S, S) look like the class (N,) it was generated as?

    Returns:
        ``accuracy`` (fraction classified as requested), ``per_class_accuracy`` {name: acc} for the
        requested classes present, ``per_class_count``, ``mean_confidence`` (mean probability of
        the requested class) and ``confusion_matrix`` (rows = requested, cols = predicted, counts)
        with ``class_names``.
    """
    requested = torch.as_tensor(np.asarray(requested_labels), dtype=torch.int64).flatten()
    if len(requested) != len(images):
        raise ValueError(f"{len(images)} images but {len(requested)} requested labels")
    probs = _batched(classifier, images, batch_size, lambda model, x: model(x).float().softmax(-1))
    num_classes = len(class_names)
    if probs.shape[1] != num_classes:
        raise ValueError(f"classifier has {probs.shape[1]} classes, class_names has {num_classes}")
    predicted = probs.argmax(1)
    confusion = torch.bincount(requested * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    correct = predicted == requested
    per_class, counts = {}, {}
    for c, name in enumerate(class_names):
        selected = requested == c
        if selected.any():
            per_class[name] = float(correct[selected].double().mean())
            counts[name] = int(selected.sum())
    return {
        "accuracy": float(correct.double().mean()) if len(correct) else math.nan,
        "per_class_accuracy": per_class,
        "per_class_count": counts,
        "mean_confidence": float(probs.gather(1, requested[:, None]).double().mean()) if len(correct) else math.nan,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "num_samples": len(requested),
    }
