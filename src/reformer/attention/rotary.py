"""Rotary position embeddings (Su et al., RoFormer 2021) for the local and exact attention layers.

Query and key features are taken in pairs ``(x[i], x[i + d/2])`` and each pair is rotated by the angle
``p * base ** (-i / (d/2))`` of its position ``p``. A query at ``p`` and a key at ``s`` then score
``q . R(s - p) k``: the scores depend on the offset between them only, never on where they are. In a
local layer every offset is below the window, so a model trained on short sequences meets no offset it
has not seen at any length, 1M tokens included. LSH layers take no positions at all: their hashing must
depend on content alone.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BASE = 10000.0


def rotary_angles(
    positions: torch.Tensor, dim: int, base: float = DEFAULT_BASE, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``(..., dim // 2)`` in ``dtype`` of the rotation at ``positions`` ``(...)`` int64.

    The angles are formed in float64 and rounded once, so a position near 2**20 keeps its angle to
    ~1e-10 rad (in float32 the product ``p * w`` alone would be off by ~0.06 rad there).
    """
    if dim % 2:
        raise ValueError(f"rotary positions need an even head dimension, got {dim}; choose d_head even")
    half = dim // 2
    inv_freq = torch.exp(
        -math.log(base) * torch.arange(half, dtype=torch.float64, device=positions.device) / half
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, heads, length, dim)`` with feature pairs ``(i, i + dim/2)`` rotated by the angles
    whose ``cos`` / ``sin`` are ``(length, dim/2)`` (shared by the batch) or ``(batch, length, dim/2)``."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def rotate_queries_keys(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, base: float = DEFAULT_BASE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` ``(batch, heads, length, dim)`` rotated to their ``positions``: ``(length,)`` for
    every row, or ``(batch, length)`` int64."""
    cos, sin = rotary_angles(positions, q.shape[-1], base, q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
