"""The full-attention layer's decode cache and step: every key and value, exact causal attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cache_buffers import grow, preallocate, write_at


@dataclass
class KVCache:
    """A full-attention layer's keys and values ``(batch, heads, capacity, head_dim)`` of every position."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_prefix(cls, k: torch.Tensor, v: torch.Tensor, capacity: int | None = None) -> KVCache:
        """From ``k``, ``v`` ``(batch, heads, length, dim)``, preallocated for ``capacity`` positions."""
        return cls(*(preallocate(x, 2, capacity) for x in (k, v)))

    def reserve(self, capacity: int) -> None:
        self.keys, self.values = grow(self.keys, 2, capacity), grow(self.values, 2, capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def full_decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Append one position per row and return its causal exact attention ``(batch, heads, 1, head_dim_v)``."""
    cache.reserve(max_length + 1)
    write_at(cache.keys, 2, lengths, k.to(cache.keys.dtype))
    write_at(cache.values, 2, lengths, v.to(cache.values.dtype))
    keys, values = cache.keys[:, :, : max_length + 1], cache.values[:, :, : max_length + 1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(keys.dtype), keys.transpose(-1, -2)).to(acc) / math.sqrt(q.shape[-1])
    later = torch.arange(keys.shape[2], device=q.device) > lengths[:, None]
    scores = scores.masked_fill(later[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1).to(values.dtype), values).to(v.dtype)
