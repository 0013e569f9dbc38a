"""Reversible decoder layers with cross-attention (encoder-decoder Reformer).

A layer is three reversible half-residual steps on the stream pair ``(a, b)``, each
``(a, b) -> (b, a + f(b))``: causal self-attention, cross-attention to the encoder output ``memory``,
feed-forward (each ``f`` norms its own input). From ``(x1, x2)`` a layer makes
``y1 = x1 + SelfAttn(x2)``, ``y2 = x2 + CrossAttn(y1, memory)``, ``z1 = y1 + FF(y2)`` and outputs
``(y2, z1)``: every sublayer reads the latest update, as in a sequential Transformer decoder.

The backward pass rebuilds each step's input from its output (``a = (a + f(b)) - f(b)``), so only the
last layer's output is kept and activation memory does not grow with depth. ``memory`` enters every
cross-attention step; its gradient is the sum of those steps' contributions, accumulated in one buffer.
Dropout masks are replayed by restoring the generator states, LSH buckets through each step's replay
record, and the forward's autocast state is re-entered, as in :mod:`reformer.reversible`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .feedforward import FeedForward
from .reversible import AutocastState, _maybe_restored, _RngState
from .vjp import vjp

STEPS = ("self", "cross", "ff")


class DecoderBlock(nn.Module):
    """One decoder layer: pre-LayerNorm causal self-attention, cross-attention and the feed-forward.

    Shapes: ``a, b`` ``(batch, L_dec, d_model)``, ``memory`` ``(batch, L_enc, d_memory)`` -> ``a, b``.
    """

    def __init__(
        self,
        self_attention: nn.Module,
        cross_attention: nn.Module,
        feed_forward: FeedForward,
        d_model: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attention = self_attention
        self.cross_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross_attention = cross_attention
        self.feed_forward = feed_forward

    def step(
        self, kind: str, b: torch.Tensor, memory: torch.Tensor | None, ctx: dict, replay: dict
    ) -> torch.Tensor:
        """``f(b)`` of step ``kind``; ``ctx`` holds the masks, ``n_hashes`` and (decoding) ``memory_kv``."""
        if kind == "self":
            return self.self_attention(
                self.self_norm(b), ctx.get("attention_mask"), n_hashes=ctx.get("n_hashes"), replay=replay
            )
        if kind == "cross":
            return self.cross_attention(
                self.cross_norm(b), memory, ctx.get("memory_mask"), memory_kv=ctx.get("memory_kv"),
                n_hashes=ctx.get("n_hashes"), replay=replay, query_mask=ctx.get("attention_mask"),
            )  # fmt: skip
        return self.feed_forward(b)

    def step_params(self, kind: str) -> list[nn.Parameter]:
        modules = {
            "self": (self.self_norm, self.self_attention),
            "cross": (self.cross_norm, self.cross_attention),
            "ff": (self.feed_forward,),
        }[kind]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def forward(self, a, b, memory, ctx: dict, replays: dict | None = None):
        for kind in STEPS:
            replay = {} if replays is None else replays.setdefault(kind, {})
            a, b = b, a + self.step(kind, b, memory, ctx, replay)
        return a, b


class _ReversibleDecoderFunction(torch.autograd.Function):
    """Runs every step forward without storing activations; rebuilds them in backward. Block parameters
    and ``memory`` are explicit inputs and their gradients explicit outputs."""

    @staticmethod
    def forward(ctx, a, b, memory, step_ctx, blocks, keep_rng, *params):
        records = []
        with torch.no_grad():
            a, b = a.clone(), b.clone()
            for block in blocks:
                for kind in STEPS:
                    rng = _RngState(a.device) if keep_rng else None
                    replay: dict = {}
                    a.add_(block.step(kind, b, memory, step_ctx, replay))
                    a, b = b, a
                    records.append((block, kind, replay, rng))
        ctx.records, ctx.step_ctx, ctx.autocast, ctx.params = records, step_ctx, AutocastState(), params
        ctx.memory_needs_grad = memory.requires_grad
        ctx.save_for_backward(a, b, memory)
        return a, b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, grad_b):
        a, b, memory = ctx.saved_tensors
        a, b, grad_a, grad_b = a.clone(), b.clone(), grad_a.clone(), grad_b.clone()
        grad_memory = torch.zeros_like(memory) if ctx.memory_needs_grad else None
        param_grads: dict[nn.Parameter, torch.Tensor] = {}
        for block, kind, replay, rng in reversed(ctx.records):
            # The step's output is (p, q) = (b_in, a_in + f(b_in)): so b_in = p and a_in = q - f(p).
            p_leaf = a.detach().requires_grad_(True)
            params = block.step_params(kind)
            memory_in = memory
            if kind == "cross" and grad_memory is not None:
                memory_in = memory.detach().requires_grad_(True)
            inputs = [p_leaf, *params] + ([memory_in] if memory_in is not memory else [])
            with torch.enable_grad(), _maybe_restored(rng), ctx.autocast.entered():
                f_out = block.step(kind, p_leaf, memory_in, ctx.step_ctx, replay)
            grads = vjp(f_out, inputs, grad_b, allow_unused=True)
            grad_a.add_(grads[0])  # the gradient of p = b_in
            for param, g in zip(params, grads[1 : 1 + len(params)], strict=True):
                if g is not None:
                    param_grads[param] = g
            if memory_in is not memory and grads[-1] is not None:
                grad_memory.add_(grads[-1])
            with torch.no_grad():
                b.sub_(f_out)  # now a_in
            del f_out, grads, p_leaf
            # (a_in, b_in) with gradients (grad of q, which a_in enters with identity; grad of p).
            a, b, grad_a, grad_b = b, a, grad_b, grad_a
        return (grad_a, grad_b, grad_memory, None, None, None, *(param_grads.get(p) for p in ctx.params))


class ReversibleDecoder(nn.Module):
    """A stack of :class:`DecoderBlock` run reversibly (or as plain residuals with ``reversible=False``).

    Shapes: ``a, b`` ``(batch, L_dec, d_model)``, ``memory`` ``(batch, L_enc, d_memory)`` -> ``a, b``.
    ``ctx`` holds ``attention_mask`` (decoder padding, also the cross-attention's query mask),
    ``memory_mask`` (source padding) and ``n_hashes``.
    """

    def __init__(self, blocks: list[DecoderBlock], reversible: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, a, b, memory, ctx: dict):
        needs_grad = torch.is_grad_enabled() and (
            a.requires_grad or memory.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if not self.reversible or not needs_grad:
            for block in self.blocks:
                a, b = block(a, b, memory, ctx)
            return a, b
        params = [p for block in self.blocks for p in block.parameters()]
        return _ReversibleDecoderFunction.apply(a, b, memory, ctx, list(self.blocks), self.training, *params)
