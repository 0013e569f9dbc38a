"""What every self-attention module shares: head split/merge, the output projection, dropout."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..hashing import rotation_heads
from .rotary import rotate_queries_keys
from .sequence_shard import heads_to_tokens, tokens_to_heads


class SelfAttentionBase(nn.Module):
    """Base for the attention modules: ``(batch, length, d_model)`` in, the same shape out.

    Subclasses create their input projections with :meth:`projection` and end ``forward`` with
    :meth:`output`. Every subclass's ``forward`` takes ``(x, attention_mask=None, *, n_hashes=None,
    replay=None)`` so that the attention kinds can be swapped per layer.

    With ``sequence_group`` set (by :func:`reformer.parallel.sequence_parallel`) ``x`` holds this rank's
    ``L / P`` tokens and ``attention_mask`` the whole ``(batch, L)``: :meth:`split_heads` exchanges the
    projections for whole sequences of ``n_heads / P`` heads and :meth:`output` exchanges them back.
    """

    sequence_group = None  # a torch.distributed process group while sequence parallel
    rotary_base: float | None = None  # set: queries and keys take rotary positions (see rotary.py)
    fixed_n_buckets: int | tuple[int, ...] | None = None  # a bucket count that decoding must use

    def decode_state(self, n_buckets: int | tuple[int, ...], n_hashes: int | None) -> torch.Tensor | None:
        """What this layer fixes for a generation run (passed to ``prefill``); None unless hashing."""
        return None

    def __init__(self, d_model: int, n_heads: int, d_head: int | None, dropout: float) -> None:
        super().__init__()
        if d_head is None:
            if d_model % n_heads != 0:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; set d_head")
            d_head = d_model // n_heads
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_head
        self.to_out = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def projection(self) -> nn.Linear:
        return nn.Linear(self.d_model, self.n_heads * self.d_head, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, length, heads * head_dim)`` -> ``(batch, heads, length, head_dim)``."""
        if self.sequence_group is not None:
            return tokens_to_heads(x, self.n_heads, self.sequence_group)
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``, ``k`` ``(batch, heads, length, head_dim)`` rotated to ``positions`` (``(length,)`` or
        ``(batch, length)``; default ``0 .. length - 1``) when the layer uses rotary positions, else as
        given. Scores depend on offsets only, so the first position of a sequence does not matter."""
        if self.rotary_base is None:
            return q, k
        if positions is None:
            positions = torch.arange(q.shape[2], device=q.device)
        return rotate_queries_keys(q, k, positions, self.rotary_base)

    def head_context(self) -> contextlib.AbstractContextManager:
        """Random draws per head (LSH rotations) inside this context are those of this rank's heads."""
        if self.sequence_group is None:
            return contextlib.nullcontext()
        local = self.n_heads // dist.get_world_size(self.sequence_group)
        return rotation_heads(self.n_heads, dist.get_rank(self.sequence_group) * local)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """Merge ``(batch, heads, length, head_dim)``, project to ``d_model``, apply dropout."""
        if self.sequence_group is not None:
            return self.dropout(self.to_out(heads_to_tokens(heads, self.sequence_group)))
        batch, _, length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, length, self.n_heads * self.d_head)
        return self.dropout(self.to_out(merged))
