"""Exact cross-attention (decoder queries over encoder keys): the memory-lean functional core and the module.

The scores are computed tile by tile, (query block) x (key block), by the blocked core (:mod:`.blocked`):
the log-sum-exp of every query is carried across key blocks, and the backward pass recomputes each tile
from the saved log-sum-exp, as FlashAttention does: memory is O(L_dec + L_enc) besides one tile of
scores, however long the source. The module projects the encoder output to keys and values once per
call (or takes them from a decoding cache) and the decoder states to queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import SelfAttentionBase
from .blocked import HIDDEN, blocked_attention, register_plan

# Scores held at once: batch x heads x query block x key block. 2**22 float32 values is 16 MiB.
CROSS_BLOCK_SCORES = 2**22
KEY_BLOCK = 1024


@register_plan
@dataclass
class TiledPlan:
    """Every query of every (batch, head) slice over every key, in tiles of ``query_block`` queries x
    ``key_block`` keys of all slices at once. Rows: ``(batch * L_dec * heads, dim)`` queries and
    ``(batch * L_enc * heads, dim)`` keys, position-major as the projections make them (so that splitting
    the heads copies nothing); ``key_valid`` ``(batch * heads, L_enc)`` bool or None."""

    key_valid: torch.Tensor | None
    device: torch.device
    slices: int
    heads: int
    lq: int
    lk: int
    query_block: int
    key_block: int

    def blocks(self) -> list[tuple[tuple[int, int, int, int], bool]]:
        return [
            ((q0, min(q0 + self.query_block, self.lq), k0, min(k0 + self.key_block, self.lk)), k0 == 0)
            for q0 in range(0, self.lq, self.query_block)
            for k0 in range(0, self.lk, self.key_block)
        ]

    def block_rows(self, block: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        q0, q1, k0, k1 = block
        slices = torch.arange(self.slices, device=self.device)[:, None]
        batch, head = slices // self.heads, slices % self.heads
        q_rows = (batch * self.lq + torch.arange(q0, q1, device=self.device)) * self.heads + head
        return q_rows, (batch * self.lk + torch.arange(k0, k1, device=self.device)) * self.heads + head

    def mask_scores(self, scores, block, q_rows, k_rows) -> torch.Tensor:
        if self.key_valid is None:
            return scores
        _, _, k0, k1 = block
        return scores.masked_fill_(~self.key_valid[:, None, k0:k1], HIDDEN)


def tiled_plan(
    q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, block_scores: int
) -> TiledPlan:
    """The tiles of ``q`` ``(batch, heads, L_dec, dim)`` over ``k`` ``(batch, heads, L_enc, dim)``: keys 1,024
    at a time, and as many queries as keep a tile of all slices within ``block_scores`` scores."""
    batch, heads, lq, _ = q.shape
    slices, lk = batch * heads, k.shape[2]
    key_block = min(lk, KEY_BLOCK)
    query_block = max(1, min(lq, block_scores // max(1, slices * key_block)))
    if key_valid is not None:
        key_valid = key_valid[:, None].expand(batch, heads, lk).reshape(slices, lk)
    return TiledPlan(key_valid, q.device, slices, heads, lq, lk, query_block, key_block)


def check_cross_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate cross-attention inputs; return ``key_mask`` as bool ``(batch, L_enc)`` (None: all real)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k and v must be (batch, heads, length, head_dim); "
            f"got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch and heads, "
            "q and k their head_dim, k and v their length"
        )
    if k.shape[2] == 0:
        raise ValueError("the encoder side (k, v) is empty; cross-attention needs at least one source token")
    if key_mask is None:
        return None
    if key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_mask has shape {tuple(key_mask.shape)}, "
            f"expected (batch, L_enc) = {(k.shape[0], k.shape[2])}"
        )
    if key_mask.is_floating_point():
        raise TypeError("key_mask must be bool or integer (1 = real token, 0 = padding), not float")
    key_mask = key_mask.to(device=k.device, dtype=torch.bool)
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph; an all-real mask hides nothing
        return key_mask
    return None if bool(key_mask.all()) else key_mask


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    block_scores: int = CROSS_BLOCK_SCORES,
) -> torch.Tensor:
    """Exact softmax attention of decoder queries over encoder keys, scale 1/sqrt(head_dim).

    Args:
        q: ``(batch, heads, L_dec, head_dim)`` queries.
        k: ``(batch, heads, L_enc, head_dim)`` keys; v: ``(batch, heads, L_enc, head_dim_v)`` values.
        key_mask: ``(batch, L_enc)`` bool/int, True/1 for real source tokens, False/0 for padding.
        block_scores: the most scores held at once (sets the query block; keys go 1,024 at a time).

    Returns:
        ``(batch, heads, L_dec, head_dim_v)`` in ``v``'s dtype; zeros (and no gradient) for a row
        whose source is all padding. Memory O(L_dec + L_enc) besides one block; the backward
        recomputes the scores block by block and is not differentiable again.
    """
    key_valid = check_cross_inputs(q, k, v, key_mask)
    plan = tiled_plan(q, k, key_valid, block_scores)
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[-1])  # noqa: E731  (a view of a projection)
    out = blocked_attention(flat(q), flat(k), flat(v), plan, scale=1.0 / math.sqrt(q.shape[-1]))
    batch, heads, lq, _ = q.shape
    return out.view(batch, lq, heads, v.shape[-1]).transpose(1, 2)


@dataclass
class MemoryCache:
    """An exact cross-attention layer's encoder side for decoding: keys and values
    ``(batch, heads, L_enc, head_dim)`` and the memory's ``(batch, L_enc)`` mask (None: all real)."""

    keys: torch.Tensor
    values: torch.Tensor
    memory_mask: torch.Tensor | None


