"""Vector-Jacobian products for the recomputing backward passes (reversible layers, chunked losses)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vjp(
    output: torch.Tensor, inputs: Sequence[torch.Tensor], grad: torch.Tensor, allow_unused: bool = False
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, grad)``: the gradients of ``inputs`` for the output gradient
    ``grad`` (``output``'s shape), the same numbers.

    ``torch.autograd.grad`` with explicit output gradients imports sympy on its first call (0.6-0.8 s of
    every process's first training step). The gradient of ``(output * grad).sum()`` is the same: the sum's
    backward is ones and the product's ``1 * grad``, both exact.
    """
    with torch.enable_grad():
        total = (output * grad).sum()
    return torch.autograd.grad(total, inputs, allow_unused=allow_unused)
