"""The encoder side of an LSH cross-attention layer for decoding: the memory's keys and values sorted by
bucket in every round, and one query's attention by the rule of :mod:`reformer.attention.lsh_cross` for a
query chunk holding only itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..hashing import auto_n_buckets, draw_rotations, hash_vectors, total_buckets


@dataclass
class LSHCrossCache:
    """An LSH cross-attention layer's encoder side for decoding: keys/values ``(batch, heads, L_enc, d)``,
    each round's key order and sorted buckets ``(batch, heads, rounds, L_enc)``, the rotations."""

    keys: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    sorted_buckets: torch.Tensor
    n_real: torch.Tensor  # (batch, 1, 1, 1)
    rotations: torch.Tensor
    n_buckets: int | tuple[int, ...]
    window: int

    @classmethod
    def build(cls, layer: nn.Module, memory, memory_mask, n_hashes: int | None) -> LSHCrossCache:
        """The cache of ``memory`` ``(batch, L_enc, d_memory)`` (``memory_mask`` ``(batch, L_enc)`` bool or
        None) for the LSH cross-attention ``layer``, hashed with its eval (or fixed) seed and ``n_hashes``
        rounds (default its own)."""
        k, v = layer.project_memory(memory)
        batch, heads, length, head_dim = k.shape
        n_buckets = layer.n_buckets or auto_n_buckets(length, layer.chunk_size)
        seed = layer.eval_hash_seed if layer.hash_seed is None else layer.hash_seed
        rotations = draw_rotations(
            heads, head_dim, n_hashes or layer.n_hashes, n_buckets, seed=seed, device=k.device
        )
        buckets = hash_vectors(k, rotations, n_buckets)
        if memory_mask is not None:
            buckets.masked_fill_(~memory_mask[:, None, None, :], total_buckets(n_buckets))
        sorted_buckets, order = torch.sort(buckets, dim=-1, stable=True)
        n_real = (
            memory_mask.sum(-1) if memory_mask is not None else torch.full((batch,), length, device=k.device)
        )
        window = min(layer.window or 2 * layer.chunk_size * length, length)  # a query chunk of one
        return cls(k, v, order, sorted_buckets, n_real.view(batch, 1, 1, 1), rotations, n_buckets, window)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """One query per row ``(batch, heads, 1, d)``: the LSH cross-attention rule for a chunk holding only
        this query (its bucket's keys, centred in ``window`` sorted keys, every round in one softmax)."""
        bucket = hash_vectors(q, self.rotations, self.n_buckets)  # (batch, heads, rounds, 1)
        start = torch.searchsorted(self.sorted_buckets, bucket, right=False)
        end = torch.searchsorted(self.sorted_buckets, bucket, right=True)
        first = torch.minimum(
            ((start + end - self.window) // 2).clamp(min=0), (self.n_real - self.window).clamp(min=0)
        )
        places = first + torch.arange(self.window, device=q.device)  # (batch, heads, rounds, window)
        positions = self.order.gather(-1, places.clamp(max=self.order.shape[-1] - 1)).flatten(2)
        index = positions[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        k, v = self.keys.gather(2, index), self.values.gather(2, index)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~(places < self.n_real).flatten(2)[:, :, None, :], float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)
