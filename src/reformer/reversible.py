"""Reversible residual layers (Reformer paper, section 3; Gomez et al. 2017).

``y1 = x1 + Attention(LayerNorm(x2))``, ``y2 = x2 + FeedForward(y1)``. The backward pass rebuilds each
layer's inputs from its outputs (``x2 = y2 - FeedForward(y1)``, ``x1 = y1 - Attention(LayerNorm(x2))``),
so only the last layer's output is kept and activation memory does not grow with depth. Dropout masks
are replayed by restoring the default generators' state, hash buckets through the attention's
``replay`` record.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .feedforward import FeedForward


class ReformerBlock(nn.Module):
    """One layer: pre-LayerNorm attention ``f`` and feed-forward ``g`` (which norms its own input).

    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape.
    """

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

    def attention_params(self) -> list[nn.Parameter]:
        return [p for p in (*self.attn_norm.parameters(), *self.attention.parameters()) if p.requires_grad]


class _RngState:
    """The default CPU generator's state and, for CUDA inputs, that device's generator state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _ReversibleFunction(torch.autograd.Function):
    """Runs every block forward without storing activations; rebuilds them in backward.

    Block parameters are explicit inputs and their gradients explicit outputs (no side effects on
    ``.grad``), so autograd hooks such as DistributedDataParallel's see them as usual.
    """

    @staticmethod
    def forward(ctx, x1, x2, attention_mask, n_hashes, blocks, keep_rng, *params):
        replays, rng_states = [], []
        with torch.no_grad():
            for block in blocks:
                replay: dict = {}
                rng_f = _RngState(x1.device) if keep_rng else None
                x1 = x1 + block.attend(x2, attention_mask, n_hashes, replay)
                rng_g = _RngState(x1.device) if keep_rng else None
                x2 = x2 + block.feed_forward(x1)
                replays.append(replay)
                rng_states.append((rng_f, rng_g))
        ctx.blocks, ctx.replays, ctx.rng_states = blocks, replays, rng_states
        ctx.attention_mask, ctx.n_hashes = attention_mask, n_hashes
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        y1, y2 = ctx.saved_tensors
        params = [p for block in ctx.blocks for p in block.parameters()]
        # All parameter gradients live in one buffer allocated before any temporary: long-lived
        # allocations made between the large short-lived ones would fragment the CPU heap, and its
        # resident size would then grow with depth.
        flat = torch.zeros(sum(p.numel() for p in params), dtype=y1.dtype, device=y1.device)
        grads = dict(
            zip(
                params,
                (g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params, strict=True)),
                strict=True,
            )
        )
        for block, replay, (rng_f, rng_g) in zip(
            reversed(ctx.blocks), reversed(ctx.replays), reversed(ctx.rng_states), strict=True
        ):
            # x2 = y2 - g(y1); grad of y1 picks up the feed-forward's contribution.
            ff_params = [p for p in block.feed_forward.parameters() if p.requires_grad]
            with _maybe_restored(rng_g):
                g_out, grad_from_g = block.feed_forward.vjp_in_chunks(
                    y1, grad_y2, [grads[p] for p in ff_params]
                )
            x2 = y2 - g_out
            grad_y1 = grad_y1 + grad_from_g
            del g_out, grad_from_g
            # x1 = y1 - f(x2); f replays the forward's buckets through its replay record.
            x2_leaf = x2.detach().requires_grad_(True)
            attn_params = block.attention_params()
            with torch.enable_grad(), _maybe_restored(rng_f):
                f_out = block.attend(x2_leaf, ctx.attention_mask, ctx.n_hashes, replay)
            grad_x2_from_f, *attn_grads = torch.autograd.grad(f_out, [x2_leaf, *attn_params], grad_y1)
            for p, g in zip(attn_params, attn_grads, strict=True):
                grads[p].add_(g)
            del attn_grads
            with torch.no_grad():
                x1 = y1 - f_out
            del f_out
            y1, y2 = x1, x2
            grad_y2 = grad_y2 + grad_x2_from_f
            # grad_y1 (now the gradient of x1) is unchanged: x1 enters y1 with identity.
        param_grads = tuple(grads[p] if p.requires_grad else None for p in params)
        return (grad_y1, grad_y2, None, None, None, None, *param_grads)


@contextmanager
def _maybe_restored(state: _RngState | None):
    if state is None:
        yield
    else:
        with state.restored():
            yield


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReformerBlock` run reversibly (or as plain residuals with ``reversible=False``).

    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape.
    """

    def __init__(self, blocks: list[ReformerBlock], reversible: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, x1, x2, attention_mask=None, n_hashes=None):
        if not self.reversible or not torch.is_grad_enabled() or not (x1.requires_grad or self._any_grad()):
            for block in self.blocks:
                x1, x2 = block(x1, x2, attention_mask, n_hashes)
            return x1, x2
        keep_rng = self.training and any(
            isinstance(m, nn.Dropout) and m.p > 0 or getattr(m, "attn_dropout", 0.0) > 0
            for m in self.modules()
        )
        params = [p for block in self.blocks for p in block.parameters()]
        return _ReversibleFunction.apply(
            x1, x2, attention_mask, n_hashes, list(self.blocks), keep_rng, *params
        )

    def _any_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())
