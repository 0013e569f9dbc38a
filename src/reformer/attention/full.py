"""Exact attention through ``torch.nn.functional.scaled_dot_product_attention`` (short sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SelfAttentionBase
from .decode import Prompt
from .kv_cache import KVCache, full_decode_step
from .masks import check_attention_inputs


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Exact softmax attention, scale 1/sqrt(head_dim).

    Args:
        q, k: ``(batch, heads, length, head_dim)``; v: ``(batch, heads, length, head_dim_v)``.
        attention_mask: ``(batch, length)``, 1/True for real tokens. A padding query attends to itself
            so that no row is empty (its output is ignored anyway).

    Returns:
        ``(batch, heads, length, head_dim_v)``.
    """
    key_valid = check_attention_inputs(q, v, attention_mask)
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    length = q.shape[2]
    allowed = key_valid[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


class FullSelfAttention(SelfAttentionBase):
    """Exact self-attention with its projections. ``(batch, length, d_model)`` -> same shape."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        d_head: int | None = None,
        causal: bool = False,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        rotary_base: float | None = None,
    ) -> None:
        super().__init__(d_model, n_heads, d_head, dropout)
        self.rotary_base = rotary_base
        self.causal, self.attn_dropout = causal, attn_dropout
        self.to_q, self.to_k, self.to_v = self.projection(), self.projection(), self.projection()

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        n_hashes: int | None = None,
        replay: dict | None = None,
    ) -> torch.Tensor:
        """``x``: ``(batch, length, d_model)``; ``n_hashes`` and ``replay`` are accepted and ignored
        (SDPA's dropout draws from the default generator, whose state the reversible stack restores)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k)
        dropout_p = self.attn_dropout if self.training else 0.0
        out = full_attention(q, k, v, causal=self.causal, attention_mask=attention_mask, dropout_p=dropout_p)
        return self.output(out)

    def prefill(
        self, x: torch.Tensor, prompt: Prompt, state: None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Causal eval forward over ``x`` ``(batch, length, d_model)`` and a :class:`KVCache` of every
        position's keys and values (see :mod:`reformer.attention.decode`)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k)
        out = full_attention(q, k, v, causal=True, attention_mask=prompt.attention_mask)
        cache = KVCache.from_prefix(k, v, prompt.capacity) if prompt.keep_cache else None
        return self.output(out), cache

    def step(
        self, cache: KVCache, x_t: torch.Tensor, lengths: torch.Tensor, max_length: int
    ) -> tuple[torch.Tensor, KVCache]:
        """``x_t`` ``(batch, 1, d_model)`` at position ``lengths[b]`` of row ``b``: its causal exact attention
        ``(batch, 1, d_model)`` over the cached positions and itself; the cache keeps it."""
        q, k, v = (self.split_heads(proj(x_t)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k, lengths.view(-1, 1))
        return self.output(full_decode_step(cache, q, k, v, lengths, max_length)), cache
