"""Token embeddings and position embeddings: learned axial ones (Reformer paper, appendix / trax) or fixed
sinusoidal ones (Vaswani et al. 2017)."""

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


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed sinusoidal position embeddings scaled by ``amplitude``: position ``p`` gets
    ``amplitude * cat(sin(p * w), cos(p * w))`` with ``d // 2`` frequencies ``w_k = base ** (-k / (d // 2))``
    (an odd ``d`` gets a zero last component). No parameters.

    Every position's vector is a fixed rotation of position 0's, per frequency, so a linear map of the
    embedding of ``p`` gives the embedding of ``p + c`` or of ``c - p`` for any constant ``c``: attention
    can express "the position at offset c" or "the mirror position" with one matrix shared by all
    positions, where learned positions must learn every pair on its own.
    """

    def __init__(self, d: int, amplitude: float = 1.0, base: float = 10000.0) -> None:
        super().__init__()
        self.d, self.amplitude, self.base = d, amplitude, base

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``positions``: ``(length,)`` or ``(batch, length)`` int64 -> ``(..., d)`` in ``dtype``. The angles
        are computed in float64 (exact enough at any length), then rounded."""
        half = self.d // 2
        k = torch.arange(half, dtype=torch.float64, device=positions.device)
        inv_freq = torch.exp(-math.log(self.base) * k / max(half, 1))
        angles = positions.to(torch.float64)[..., None] * inv_freq
        parts = [angles.sin(), angles.cos()]
        if self.d % 2:
            parts.append(angles.new_zeros(*angles.shape[:-1], 1))
        return (self.amplitude * torch.cat(parts, dim=-1)).to(dtype)


def position_ids(length: int, offset: int, max_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions ``offset .. offset + length - 1`` ``(length,)`` int64 of a sequence that starts at position
    ``offset``; they must lie below ``max_len`` (a model's ``max_seq_len``: learned positions have no
    embedding beyond it, and the fixed ones are kept to the same range)."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"position offset {offset!r} must be a non-negative integer")
    if offset + length > max_len:
        raise ValueError(
            f"position offset {offset} + length {length} exceeds max_seq_len={max_len}; lower the offset, "
            "shorten the sequence or build the model with a larger max_seq_len"
        )
    return torch.arange(offset, offset + length, device=device)


class ReformerEmbeddings(nn.Module):
    """Token embedding plus position embedding, then dropout.

    ``position_embedding`` is ``"axial"`` (learned, :class:`AxialPositionEmbedding` over ``axial_shape`` /
    ``axial_dims``), ``"sinusoidal"`` (fixed, :class:`SinusoidalPositionEmbedding` with amplitude
    ``sqrt(2) * init_std``: each component then has the root-mean-square of a token embedding at
    initialisation, so neither drowns the other), or ``"rotary"`` / ``"none"``: nothing is added here
    (rotary positions act inside the attention layers).

    With ``token_shift`` the second half of each position's features is the previous token's (before
    dropout); ``previous_ids`` ``(batch, 1)`` is the token before the first (None: nothing, zeros), for a
    sequence continued from an earlier one (cached decoding, a slice of a longer sequence).

    Shapes: ``input_ids`` ``(batch, length)`` int64 -> ``(batch, length, d_model)``; ``position_ids``
    ``(length,)`` or ``(batch, length)`` int64 (default ``0 .. length - 1``).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        axial_shape: tuple[int, ...],
        axial_dims: tuple[int, ...],
        dropout: float = 0.0,
        position_embedding: str = "axial",
        init_std: float = 0.02,
        token_shift: bool = False,
    ) -> None:
        super().__init__()
        self.token_shift = token_shift
        self.tokens = nn.Embedding(vocab_size, d_model)
        if position_embedding == "sinusoidal":
            self.positions = SinusoidalPositionEmbedding(d_model, amplitude=math.sqrt(2.0) * init_std)
        elif position_embedding == "axial":
            self.positions = AxialPositionEmbedding(axial_shape, axial_dims)
        elif position_embedding in ("rotary", "none"):
            self.positions = None
        else:
            raise ValueError(
                f"position_embedding={position_embedding!r} is unknown; use 'axial', 'sinusoidal', "
                "'rotary' or 'none'"
            )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        previous_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids)
        if self.token_shift:
            x = shift_tokens(x, None if previous_ids is None else self.tokens(previous_ids))
        if isinstance(self.positions, SinusoidalPositionEmbedding):
            x = x + self.positions(position_ids, x.dtype)
        elif self.positions is not None:
            x = x + self.positions(position_ids)
        return self.dropout(x)


def shift_tokens(x: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(batch, length, d)`` with its last ``d - d // 2`` features taken from the previous position
    (from ``before`` ``(batch, 1, d)`` at the first position, zeros when None)."""
    half = x.shape[-1] // 2
    if before is None:
        before = x.new_zeros(x.shape[0], 1, x.shape[-1])
    previous = torch.cat([before[..., half:], x[:, :-1, half:]], dim=1)
    return torch.cat([x[..., :half], previous], dim=-1)