class CrossAttention(SelfAttentionBase):
    """Decoder-to-encoder attention with its projections.

    ``x`` ``(batch, L_dec, d_model)`` and ``memory`` ``(batch, L_enc, d_memory)`` (the encoder output)
    -> ``(batch, L_dec, d_model)``. :meth:`project_memory` gives the keys and values of a memory, which
    decoding computes once and passes back as ``memory_kv``.
    """

    def __init__(
        self, d_model: int, d_memory: int, n_heads: int, *, d_head: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(d_model, n_heads, d_head, dropout)
        self.to_q = self.projection()
        self.to_k = nn.Linear(d_memory, self.n_heads * self.d_head, bias=False)
        self.to_v = nn.Linear(d_memory, self.n_heads * self.d_head, bias=False)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(batch, heads, L_enc, head_dim)`` of ``memory`` ``(batch, L_enc, d_memory)``."""
        return self.split_heads(self.to_k(memory)), self.split_heads(self.to_v(memory))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None = None,
        *,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_hashes: int | None = None,
        replay: dict | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n_hashes``, ``replay`` and ``query_mask`` are accepted for the LSH kind's signature and ignored
        (every query attends on its own here; outputs at padding queries are unused)."""
        k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        q = self.split_heads(self.to_q(x))
        return self.output(cross_attention(q, k, v, key_mask=memory_mask))

    def prefill_memory(
        self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, n_hashes: int | None = None
    ) -> MemoryCache:
        """The decoding cache of ``memory`` ``(batch, L_enc, d_memory)``: its projected keys and values."""
        return MemoryCache(*self.project_memory(memory), memory_mask)

    def step(self, cache: MemoryCache, x_t: torch.Tensor) -> torch.Tensor:
        """Queries ``x_t`` ``(batch, L_dec, d_model)`` (one new position when decoding) over the cached
        memory: ``(batch, L_dec, d_model)``, as :meth:`forward` with that memory."""
        q = self.split_heads(self.to_q(x_t))
        return self.output(cross_attention(q, cache.keys, cache.values, key_mask=cache.memory_mask))
