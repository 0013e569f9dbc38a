"""What every self-attention module shares: head split/merge, the output projection, dropout."""

from __future__ import annotations

import torch
from torch import nn


class SelfAttentionBase(nn.Module):
    """Base for the attention modules: ``(batch, length, d_model)`` in, the same shape out.

    Subclasses create their input projections with :meth:`projection` and end ``forward`` with
    :meth:`output`. Every subclass's ``forward`` takes ``(x, attention_mask=None, *, n_hashes=None,
    replay=None)`` so that the attention kinds can be swapped per layer.
    """

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
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """Merge ``(batch, heads, length, head_dim)``, project to ``d_model``, apply dropout."""
        batch, _, length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, length, self.n_heads * self.d_head)
        return self.dropout(self.to_out(merged))
