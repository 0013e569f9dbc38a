"""The bidirectional encoder family: :class:`ReformerEncoder` (hidden states) and its heads for masked
LM, sequence classification / regression, token classification and extractive question answering.

Every model here is the shared trunk of :class:`~reformer.models.base.ReformerTrunk` with
``causal=False`` plus a head whose math (and parameter names) follows HF transformers' Reformer heads,
so ``from_hf`` / ``to_hf`` are exact. Padding (``attention_mask``) never changes a real token's outputs:
sequence classification reads each row's first *real* token, QA gives padding positions the lowest
logit, and labels at padding positions are ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ReformerConfig
from .base import ReformerTrunk
from .loss import chunked_cross_entropy, loss_dtype

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
POOLINGS = ("first", "mean")  # what sequence classification reads: HF's first token, or the mean
IGNORE_INDEX = -100


def _check_class_labels(labels: torch.Tensor, shape: tuple[int, ...], n_classes: int, what: str) -> None:
    """``labels`` must have ``shape``, integer dtype, and values in ``[0, n_classes)`` or -100."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer class ids, got dtype {labels.dtype}")
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_classes))
    if bad.any():
        found = labels[bad][0].item()
        raise ValueError(f"{what} must lie in [0, {n_classes}) or be {IGNORE_INDEX} (ignored); found {found}")


def _check_classifier_dropout(p: float | None) -> None:
    if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0):
        raise ValueError(f"classifier_dropout={p!r} must be None (the config's dropout) or in [0, 1)")


def _check_n_labels(n_labels: Any) -> None:
    if not isinstance(n_labels, int) or isinstance(n_labels, bool) or n_labels < 1:
        raise ValueError(f"n_labels={n_labels!r} must be a positive integer")


class ReformerEncoder(ReformerTrunk):
    """The bidirectional trunk alone: ``input_ids`` ``(batch, length)`` -> hidden states
    ``(batch, length, 2 * d_model)`` (outputs at padding positions unspecified)."""

    head_kind = "encoder"
    bidirectional = True

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask, n_hashes, position_offset)


class ReformerForMaskedLM(ReformerTrunk):
    """Masked language model: logits ``(batch, length, vocab_size)`` for every position; with ``labels``
    ``(batch, length)`` (-100 = not masked, ignored) :meth:`forward` returns the mean cross-entropy over
    the labelled positions, as HF's ``ReformerForMaskedLM``."""

    head_kind = "masked_lm"
    bidirectional = True

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_hashes: int | None = None,
    ) -> torch.Tensor:
        if labels is not None:
            return self.loss(input_ids, labels, attention_mask, n_hashes)
        return self.lm_head(self.hidden_states(input_ids, attention_mask, n_hashes))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        chunk_size: int = 4096,
    ) -> torch.Tensor:
        """Mean cross-entropy in nats over positions whose label is not -100 (float32 scalar); the
        logits are made ``chunk_size`` positions at a time and recomputed in the backward pass."""
        _check_class_labels(labels, input_ids.shape, self.config.vocab_size, "labels")
        hidden = self.hidden_states(input_ids, attention_mask, n_hashes)
        labels = _ignore_padding(labels.to(hidden.device).long(), attention_mask)
        total = chunked_cross_entropy(self.lm_head, hidden, labels, IGNORE_INDEX, chunk_size)
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class ReformerClassificationHead(nn.Module):
    """HF's head: the pooled ``(batch, 2 * d_model)`` -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, d_model: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(2 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, n_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class ReformerForSequenceClassification(ReformerTrunk):
    """Sequence classification or regression from each row's first real token: logits
    ``(batch, n_labels)``.

    ``pooling="mean"`` reads the mean of the final states over each row's real tokens instead (not in HF
    transformers: ``to_hf`` refuses it; the default ``"first"`` is HF's head).

    ``problem_type`` (default: ``"regression"`` for ``n_labels=1``, else ``"single_label_classification"``)
    picks the loss of :meth:`forward` with ``labels``: cross-entropy of int64 labels ``(batch,)``, mean
    squared error of float labels ``(batch,)`` / ``(batch, n_labels)``, or binary cross-entropy of
    float 0/1 labels ``(batch, n_labels)`` (``"multi_label_classification"``). ``classifier_dropout``
    defaults to the config's ``dropout``.
    """

    head_kind = "sequence_classification"
    bidirectional = True

    def __init__(
        self,
        config: ReformerConfig,
        n_labels: int = 2,
        problem_type: str | None = None,
        classifier_dropout: float | None = None,
        pooling: str = "first",
    ) -> None:
        super().__init__(config)
        _check_n_labels(n_labels)
        _check_classifier_dropout(classifier_dropout)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is unknown; use one of {POOLINGS}")
        if problem_type is None:
            problem_type = "regression" if n_labels == 1 else "single_label_classification"
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r} is unknown; use one of {PROBLEM_TYPES}")
        if problem_type != "regression" and n_labels < 2:
            raise ValueError(f"{problem_type} needs n_labels >= 2; n_labels=1 is regression")
        self.n_labels, self.problem_type, self.classifier_dropout = n_labels, problem_type, classifier_dropout
        self.pooling = pooling
        dropout = config.dropout if classifier_dropout is None else classifier_dropout
        self.classifier = ReformerClassificationHead(config.d_model, n_labels, dropout)
        self.apply(self._init_weights)

    def head_settings(self) -> dict[str, Any]:
        settings = {
            "n_labels": self.n_labels,
            "problem_type": self.problem_type,
            "classifier_dropout": self.classifier_dropout,
        }
        # Only a non-default pooling is recorded, so heads saved before the option (and HF's) load whole.
        return settings if self.pooling == "first" else {**settings, "pooling": self.pooling}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_hashes: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, n_labels)``, or with ``labels`` the loss (float32 scalar)."""
        hidden = self.hidden_states(input_ids, attention_mask, n_hashes)
        real = None
        if attention_mask is not None:
            real = attention_mask.to(hidden.device) != 0
            if real.device.type == "cpu" and not torch.compiler.is_compiling() and not real.any(1).all():
                empty = (~real.any(1)).nonzero()[0].item()
                raise ValueError(f"row {empty} of attention_mask has no real token; a row needs at least one")
        pooled = _pool(hidden, real, self.pooling)
        logits = self.classifier(pooled)
        return logits if labels is None else self._loss(logits, labels.to(logits.device))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = logits.shape[0]
        if self.problem_type == "single_label_classification":
            _check_class_labels(labels, (batch,), self.n_labels, "labels")
            return F.cross_entropy(logits.to(loss_dtype(logits.dtype)), labels.long())
        if not labels.is_floating_point():
            raise TypeError(f"{self.problem_type} needs float labels, got dtype {labels.dtype}")
        if self.problem_type == "regression":
            if self.n_labels == 1 and labels.shape == (batch,):
                labels = labels[:, None]
            if labels.shape != logits.shape:
                raise ValueError(
                    f"regression labels must have shape {tuple(logits.shape)}"
                    f"{' or (batch,)' if self.n_labels == 1 else ''}, got {tuple(labels.shape)}"
                )
            return F.mse_loss(logits.to(loss_dtype(logits.dtype)), labels.to(loss_dtype(logits.dtype)))
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        return F.binary_cross_entropy_with_logits(
            logits.to(loss_dtype(logits.dtype)), labels.to(loss_dtype(logits.dtype))
        )


