"""Preallocated, growable per-row cache buffers: what every cache kind stores its positions in."""

from __future__ import annotations

import torch

# Caches that must grow past their preallocated capacity grow by this many positions at a time.
GROW_BLOCK = 1024


def grow(t: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    """``t`` grown to hold ``capacity`` entries along ``dim`` (in ``GROW_BLOCK`` steps), contents kept."""
    if t.shape[dim] >= capacity:
        return t
    shape = list(t.shape)
    shape[dim] = -(-capacity // GROW_BLOCK) * GROW_BLOCK
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def preallocate(x: torch.Tensor, dim: int, capacity: int | None) -> torch.Tensor:
    """A copy of ``x`` in a buffer of ``max(capacity, size)`` entries along ``dim`` (the rest zeros)."""
    shape = list(x.shape)
    shape[dim] = max(capacity or 0, x.shape[dim])
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def write_at(store: torch.Tensor, dim: int, positions: torch.Tensor, new: torch.Tensor) -> None:
    """``store[b, ..., positions[b], ...] = new[b, ...]`` along ``dim`` (>= 1) for every batch row ``b``.

    ``new`` has ``store``'s shape with ``dim`` of size 1.
    """
    shape = [1] * store.dim()
    shape[0] = positions.shape[0]
    index = positions.view(shape).expand(new.shape)
    store.scatter_(dim, index, new)
