"""The all-to-all exchanges of sequence parallelism (DeepSpeed-Ulysses): tokens-sharded <-> heads-sharded.

Each of the ``P`` ranks of a sequence group holds ``L / P`` consecutive tokens of every activation.
Attention needs whole sequences, so after the projections one all-to-all turns ``(batch, L / P, heads,
head_dim)`` into ``(batch, L, heads / P, head_dim)`` (rank ``r`` gets heads ``r * H / P ..``), the
attention kinds run unchanged on whole sequences, and the inverse exchange returns the outputs to their
tokens before the output projection.

Each exchange is one ``all_to_all_single`` between two contiguous buffers laid out ``(P, ...)``: part
``j`` of the send buffer goes to rank ``j``, part ``s`` of the receive buffer came from rank ``s``. The
layout changes around it are ordinary (differentiable) permute-copies, so an exchange holds the input,
the send buffer, the receive buffer and the result: no per-rank lists, no concatenation, and no flattening
copies inside the backend (gloo copies list arguments into flat buffers). The exchange is its own inverse,
so its backward is the same exchange of the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(send: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of a contiguous ``(P, ...)`` buffer: part ``j`` goes to rank ``j``; part ``s`` of the
    result came from rank ``s``."""
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=group)
    return receive


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send, group):
        ctx.group = group
        return _exchange(send, group)

    @staticmethod
    def backward(ctx, grad):
        # Rank r's part s of the output was rank s's part r of the input: the same exchange inverts it.
        return _exchange(grad.contiguous(), ctx.group), None


def check_heads(n_heads: int, size: int) -> None:
    if n_heads % size != 0:
        raise ValueError(
            f"n_heads={n_heads} is not divisible by the sequence-parallel size {size}; "
            f"choose a size that divides {n_heads} (or a head count divisible by {size})"
        )


def tokens_to_heads(x: torch.Tensor, n_heads: int, group) -> torch.Tensor:
    """``(batch, L / P, n_heads * head_dim)`` on each rank -> ``(batch, n_heads / P, L, head_dim)``
    (contiguous): this rank's heads for the whole sequence."""
    size = dist.get_world_size(group)
    check_heads(n_heads, size)
    batch, length, width = x.shape
    local = n_heads // size
    # (P, batch, heads / P, L / P, head_dim): part j holds rank j's heads for this rank's tokens.
    send = x.view(batch, length, size, local, width // n_heads).permute(2, 0, 3, 1, 4).contiguous()
    receive = _Exchange.apply(send, group)  # part s: this rank's heads for rank s's tokens
    return receive.permute(1, 2, 0, 3, 4).reshape(batch, local, size * length, width // n_heads)


def heads_to_tokens(heads: torch.Tensor, group) -> torch.Tensor:
    """``(batch, n_heads / P, L, head_dim)`` -> ``(batch, L / P, n_heads * head_dim)`` (heads in order)."""
    size = dist.get_world_size(group)
    batch, local, length, head_dim = heads.shape
    # (P, batch, heads / P, L / P, head_dim): part j holds rank j's tokens for this rank's heads.
    send = heads.reshape(batch, local, size, length // size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    receive = _Exchange.apply(send, group)  # part s: rank s's heads for this rank's tokens
    return receive.permute(1, 3, 0, 2, 4).reshape(batch, length // size, size * local * head_dim)
