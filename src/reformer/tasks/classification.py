"""What the sequence-classification tasks (``classify``, ``listops``) share: the head and its pooling,
the objective, accuracy and macro-F1, and the class probabilities of ``reformer predict``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import ReformerForSequenceClassification
from ..models.heads import POOLINGS
from .base import Batch, Task
from .encoder import EncoderObjective, pad_rows, split_padding
from .settings import setting


@dataclass
class ClassifierSettings:
    pooling: str = setting(
        "first", "what the head reads: the first token (HF's head) or the mean over the tokens",
        choices=POOLINGS,
    )  # fmt: skip


class ClassificationTask(Task):
    """A sequence classifier: batches ``(inputs, labels)``, inputs ``(batch, length)`` with ``PAD``,
    labels ``(batch,)`` class ids; ``n_labels()`` classes."""

    Settings = ClassifierSettings
    model_class = ReformerForSequenceClassification
    causal = False

    def n_labels(self) -> int:
        raise NotImplementedError

    def validate(self) -> None:
        if self.settings.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.settings.pooling!r} is unknown; use one of {POOLINGS}")

    def build_model(self) -> nn.Module:
        return self.model_class(self.model_config(), n_labels=self.n_labels(), pooling=self.settings.pooling)

    def load_model(self, folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return self.model_class.from_pretrained(folder, map_location=device)

    def objective(self, model: nn.Module) -> nn.Module:
        return EncoderObjective(model)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Mean loss, ``accuracy`` and ``macro_f1`` (the mean F1 over the classes that occur as label or
        prediction)."""
        was_training = model.training
        model.eval()
        total_loss, true, pred = 0.0, [], []
        for inputs, targets in batches:
            ids, mask = split_padding(inputs.to(device))
            targets = targets.to(device)
            logits = model(ids, attention_mask=mask, n_hashes=n_hashes).float()
            total_loss += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            true += targets.tolist()
            pred += logits.argmax(-1).tolist()
        model.train(was_training)
        accuracy = sum(t == p for t, p in zip(true, pred, strict=True)) / max(len(true), 1)
        return {
            "loss": total_loss / max(len(true), 1),
            "accuracy": accuracy,
            "macro_f1": macro_f1(true, pred),
        }

    def class_names(self) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def probabilities(
        self, model: nn.Module, rows: list[list[int]], n_hashes: int | None = None
    ) -> torch.Tensor:
        """Class probabilities ``(len(rows), n_labels)`` float32 of token-id rows (of any lengths)."""
        model.eval()
        device = next(model.parameters()).device
        ids, mask = split_padding(pad_rows(rows).to(device))
        return model(ids, attention_mask=mask, n_hashes=n_hashes).float().softmax(-1).cpu()


def macro_f1(true: list[int], pred: list[int]) -> float:
    """Mean over the classes present in ``true`` or ``pred`` of 2 TP / (2 TP + FP + FN)."""
    scores = []
    for c in sorted(set(true) | set(pred)):
        tp = sum(t == c and p == c for t, p in zip(true, pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(true, pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(true, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)
