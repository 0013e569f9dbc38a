"""The local layer's decode cache and step: a ring of the last window of keys and values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cache_buffers import write_at


@dataclass
class LocalCache:
    """One local layer's window: a ring of the last ``(n_chunks_before + 1) * chunk_size`` positions.

    Position ``p`` of a row lives in slot ``p % ring``. ``keys`` (already scaled by 1/sqrt(head_dim))
    ``(batch, heads, ring, head_dim)``, ``values`` ``(batch, heads, ring, head_dim_v)``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    chunk_size: int
    n_chunks_before: int

    @classmethod
    def from_prefix(
        cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, chunk_size: int, n_chunks_before: int
    ) -> LocalCache:
        """From scaled keys ``k`` and values ``v`` ``(batch, heads, length, dim)``; row ``b`` holds
        ``lengths[b]`` real positions."""
        ring = (n_chunks_before + 1) * chunk_size
        positions = lengths[:, None] - ring + torch.arange(ring, device=k.device)  # (batch, ring)
        slots, source = positions % ring, positions.clamp(min=0, max=k.shape[2] - 1)

        def fill(x: torch.Tensor) -> torch.Tensor:
            index = source[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
            out = x.new_zeros(x.shape[0], x.shape[1], ring, x.shape[-1])
            return out.scatter_(2, slots[:, None, :, None].expand_as(index), x.gather(2, index))

        return cls(fill(k), fill(v), chunk_size, n_chunks_before)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def local_decode_step(
    cache: LocalCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Append one position per row (at ``lengths[b]``) and return its causal local attention output.

    Equal to the last position of ``local_attention(..., causal=True)`` over the row's ``lengths + 1``
    positions, including the wrap-around of the first chunks (a chunk met twice counts twice).

    Args:
        q, k, v: ``(batch, heads, 1, head_dim)``, ``k`` unscaled.

    Returns:
        ``(batch, heads, 1, head_dim_v)``.
    """
    batch = q.shape[0]
    ring, cs = cache.keys.shape[2], cache.chunk_size
    write_at(cache.keys, 2, lengths % ring, (k / math.sqrt(q.shape[-1])).to(cache.keys.dtype))
    write_at(cache.values, 2, lengths % ring, v.to(cache.values.dtype))
    t = lengths[:, None]
    positions = t - (t - torch.arange(ring, device=q.device)) % ring  # (batch, ring) position per slot
    chunk = t // cs
    deltas = torch.arange(-cache.n_chunks_before, 1, device=q.device)
    seen = (chunk + deltas) % (chunk + 1)  # (batch, window): real chunks met, with repeats
    multiplicity = (seen[:, None, :] == (positions // cs)[..., None]).sum(-1)
    multiplicity = torch.where(t + 1 <= cs, 1, multiplicity)  # one chunk: exact attention
    multiplicity = multiplicity.masked_fill(positions < 0, 0)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(cache.keys.dtype), cache.keys.transpose(-1, -2)).to(acc)
    scores = scores + multiplicity.to(acc).log().view(batch, 1, 1, ring)
    return torch.matmul(scores.softmax(-1).to(cache.values.dtype), cache.values).to(v.dtype)