def _pool(hidden: torch.Tensor, real: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """``(batch, 2 * d_model)`` from the final states ``hidden`` ``(batch, length, 2 * d_model)`` and the
    real-token mask ``real`` ``(batch, length)`` bool (None: no padding): each row's first real state, or
    the mean of its real states."""
    if pooling == "mean":
        if real is None:
            return hidden.mean(1)
        weights = real.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1)
    first = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    if real is not None:
        first = real.to(torch.uint8).argmax(1)  # the first real position of each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


class ReformerForTokenClassification(ReformerTrunk):
    """Per-token classification: dropout -> ``Linear(2 * d_model, n_labels)`` on every position, logits
    ``(batch, length, n_labels)``; with int64 ``labels`` ``(batch, length)`` (-100 and padding ignored)
    :meth:`forward` returns the mean cross-entropy."""

    head_kind = "token_classification"
    bidirectional = True

    def __init__(self, config: ReformerConfig, n_labels: int = 2, classifier_dropout: float | None = None):
        super().__init__(config)
        _check_n_labels(n_labels)
        _check_classifier_dropout(classifier_dropout)
        self.n_labels, self.classifier_dropout = n_labels, classifier_dropout
        self.dropout = nn.Dropout(config.dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(2 * config.d_model, n_labels)
        self.apply(self._init_weights)

    def head_settings(self) -> dict[str, Any]:
        return {"n_labels": self.n_labels, "classifier_dropout": self.classifier_dropout}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        n_hashes: int | None = None,
    ) -> torch.Tensor:
        hidden = self.dropout(self.hidden_states(input_ids, attention_mask, n_hashes))
        if labels is None:
            return self.classifier(hidden)
        _check_class_labels(labels, input_ids.shape, self.n_labels, "labels")
        labels = _ignore_padding(labels.to(hidden.device).long(), attention_mask)
        total = chunked_cross_entropy(self.classifier, hidden, labels, IGNORE_INDEX, 4096)
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class ReformerForQuestionAnswering(ReformerTrunk):
    """Extractive QA: ``Linear(2 * d_model, 2)`` per position -> ``(start_logits, end_logits)``, each
    ``(batch, length)``; padding positions get the dtype's lowest value. With ``start_positions`` and
    ``end_positions`` (int64 ``(batch,)``, each a real position or -100 = no answer, ignored)
    :meth:`forward` returns the mean of the start and end cross-entropies, as HF's
    ``ReformerForQuestionAnswering``."""

    head_kind = "question_answering"
    bidirectional = True

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(2 * config.d_model, 2)
        self.apply(self._init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        n_hashes: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        logits = self.qa_outputs(self.hidden_states(input_ids, attention_mask, n_hashes))
        if attention_mask is not None:
            padding = attention_mask.to(logits.device)[..., None] == 0
            logits = logits.masked_fill(padding, torch.finfo(logits.dtype).min)
        start_logits, end_logits = logits.unbind(-1)
        if start_positions is None and end_positions is None:
            return start_logits, end_logits
        if start_positions is None or end_positions is None:
            raise ValueError("give both start_positions and end_positions for the loss, or neither")
        length = input_ids.shape[1]
        losses = []
        for what, positions, scores in (
            ("start", start_positions, start_logits),
            ("end", end_positions, end_logits),
        ):
            _check_class_labels(positions, (input_ids.shape[0],), length, f"{what}_positions")
            positions = positions.to(scores.device).long()
            if attention_mask is not None and positions.device.type == "cpu":
                answered = positions != IGNORE_INDEX
                rows = answered.nonzero()[:, 0]
                if (attention_mask[rows, positions[rows]] == 0).any():
                    raise ValueError(f"{what}_positions point at padding; an answer must lie on real tokens")
            total = F.cross_entropy(
                scores.to(loss_dtype(scores.dtype)), positions, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            losses.append(total / (positions != IGNORE_INDEX).sum().clamp(min=1))
        return (losses[0] + losses[1]) / 2


def _ignore_padding(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return labels
    return labels.masked_fill(attention_mask.to(labels.device) == 0, IGNORE_INDEX)
