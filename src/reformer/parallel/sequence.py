"""Sequence parallelism for :class:`~reformer.ReformerLM` (DeepSpeed-Ulysses style).

The ``P`` ranks of a sequence group each hold ``L / P`` consecutive tokens of every activation: the
embeddings (with global positions), layer norms, feed-forward layers and the chunked loss run on the local
tokens only. Attention layers exchange their projections for whole sequences of ``n_heads / P`` heads
(:mod:`reformer.attention.sequence_shard`), attend, and exchange back; LSH rotations are drawn for all
heads and sliced, so every layout hashes identically. The reversible backward recomputes through the same
exchanges.

Usage, on every rank of ``group`` (all ranks seeded alike with ``torch.manual_seed``)::

    sp = SequenceParallelLM(model, group)            # model's attention now exchanges over group
    loss = sp(input_ids, targets=targets)            # the global mean; every rank passes the whole batch
    loss.backward()
    sp.sum_gradients()                               # each rank saw L / P tokens: sum over the group

Every rank passes the whole ``input_ids`` (and mask, targets): they are small next to the activations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..attention.base import SelfAttentionBase
from ..attention.sequence_shard import check_heads
from ..models.lm import ReformerLM, check_shifted_targets
from ..models.loss import chunked_cross_entropy


class _GatherTokens(torch.autograd.Function):
    """All-gather along the length; the backward keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=1)[rank], None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum whose backward passes the gradient through to the local term unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def set_sequence_group(model: nn.Module, group) -> None:
    """Make every attention module of ``model`` exchange over ``group`` (None: back to one process)."""
    for module in model.modules():
        if isinstance(module, SelfAttentionBase):
            if group is not None:
                check_heads(module.n_heads, dist.get_world_size(group))
            module.sequence_group = group


class SequenceParallelLM(nn.Module):
    """A :class:`ReformerLM` run sequence-parallel over ``group`` (a torch.distributed process group;
    None: the default group).

    ``forward`` / ``loss`` take the same arguments as the model's, with the whole batch on every rank:
    ``input_ids`` ``(batch, L)``. ``forward`` returns the whole logits ``(batch, L, vocab_size)`` on every
    rank (gathered: for evaluation and tests); ``loss`` (and ``forward`` with ``targets``) the global mean
    loss, whose gradient on each rank is that of its own tokens' share — call :meth:`sum_gradients` after
    ``backward``. ``L`` need not be divisible by ``P``: the tail is padded and masked.
    ``state_dict`` is the wrapped model's, so checkpoints load in one process and vice versa.
    """

    def __init__(self, model: ReformerLM, group=None) -> None:
        super().__init__()
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        set_sequence_group(model, self.group)

    # The wrapped model's parameter names, so checkpoints are interchangeable with one process's.
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def config(self):
        return self.model.config

    def _local_hidden(self, input_ids, attention_mask, n_hashes):
        """This rank's final hidden states ``(batch, Lp / P, 2 d_model)``, the real-first ``order`` (or
        None) and the padded mask ``(batch, Lp)`` (or None), ``Lp`` = ``L`` rounded up to ``P``."""
        model = self.model
        input_ids, attention_mask, order = model.real_tokens_first(input_ids, attention_mask)
        batch, length = input_ids.shape
        extra = -length % self.size
        if extra:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            input_ids = F.pad(input_ids, (0, extra))
            attention_mask = F.pad(attention_mask, (0, extra), value=0)
        local = input_ids.shape[1] // self.size
        start = self.rank * local
        positions = torch.arange(start, start + local, device=input_ids.device)
        previous = input_ids[:, start - 1 : start].long() if start > 0 else None
        x = model.embeddings(input_ids[:, start : start + local].long(), positions, previous)
        y1, y2 = model.layers(x, x, attention_mask, n_hashes)
        return model.final_norm(torch.cat([y1, y2], dim=-1)), order, attention_mask

    def forward(self, input_ids, attention_mask=None, n_hashes=None, targets=None):
        if targets is not None:
            return self.loss(input_ids, targets, attention_mask, n_hashes)
        hidden, order, _ = self._local_hidden(input_ids, attention_mask, n_hashes)
        logits = _GatherTokens.apply(self.model.lm_head(hidden), self.group)[:, : input_ids.shape[1]]
        if order is None:
            return logits
        back = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return logits.gather(1, back[..., None].expand_as(logits))

    def loss(
        self, input_ids, targets, attention_mask=None, n_hashes=None, ignore_index=-100, chunk_size=4096
    ):
        """Mean cross-entropy over the whole batch (every rank returns the same value); ``targets`` are
        already shifted, as in :meth:`ReformerLM.loss`."""
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        check_shifted_targets(input_ids, targets)
        hidden, order, mask = self._local_hidden(input_ids, attention_mask, n_hashes)
        targets = targets.to(hidden.device).long()
        if order is not None:
            targets = targets.gather(1, order)
        targets = (
            F.pad(targets, (0, mask.shape[1] - targets.shape[1]), value=ignore_index)
            if mask is not None
            else targets
        )
        if mask is not None:
            targets = targets.masked_fill(~mask.bool(), ignore_index)
        local = hidden.shape[1]
        targets = targets[:, self.rank * local : (self.rank + 1) * local]
        total = chunked_cross_entropy(
            self.model.lm_head, hidden, targets, ignore_index, chunk_size, torch.float32
        )
        count = (targets != ignore_index).sum().to(total.dtype)
        dist.all_reduce(count, group=self.group)
        return _SumOverGroup.apply(total, self.group) / count.clamp(min=1)

    def sum_gradients(self) -> None:
        """Sum every parameter's gradient over the sequence group (each rank's is its tokens' share)."""
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def unwrap(self) -> ReformerLM:
        """The model, back to single-process attention."""
        set_sequence_group(self.model, None)
        return self.model
