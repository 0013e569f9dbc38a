"""Token embeddings and axial position embeddings (Reformer paper, appendix / trax)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AxialPositionEmbedding(nn.Module):
    """Position embeddings factored over axes ``shape = (n1, n2, ...)`` with dims ``(e1, e2, ...)``.

    Axis ``i`` owns a weight of ``n_i x e_i`` values (stored as HF does, with singleton axes:
    ``(n1, 1, e1)``, ``(1, n2, e2)``); position ``p`` with mixed-radix digits ``(p1, p2, ...)`` (last
    axis fastest) gets ``cat(w1[p1], w2[p2], ...)``. So ``prod(n)`` positions cost ``sum(n_i * e_i)``
    parameters.
    """

    def __init__(self, shape: tuple[int, ...], dims: tuple[int, ...], init_std: float = 1.0) -> None:
        super().__init__()
        if len(shape) != len(dims):
            raise ValueError(f"axial shape {shape} and dims {dims} must have the same number of axes")
        self.shape, self.dims = tuple(shape), tuple(dims)
        self.weights = nn.ParameterList()
        for axis, (n, e) in enumerate(zip(shape, dims, strict=True)):
            weight_shape = [1] * len(shape) + [e]
            weight_shape[axis] = n
            self.weights.append(nn.Parameter(torch.randn(weight_shape) * init_std))

    @property
    def max_positions(self) -> int:
        return math.prod(self.shape)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions``: ``(length,)`` or ``(batch, length)`` int64 -> ``(..., sum(dims))``."""
        parts = []
        stride = self.max_positions
        for n, weight in zip(self.shape, self.weights, strict=True):
            stride //= n
            digit = torch.div(positions, stride, rounding_mode="floor") % n
            # An embedding lookup, not weight[digit]: the backward of advanced indexing accumulates with
            # index_put_, which is nondeterministic on CPU with several threads (digits repeat).
            parts.append(F.embedding(digit, weight.reshape(n, -1)))
        return torch.cat(parts, dim=-1)


class ReformerEmbeddings(nn.Module):
    """Token embedding plus axial position embedding, then dropout.

    Shapes: ``input_ids`` ``(batch, length)`` int64 -> ``(batch, length, d_model)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        axial_shape: tuple[int, ...],
        axial_dims: tuple[int, ...],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = AxialPositionEmbedding(axial_shape, axial_dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.tokens(input_ids) + self.positions(position_ids))
