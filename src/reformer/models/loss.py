"""Cross-entropy over long sequences without holding ``length x n_classes`` logits at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..recompute import AutocastState
from ..vjp import vjp


def chunked_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` ``(batch, length)`` int64, in ``dtype``
    (default: float32, float64 for float64 models), ``chunk_size`` positions at a time with the logits
    recomputed in the backward pass, so ``length x n_classes`` logits are never held at once.
    ``hidden``: ``(batch, length, 2 * d_model)``; ``head`` must be deterministic (no dropout): the
    backward pass calls it again."""
    dtype = loss_dtype(hidden.dtype) if dtype is None else dtype
    counted = targets != ignore_index
    if not torch.compiler.is_compiling() and 2 * int(counted.sum()) < counted.numel():
        # Only the counted positions need logits: a task that scores a few answer tokens in a long
        # sequence (passkey, recall) pays for those rows, not for length x n_classes. Mostly counted
        # targets keep their order, so a float32 sum adds in the same order as a dense loss's.
        hidden, targets = hidden[counted][None], targets[counted][None]
    total = hidden.new_zeros((), dtype=dtype)
    for h, t in zip(hidden.split(chunk_size, dim=1), targets.split(chunk_size, dim=1), strict=True):
        if not torch.is_grad_enabled():
            total = total + _chunk_loss(head, h, t, ignore_index, dtype)
        elif torch.compiler.is_compiling():  # traced as one recomputed region
            total = total + checkpoint(_chunk_loss, head, h, t, ignore_index, dtype, use_reentrant=False)
        else:
            params = [p for p in head.parameters() if p.requires_grad]
            if h.requires_grad or params:
                total = total + _RecomputedChunkLoss.apply(h, t, head, ignore_index, dtype, *params)
            else:
                total = total + _chunk_loss(head, h, t, ignore_index, dtype)
    return total


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32, or in float64 for float64 models (low-precision logits are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int, dtype):
    logits = head(hidden).to(dtype)
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )


class _RecomputedChunkLoss(torch.autograd.Function):
    """One chunk's loss whose logits are recomputed in the backward pass (what ``torch.utils.checkpoint``
    does, whose first call imports the compiler stack: over a second of every process's first step).
    The head's parameters are explicit inputs, so gradient hooks (DistributedDataParallel's) see them."""

    @staticmethod
    def forward(ctx, hidden, targets, head, ignore_index, dtype, *params):
        ctx.head, ctx.ignore_index, ctx.dtype, ctx.params = head, ignore_index, dtype, params
        ctx.autocast = AutocastState()
        ctx.save_for_backward(hidden, targets)
        return _chunk_loss(head, hidden, targets, ignore_index, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, targets = ctx.saved_tensors
        leaf = hidden.detach().requires_grad_(True)
        with torch.enable_grad(), ctx.autocast.entered():
            loss = _chunk_loss(ctx.head, leaf, targets, ctx.ignore_index, ctx.dtype)
        grads = vjp(loss, [leaf, *ctx.params], grad)
        grad_hidden = grads[0] if ctx.needs_input_grad[0] else None
        return (grad_hidden, None, None, None, None, *grads[1:])
