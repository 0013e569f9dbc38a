"""Position-wise feed-forward, computed in chunks of positions (Reformer paper, section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vjp import vjp

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForward(nn.Module):
    """``LayerNorm -> Linear(d_model, d_ff) -> Dropout -> act -> Linear(d_ff, d_model) -> Dropout``.

    With ``chunk_size`` the positions are processed ``chunk_size`` at a time, so the
    ``(batch, length, d_ff)`` activation is never held whole when gradients are not recorded (and,
    through :meth:`backward_in_chunks`, not in the reversible backward either).

    Shapes: ``(batch, length, d_model)`` -> same shape.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        chunk_size: int | None = None,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dense_in = nn.Linear(d_model, d_ff)
        self.dense_out = nn.Linear(d_ff, d_model)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)
        self.chunk_size = chunk_size

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.dropout(self.dense_in(self.norm(x))))
        return self.dropout(self.dense_out(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_size is None or x.shape[1] <= self.chunk_size:
            return self._forward_dense(x)
        return torch.cat([self._forward_dense(part) for part in x.split(self.chunk_size, dim=1)], dim=1)

    def vjp_in_chunks(
        self, x: torch.Tensor, grad_out: torch.Tensor, param_grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute the forward chunk by chunk and backpropagate ``grad_out`` through each chunk.

        Adds the gradients of the parameters that require grad (in ``self.parameters()`` order) into
        ``param_grads`` and returns ``(output, grad_x)``; only one chunk's ``d_ff``-wide activations
        exist at a time. Chunks run in the forward's order, so dropout masks drawn from a restored RNG
        state are replayed.
        """
        size = self.chunk_size or x.shape[1]
        params = [p for p in self.parameters() if p.requires_grad]
        outputs, grads = [], []
        for part, grad_part in zip(x.split(size, dim=1), grad_out.split(size, dim=1), strict=True):
            part = part.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self._forward_dense(part)
            grad_part_x, *grad_params = vjp(out, [part, *params], grad_part)
            for acc, g in zip(param_grads, grad_params, strict=True):
                acc.add_(g)
            outputs.append(out.detach())
            grads.append(grad_part_x)
        if len(outputs) == 1:
            return outputs[0], grads[0]
        return torch.cat(outputs, dim=1), torch.cat(grads, dim=1)
