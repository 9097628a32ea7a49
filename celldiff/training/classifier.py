"""``CellClassifier``: the LightningModule that trains the cell-type classifier (``celldiff.nets.classifier``).

Train it like any other celldiff model: ``celldiff fit --config configs/classifier.yaml``. Evaluation
loads the trained network from the checkpoint without this module (``celldiff.evaluation.judge``).
Checkpoints from before the redesign (network keys at the top level) still load: their keys move
under ``net.`` as they are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from celldiff.nets.classifier import CellResNet, nest_flat_keys
from celldiff.training.optim import adamw_with_warmup
from celldiff.training.weights import init_weights_for_fit


class CellClassifier(L.LightningModule):
    """The ``CellResNet`` (as ``net``) with its cross-entropy training, accuracy and confusion matrix.

    Args:
        image_size: Side of the square input images (linked from ``data.image_size``).
        num_classes: Number of cell classes (linked from the data module).
        class_names: Names of the classes (linked from the data module); name the per-class metrics.
        width: Channels of the first stage; the stages have 1, 2, 4, 8 × width.
        feature_dim: Size of the penultimate feature vector (``features``).
        dropout: Dropout before the linear head.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on norms and biases).
        warmup_steps: Linear learning-rate warm-up steps, then cosine decay to 0.
        label_smoothing: Label smoothing of the cross-entropy.
        init_weights: fit: start from a classifier's weights file (``celldiff export``).
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
        init_weights: str | None = None,
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
        self.net = CellResNet(num_classes, width, feature_dim, dropout)
        # A checkpoint from before the redesign holds the network's keys at the top level.
        self._register_load_state_dict_pre_hook(lambda state_dict, prefix, *_: nest_flat_keys(state_dict, prefix))

        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_class_acc = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def setup(self, stage: str) -> None:
        init_weights_for_fit(self, stage)  # --model.init_weights (fit only; a resumed checkpoint overrides it)

    # ------------------------------------------------------------------ network
    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, S, S) in [-1, 1]."""
        return self.net.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, 3, S, S) in [-1, 1]."""
        return self.net(x)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (B, num_classes); call in eval mode for deterministic output."""
        return self.net.predict_proba(x)

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
        """AdamW without weight decay on norms and biases (standard for ResNets), warm-up then cosine to 0."""
        hp = self.hparams
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        return adamw_with_warmup(groups, lr=hp.lr, total_steps=total, warmup_steps=hp.warmup_steps)
