"""The all-to-all exchanges of sequence parallelism (DeepSpeed-Ulysses): tokens-sharded <-> heads-sharded.

Each of the ``P`` ranks of a sequence group holds ``L / P`` consecutive tokens of every activation.
Attention needs whole sequences, so after the projections one all-to-all turns ``(batch, L / P, heads,
head_dim)`` into ``(batch, L, heads / P, head_dim)`` (rank ``r`` gets heads ``r * H / P ..``), the
attention kinds run unchanged on whole sequences, and the inverse exchange returns the outputs to their
tokens before the output projection. Both are differentiable: the backward of one is the other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``P`` equal parts along ``scatter_dim``, send part ``j`` to rank ``j`` and
    concatenate the parts received, in rank order, along ``gather_dim``."""
    size = dist.get_world_size(group)
    sends = [part.contiguous() for part in x.chunk(size, dim=scatter_dim)]
    receives = [torch.empty_like(sends[0]) for _ in range(size)]
    dist.all_to_all(receives, sends, group=group)
    return torch.cat(receives, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def check_heads(n_heads: int, size: int) -> None:
    if n_heads % size != 0:
        raise ValueError(
            f"n_heads={n_heads} is not divisible by the sequence-parallel size {size}; "
            f"choose a size that divides {n_heads} (or a head count divisible by {size})"
        )


def tokens_to_heads(x: torch.Tensor, n_heads: int, group) -> torch.Tensor:
    """``(batch, L / P, n_heads * head_dim)`` on each rank -> ``(batch, n_heads / P, L, head_dim)``."""
    size = dist.get_world_size(group)
    check_heads(n_heads, size)
    batch, length, width = x.shape
    x = x.view(batch, length, n_heads, width // n_heads)
    return _AllToAll.apply(x, group, 2, 1).transpose(1, 2)


def heads_to_tokens(heads: torch.Tensor, group) -> torch.Tensor:
    """``(batch, n_heads / P, L, head_dim)`` -> ``(batch, L / P, n_heads * head_dim)`` (heads in order)."""
    out = _AllToAll.apply(heads.transpose(1, 2).contiguous(), group, 1, 2)
    return out.flatten(2)
