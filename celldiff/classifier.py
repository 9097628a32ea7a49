"""The cell-type classifier that judges generated cells.

A small ResNet (He et al. 2016, "Deep Residual Learning"; BasicBlocks as in ResNet-18) for 32-64 px
RGB cells in [-1, 1]. It serves two purposes in evaluation (``celldiff.evaluation``):

- ``forward`` / ``predict_proba``: does a cell generated as "eosinophil" look like one?
- ``features``: the penultimate ``feature_dim`` activations, a feature space that knows what a blood
  cell is and needs no download, for a Fréchet distance and precision/recall.

Train it like any other celldiff model: ``celldiff fit --config configs/classifier.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from celldiff.module import lr_factor


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity: stable early training
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class CellClassifier(L.LightningModule):
    """ResNet-style cell-type classifier with a feature space for Fréchet distances.

    Stem 3×3 conv (``width``) → 4 stages of 2 BasicBlocks with widths ``width × (1, 2, 4, 8)``, the
    last three halving the resolution (64 → 8 px, 32 → 4 px) → global average pool → linear + ReLU
    to ``feature_dim`` (the features) → dropout → linear head.

    Args:
        image_size: Side of the square input images (linked from ``data.image_size``).
        num_classes: Number of cell classes (linked from the data module).
        class_names: Names of the classes (linked from the data module); name the per-class metrics.
        width: Channels of the first stage; the stages have 1, 2, 4, 8 × width.
        feature_dim: Size of the penultimate feature vector (``features``).
        dropout: Dropout before the linear head.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up steps, then cosine decay to 0.
        label_smoothing: Label smoothing of the cross-entropy.
    """

    # Hyperparameters that fix the parameter shapes: the CLI takes them from a checkpoint.
    CHECKPOINT_ARCH_KEYS = ("width", "feature_dim")

    def __init__(
        self,
        image_size: int = 64,
        num_classes: int = 8,
        class_names: list[str] | None = None,
        width: int = 32,
        feature_dim: int = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        warmup_steps: int = 100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2 for a classifier, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        if width < 1 or feature_dim < 1:
            raise ValueError(f"model.width and model.feature_dim must be >= 1, got {width}, {feature_dim}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("model.dropout and model.label_smoothing must be in [0, 1)")
        self.save_hyperparameters()
        self.class_names = list(class_names) if class_names is not None else [f"class{i}" for i in range(num_classes)]

        widths = [width * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for i, out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out)))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.project = nn.Linear(channels, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_class_acc = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    # ------------------------------------------------------------------ network
    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, S, S) in [-1, 1]."""
        h = self.stages(self.stem(x))
        return F.relu(self.project(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, 3, S, S) in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (B, num_classes); call in eval mode for deterministic output."""
        return self(x).softmax(dim=-1)

    # ------------------------------------------------------------------ steps
    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_acc(logits, batch["label"])
        self.log("val/loss", self._loss(logits, batch["label"]), sync_dist=True, batch_size=len(logits))
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(logits))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        labels = batch["label"]
        self.test_acc(logits, labels)
        self.test_class_acc.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log("test/loss", self._loss(logits, labels), sync_dist=True, batch_size=len(logits))
        self.log("test/acc", self.test_acc, batch_size=len(logits))

    def on_test_epoch_end(self) -> None:
        # compute() syncs across ranks (a collective): every rank runs it, only rank 0 writes.
        per_class = self.test_class_acc.compute()
        confusion = self.test_confusion.compute()
        for name, acc in zip(self.class_names, per_class, strict=True):
            self.log(f"test/acc_{name}", acc)
        self.test_class_acc.reset()
        self.test_confusion.reset()
        if self._trainer is not None and self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "confusion_matrix.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "class_names": self.class_names,
                "rows": "true class",
                "cols": "predicted class",
                "matrix": confusion.long().tolist(),
                "per_class_accuracy": dict(zip(self.class_names, per_class.tolist(), strict=True)),
            }
            out.write_text(json.dumps(payload, indent=2) + "\n")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.parameters():
            # No weight decay on norms and biases (standard for ResNets).
            (no_decay if param.ndim <= 1 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, "cosine", 0.0)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


DIFFUSION_CLASS_PATH = "celldiff.module.DiffusionModule"
CLASSIFIER_CLASS_PATH = "celldiff.classifier.CellClassifier"
_KIND_WORDS = {DIFFUSION_CLASS_PATH: "a diffusion model", CLASSIFIER_CLASS_PATH: "a cell classifier"}


class CheckpointKindError(ValueError):
    """A checkpoint that cannot be read, or of another kind than where it was given (one line from the CLI)."""


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True``: tensors and plain containers, never code.

    Raises ``CheckpointKindError`` naming ``option`` and the file when it is missing, a directory,
    unreadable, truncated or corrupt, or not a Lightning checkpoint.
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointKindError(f"{option} {path}: no such checkpoint file")
    if not file.is_file():
        raise CheckpointKindError(f"{option} {path} is a directory; expected a checkpoint file (.ckpt)")
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
    """The LightningModule class a checkpoint was saved from: its ``_class_path`` hyperparameter, else
    recognised by its parameter names (``unet.`` for a diffusion model, ``head.`` for a classifier)."""
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if class_path:
        return str(class_path)
    keys = ckpt.get("state_dict", {}).keys()
    if any(k.startswith("unet.") for k in keys):
        return DIFFUSION_CLASS_PATH
    if any(k.startswith("head.") for k in keys) and any(k.startswith("stem.") for k in keys):
        return CLASSIFIER_CLASS_PATH
    return None


def describe_kind(class_path: str | None) -> str:
    """'a diffusion model', 'a cell classifier', or the class path of anything else."""
    if class_path is None:
        return "an unrecognised"
    return _KIND_WORDS.get(class_path, f"a {class_path}")


def load_classifier(
    path: str | Path, map_location: str | torch.device = "cpu", option: str = "--classifier_ckpt"
) -> CellClassifier:
    """Load a trained ``CellClassifier`` checkpoint, frozen: eval mode, ``requires_grad`` False.

    Read with ``weights_only=True`` (no code is unpickled); a file that is not a cell classifier
    checkpoint (e.g. a diffusion model's) raises ``CheckpointKindError`` with one line naming it.
    """
    ckpt = read_checkpoint(path, option)
    class_path = checkpoint_class_path(ckpt)
    if class_path != CLASSIFIER_CLASS_PATH:
        hint = " (--ckpt_path and --classifier_ckpt swapped?)" if class_path == DIFFUSION_CLASS_PATH else ""
        raise CheckpointKindError(
            f"{option} {path} is {describe_kind(class_path)} checkpoint; expected a cell classifier "
            f"({CLASSIFIER_CLASS_PATH}, trained with celldiff fit --config configs/classifier.yaml){hint}"
        )
    import inspect

    accepted = set(inspect.signature(CellClassifier.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in accepted}
    try:
        model = CellClassifier(**hparams)
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise CheckpointKindError(f"{option} {path}: its weights do not fit a cell classifier ({first})") from None
    model.to(map_location)
    model.eval()
    model.requires_grad_(False)
    return model
