"""ReformerLM: the shared trunk (embeddings -> reversible stack -> final norm) -> LM head."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import ReformerConfig
from ..generation.mixin import GenerationMixin
from .base import ReformerTrunk
from .loss import chunked_cross_entropy


class CausalLMOutput:
    """What ``ReformerLM(input_ids, labels=labels)`` returns, as HF's causal LMs do: ``loss`` (a float32
    scalar, the mean next-token cross-entropy in nats) and ``logits`` ``(batch, length, vocab_size)``.

    The loss is computed in chunks without holding every logit; ``logits`` are made from the final
    states only when first read, so a training step that reads only ``loss`` never holds them."""

    def __init__(self, loss: torch.Tensor, hidden: torch.Tensor, head: nn.Module) -> None:
        self.loss, self._hidden, self._head, self._logits = loss, hidden, head, None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._head(self._hidden)
        return self._logits


def check_shifted_targets(input_ids: torch.Tensor, targets: torch.Tensor) -> None:
    """``targets`` must be the next tokens of ``input_ids`` (already shifted); the inputs themselves
    would train the identity. The same tensor is an error; equal values a warning (a run of one repeated
    token can be legitimate)."""
    fix = "pass labels=input_ids (shifted inside, as HF does), or loss(input_ids[:, :-1], input_ids[:, 1:])"
    if targets is input_ids:
        raise ValueError(f"targets is input_ids: the model would learn to copy its input; {fix}")
    if (
        not torch.compiler.is_compiling()
        and targets.shape == input_ids.shape
        and targets.numel() > 1
        and torch.equal(targets.to(input_ids.device), input_ids)
    ):
        warnings.warn(f"targets equal input_ids (not shifted): {fix}", stacklevel=3)


class ReformerLM(GenerationMixin, ReformerTrunk):
    """A Reformer language model.

    ``input_ids`` ``(batch, length)`` int64 in ``[0, vocab_size)`` -> logits
    ``(batch, length, vocab_size)``. Any length up to ``max_seq_len`` works: attention pads to its chunk
    multiples internally and masks the padding.
    """

    head_kind = "lm"

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | CausalLMOutput:
        """Logits ``(batch, length, vocab_size)``. ``attention_mask``: ``(batch, length)``, 1 = real token;
        ``n_hashes`` overrides the LSH rounds for this call.

        ``labels`` ``(batch, length)`` int64, HF's meaning: the tokens themselves (usually
        ``input_ids``), shifted inside, so position ``i`` predicts ``labels[:, i + 1]``; -100 and padding
        are ignored. Returns a :class:`CausalLMOutput` (``.loss``, ``.logits``).

        ``targets`` ``(batch, length)`` int64 are already shifted (``targets[:, i]`` is the token after
        ``input_ids[:, i]``); returns :meth:`loss`, a scalar (so wrappers such as
        DistributedDataParallel see one forward). Passing ``input_ids`` itself is an error."""
        if labels is not None:
            if targets is not None:
                raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
            return self._labels_loss(input_ids, labels, attention_mask, n_hashes)
        if targets is not None:
            return self.loss(input_ids, targets, attention_mask, n_hashes)
        return self.lm_head(self.hidden_states(input_ids, attention_mask, n_hashes))

    def _labels_loss(self, input_ids, labels, attention_mask, n_hashes, ignore_index=-100) -> CausalLMOutput:
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self.hidden_states(input_ids, attention_mask, n_hashes)
        labels = labels.to(hidden.device).long()
        if attention_mask is not None:
            labels = labels.masked_fill(~attention_mask.to(hidden.device).bool(), ignore_index)
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
        loss = self._mean_cross_entropy(hidden, targets, ignore_index, 4096)
        return CausalLMOutput(loss, hidden, self.lm_head)

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        ignore_index: int = -100,
        chunk_size: int = 4096,
    ) -> torch.Tensor:
        """Mean cross-entropy in nats of ``targets`` ``(batch, length)`` int64 (``ignore_index`` skipped),
        where ``targets[:, i]`` is the token that follows ``input_ids[:, i]`` (already shifted: e.g.
        ``loss(ids[:, :-1], ids[:, 1:])``; ``model(ids, labels=ids)`` shifts for you).

        The logits are made ``chunk_size`` positions at a time and recomputed in the backward pass, so
        ``length x vocab_size`` logits are never held at once.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        check_shifted_targets(input_ids, targets)
        hidden = self.hidden_states(input_ids, attention_mask, n_hashes)
        targets = targets.to(hidden.device).long()
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), ignore_index)
        return self._mean_cross_entropy(hidden, targets, ignore_index, chunk_size)

    def _mean_cross_entropy(self, hidden, targets, ignore_index, chunk_size) -> torch.Tensor:
        # float32 in every precision, as before the encoder family and as HF's causal-LM loss.
        total = chunked_cross_entropy(self.lm_head, hidden, targets, ignore_index, chunk_size, torch.float32)
        count = (targets != ignore_index).sum().clamp(min=1)
        return total / count
