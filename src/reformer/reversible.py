"""Reversible residual layers (Reformer paper, section 3; Gomez et al. 2017): one engine for the
encoder's and the decoder's stacks.

A layer is a sequence of half-steps on the stream pair ``(a, b)``, each ``(a, b) -> (b, a + f(b))``
where ``f`` norms its own input. :class:`ReformerBlock` has two (attention, feed-forward): from
``(x1, x2)`` it makes ``y1 = x1 + Attention(LayerNorm(x2))``, ``y2 = x2 + FeedForward(y1)``. The decoder's
block (:class:`~reformer.reversible_decoder.DecoderBlock`) has three: self-attention, cross-attention to
the encoder output ``memory``, feed-forward.

The backward pass rebuilds each half-step's input from its output (``a = (a + f(b)) - f(b)``), so only
the last layer's output is kept and activation memory does not grow with depth. The feed-forward's
recomputation and backward run ``ff_chunk_size`` positions at a time (the ``d_ff``-wide activations are
never whole), every parameter gradient accumulates in one flat buffer, and ``memory``'s gradient (the
sum of every cross-attention step's) in another. Dropout masks, hash buckets and the autocast state of
the forward pass are replayed through :mod:`reformer.recompute`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .feedforward import FeedForward
from .recompute import (
    TRIM_EVERY_LAYERS,
    AutocastState,
    RngState,
    SortIndexStore,
    eager_under_compile,
    maybe_restored,
    release_free_heap,
)
from .vjp import vjp

FEED_FORWARD = "ff"  # the half-step kind run through FeedForward.vjp_in_chunks in the backward pass


class ReformerBlock(nn.Module):
    """One layer: pre-LayerNorm attention ``f`` and feed-forward ``g`` (which norms its own input).

    As two half-steps of :class:`ReversibleSequence` (``steps``): ``(x1, x2) -> (x2, y1) -> (y1, y2)``.
    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape.
    """

    steps = ("attention", FEED_FORWARD)
    memory_steps: tuple[str, ...] = ()  # the steps that read the encoder output (none here)

    def __init__(self, attention: nn.Module, feed_forward: FeedForward, d_model: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attention = attention
        self.feed_forward = feed_forward

    def attend(self, x2, attention_mask=None, n_hashes=None, replay=None) -> torch.Tensor:
        return self.attention(self.attn_norm(x2), attention_mask, n_hashes=n_hashes, replay=replay)

    def forward(self, x1, x2, attention_mask=None, n_hashes=None, replay=None):
        y1 = x1 + self.attend(x2, attention_mask, n_hashes, replay)
        y2 = x2 + self.feed_forward(y1)
        return y1, y2

    def step(
        self, kind: str, b: torch.Tensor, memory: torch.Tensor | None, ctx: dict, replay: dict | None
    ) -> torch.Tensor:
        """``f(b)`` ``(batch, length, d_model)`` of half-step ``kind``; ``ctx`` holds ``attention_mask``
        and ``n_hashes``; ``memory`` is unused."""
        if kind == FEED_FORWARD:
            return self.feed_forward(b)
        return self.attend(b, ctx.get("attention_mask"), ctx.get("n_hashes"), replay)

    def step_params(self, kind: str) -> list[nn.Parameter]:
        """The parameters of half-step ``kind`` that require grad (for the feed-forward in the order of
        :meth:`FeedForward.vjp_in_chunks`)."""
        if kind == FEED_FORWARD:
            return [p for p in self.feed_forward.parameters() if p.requires_grad]
        return self.attention_params()

    def attention_params(self) -> list[nn.Parameter]:
        return [p for p in (*self.attn_norm.parameters(), *self.attention.parameters()) if p.requires_grad]


def _step(block: nn.Module, kind: str, b, memory, ctx: dict, replay: dict | None) -> torch.Tensor:
    return block.step(kind, b, memory, ctx, replay)


@functools.cache
def _compiled_step():
    """:func:`_step` through torch.compile: one compiled function for every block (their parameters are
    inputs, not constants). The feed-forward stays eager: its compiled backward was slower on CPU."""
    return torch.compile(_step)


class _ReversibleFunction(torch.autograd.Function):
    """Runs every half-step forward without storing activations; rebuilds them in backward. With
    ``compiled`` (the stack is inside a torch.compile'd model) the attention steps run compiled code.

    Block parameters and ``memory`` are explicit inputs and their gradients explicit outputs (no side
    effects on ``.grad``), so autograd hooks such as DistributedDataParallel's see them as usual.
    """

    @staticmethod
    def forward(ctx, a, b, memory, step_ctx, blocks, keep_rng, compiled, *params):
        records = []
        attend = _compiled_step() if compiled else _step
        with torch.no_grad():
            # Two buffers updated in place, step after step: few large allocations, so the CPU heap
            # does not fragment (its resident size would otherwise grow with depth).
            a, b = a.clone(), b.clone()
            stores = {kind: SortIndexStore(len(blocks)) for block in blocks for kind in block.steps}
            for block in blocks:
                for kind in block.steps:
                    rng = RngState(a.device) if keep_rng else None
                    replay: dict = {}
                    run = _step if kind == FEED_FORWARD else attend
                    a.add_(run(block, kind, b, memory, step_ctx, replay))
                    stores[kind].keep(replay)
                    a, b = b, a
                    records.append((block, kind, replay, rng))
        ctx.records, ctx.step_ctx, ctx.params, ctx.compiled = records, step_ctx, params, compiled
        ctx.autocast = AutocastState()
        ctx.save_for_backward(a, b, memory)
        return a, b

    @staticmethod
    @eager_under_compile  # autograd runs it inside a compiled caller's loss.backward()
    @once_differentiable
    def backward(ctx, grad_a, grad_b):
        a, b, memory = ctx.saved_tensors
        # Everything long-lived is allocated up front and updated in place: the activations and their
        # gradients (rebuilt step by step), one buffer for all parameter gradients and one for the
        # memory's. Long-lived allocations made between the large short-lived ones would fragment the
        # CPU heap, whose resident size would then grow with depth.
        on_cpu = a.device.type == "cpu"
        if on_cpu:
            release_free_heap()  # what the forward pass freed
        a, b, grad_a, grad_b = a.clone(), b.clone(), grad_a.clone(), grad_b.clone()
        flat = torch.zeros(sum(p.numel() for p in ctx.params), dtype=a.dtype, device=a.device)
        views = flat.split([p.numel() for p in ctx.params])
        grads = {p: g.view_as(p) for p, g in zip(ctx.params, views, strict=True)}
        grad_memory = torch.zeros_like(memory) if ctx.needs_input_grad[2] else None
        attend = _compiled_step() if ctx.compiled else _step
        layers_done = 0
        for block, kind, replay, rng in reversed(ctx.records):
            # The step's output is (p, q) = (b_in, a_in + f(b_in)): a holds p and b holds q.
            params = block.step_params(kind)
            if kind == FEED_FORWARD:  # chunk by chunk: one chunk's d_ff activations at a time
                with maybe_restored(rng), ctx.autocast.entered():
                    f_out, grad_p = block.feed_forward.vjp_in_chunks(a, grad_b, [grads[p] for p in params])
            else:
                p_leaf = a.detach().requires_grad_(True)
                reads_memory = grad_memory is not None and kind in block.memory_steps
                memory_in = memory.detach().requires_grad_(True) if reads_memory else memory
                inputs = [p_leaf, *params, *([memory_in] if reads_memory else [])]
                with torch.enable_grad(), maybe_restored(rng), ctx.autocast.entered():
                    f_out = attend(block, kind, p_leaf, memory_in, ctx.step_ctx, replay)
                grad_p, *rest = vjp(f_out, inputs, grad_b, allow_unused=True)
                for param, g in zip(params, rest, strict=False):
                    if g is not None:
                        grads[param].add_(g)
                if reads_memory and rest[-1] is not None:
                    grad_memory.add_(rest[-1])
                del rest, p_leaf, memory_in
            with torch.no_grad():
                b.sub_(f_out)  # now a_in
            grad_a.add_(grad_p)  # the gradient of p = b_in
            del f_out, grad_p
            # (a_in, b_in) with gradients (that of q, which a_in enters with identity; that of p).
            a, b, grad_a, grad_b = b, a, grad_b, grad_a
            if kind == block.steps[0]:
                layers_done += 1
                if on_cpu and layers_done % TRIM_EVERY_LAYERS == 0:
                    release_free_heap()
        param_grads = tuple(grads[p] if p.requires_grad else None for p in ctx.params)
        return (grad_a, grad_b, grad_memory, None, None, None, None, *param_grads)


_reversible_apply = eager_under_compile(_ReversibleFunction.apply)


class ReversibleSequence(nn.Module):
    """A stack of blocks run reversibly (or as plain residuals with ``reversible=False``): the encoder's
    :class:`ReformerBlock` or the decoder's :class:`~reformer.reversible_decoder.DecoderBlock` (any
    module with ``steps``, ``memory_steps``, ``step`` and ``step_params``).

    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape; ``memory``
    ``(batch, L_enc, d_memory)`` (decoder blocks) is the encoder output, ``memory_mask`` ``(batch, L_enc)``
    bool marks its real positions. ``attention_mask`` ``(batch, length)`` marks real positions (for the
    decoder also the cross-attention's queries); ``n_hashes`` overrides every LSH layer's rounds.
    """

    def __init__(self, blocks: list[nn.Module], reversible: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, x1, x2, attention_mask=None, n_hashes=None, memory=None, memory_mask=None):
        ctx = {"attention_mask": attention_mask, "n_hashes": n_hashes}
        if memory_mask is not None:
            ctx["memory_mask"] = memory_mask
        compiling = torch.compiler.is_compiling()
        inputs_grad = x1.requires_grad or x2.requires_grad or (memory is not None and memory.requires_grad)
        needs_grad = torch.is_grad_enabled() and (inputs_grad or self._any_grad())
        # Under torch.compile an eval-mode pass with gradients runs as plain residuals, traced whole (its
        # autograd graph keeps every layer's activations, as for reversible=False).
        if not self.reversible or not needs_grad or (compiling and not self.training):
            for block in self.blocks:
                for kind in block.steps:
                    x1, x2 = x2, x1 + block.step(kind, x2, memory, ctx, None)
            return x1, x2
        # In training, layers draw from the default generators (dropout, fresh hash rotations): the
        # recomputation must see the same draws and must leave the generators as it found them.
        keep_rng = self.training
        params = list(self.blocks.parameters())
        return _reversible_apply(x1, x2, memory, ctx, list(self.blocks), keep_rng, compiling, *params)

    def _any_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())
