"""Chunked local attention: each chunk of positions attends to itself and its neighbour chunks."""

from __future__ import annotations

import math

import torch

from .base import SelfAttentionBase
from .chunked import ChunkPlan, chunk_neighbours, chunked_attention, draw_call_seed, flat_rows
from .decode import Prompt
from .local_cache import LocalCache, local_decode_step
from .masks import check_attention_inputs, pad_to_multiple


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int = 128,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Attention within windows of chunks in original order (keys scaled by 1/sqrt(head_dim)).

    Chunk ``i`` sees chunks ``i - n_chunks_before .. i + n_chunks_after``, wrapping around at the ends
    as trax and HF do (causal masking hides the wrapped keys from decoders); trailing padding is
    skipped over. Sequences up to ``chunk_size`` get exact attention.

    Args:
        q, k: ``(batch, heads, length, head_dim)``; v: ``(batch, heads, length, head_dim_v)``.
        attention_mask: ``(batch, length)``, 1/True for real tokens.

    Returns:
        ``(batch, heads, length, head_dim_v)``.
    """
    key_valid = check_attention_inputs(q, v, attention_mask)
    if k.shape != q.shape:
        raise ValueError(f"k {tuple(k.shape)} must have q's shape {tuple(q.shape)}")
    batch, heads, length, _ = q.shape
    k = k / math.sqrt(q.shape[-1])
    slices = batch * heads
    chunk = min(chunk_size, length)
    padded = -(-length // chunk) * chunk
    chunks = padded // chunk
    q, k, v, key_valid = pad_to_multiple(padded, q, k, v, key_valid=key_valid)
    real_chunks = None
    if key_valid is not None:
        # Chunks up to the last real token; trailing all-padding chunks are skipped by the wrap.
        positions = torch.arange(1, padded + 1, device=q.device)
        extent = (key_valid * positions).amax(-1)
        real_chunks = (extent + chunk - 1) // chunk
    window = (n_chunks_before, n_chunks_after) if chunks > 1 else (0, 0)
    neighbours = chunk_neighbours(real_chunks, batch, 1, chunks, *window, q.device)
    chunk_rows = torch.arange(slices * padded, device=q.device).view(slices * chunks, chunk)
    plan = ChunkPlan.shared_by_heads(chunk_rows, neighbours, key_valid, heads, 1, causal, self_mask=False)
    out = chunked_attention(flat_rows(q), flat_rows(k), flat_rows(v), plan, dropout_p, dropout_seed)
    return out.view(batch, heads, padded, -1)[:, :, :length]


class LocalSelfAttention(SelfAttentionBase):
    """Local self-attention with separate query, key, value and output projections.

    Shapes: ``x`` ``(batch, length, d_model)`` -> ``(batch, length, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        d_head: int | None = None,
        chunk_size: int = 128,
        causal: bool = False,
        n_chunks_before: int = 1,
        n_chunks_after: int = 0,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        rotary_base: float | None = None,
    ) -> None:
        super().__init__(d_model, n_heads, d_head, dropout)
        self.rotary_base = rotary_base
        self.chunk_size, self.causal, self.attn_dropout = chunk_size, causal, attn_dropout
        self.n_chunks_before, self.n_chunks_after = n_chunks_before, n_chunks_after
        self.to_q, self.to_k, self.to_v = self.projection(), self.projection(), self.projection()

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        n_hashes: int | None = None,
        replay: dict | None = None,
    ) -> torch.Tensor:
        """``x``: ``(batch, length, d_model)``; ``n_hashes`` and ``replay`` are accepted and ignored."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k)
        dropout_p = self.attn_dropout if self.training else 0.0
        dropout_seed = draw_call_seed() if dropout_p > 0.0 else None
        out = local_attention(
            q, k, v, chunk_size=self.chunk_size, causal=self.causal, attention_mask=attention_mask,
            n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
            dropout_p=dropout_p, dropout_seed=dropout_seed,
        )  # fmt: skip
        return self.output(out)

    def prefill(
        self, x: torch.Tensor, prompt: Prompt, state: None = None
    ) -> tuple[torch.Tensor, LocalCache | None]:
        """Causal eval forward over ``x`` ``(batch, length, d_model)`` and a :class:`LocalCache` ring of the
        last window of keys and values (see :mod:`reformer.attention.decode`)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k)
        out = local_attention(
            q, k, v, chunk_size=self.chunk_size, causal=True, attention_mask=prompt.attention_mask,
            n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
        )  # fmt: skip
        cache = None
        if prompt.keep_cache:
            scaled = k / math.sqrt(k.shape[-1])
            cache = LocalCache.from_prefix(scaled, v, prompt.lengths, self.chunk_size, self.n_chunks_before)
        return self.output(out), cache

    def step(
        self, cache: LocalCache, x_t: torch.Tensor, lengths: torch.Tensor, max_length: int
    ) -> tuple[torch.Tensor, LocalCache]:
        """``x_t`` ``(batch, 1, d_model)`` at position ``lengths[b]`` of row ``b``: its causal local attention
        ``(batch, 1, d_model)``, wrap-around of the first chunks included; the ring keeps it."""
        q, k, v = (self.split_heads(proj(x_t)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.rotate(q, k, lengths.view(-1, 1))
        return self.output(local_decode_step(cache, q, k, v, lengths)), cache
