"""The decoder layer of the encoder-decoder Reformer, as three half-steps of the reversible engine.

A layer is three reversible half-residual steps on the stream pair ``(a, b)``, each
``(a, b) -> (b, a + f(b))``: causal self-attention, cross-attention to the encoder output ``memory``,
feed-forward (each ``f`` norms its own input). From ``(x1, x2)`` a layer makes
``y1 = x1 + SelfAttn(x2)``, ``y2 = x2 + CrossAttn(y1, memory)``, ``z1 = y1 + FF(y2)`` and outputs
``(y2, z1)``: every sublayer reads the latest update, as in a sequential Transformer decoder.

:class:`~reformer.reversible.ReversibleSequence` runs a stack of these blocks exactly as it runs the
encoder's (recomputing backward, chunked feed-forward VJP, one flat gradient buffer); ``memory``'s
gradient is the sum of every cross-attention step's.
"""

from __future__ import annotations

import torch
from torch import nn

from .feedforward import FeedForward
from .reversible import FEED_FORWARD

STEPS = ("self", "cross", FEED_FORWARD)


class DecoderBlock(nn.Module):
    """One decoder layer: pre-LayerNorm causal self-attention, cross-attention and the feed-forward.

    Shapes: ``a, b`` ``(batch, L_dec, d_model)``, ``memory`` ``(batch, L_enc, d_memory)`` -> ``a, b``.
    """

    steps = STEPS
    memory_steps = ("cross",)

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
        self, kind: str, b: torch.Tensor, memory: torch.Tensor | None, ctx: dict, replay: dict | None
    ) -> torch.Tensor:
        """``f(b)`` ``(batch, L_dec, d_model)`` of half-step ``kind`` (one of :data:`STEPS`) for ``b``
        ``(batch, L_dec, d_model)``; ``ctx`` holds ``attention_mask`` (decoder padding, also the
        cross-attention's query mask), ``memory_mask``, ``n_hashes`` and (decoding) ``memory_kv``;
        ``replay`` records the LSH buckets of the first call and replays them in later ones."""
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
        """The parameters of half-step ``kind`` that require grad (for the feed-forward in the order of
        :meth:`FeedForward.vjp_in_chunks`)."""
        modules = {
            "self": (self.self_norm, self.self_attention),
            "cross": (self.cross_norm, self.cross_attention),
            FEED_FORWARD: (self.feed_forward,),
        }[kind]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def forward(self, a, b, memory, ctx: dict, replays: dict | None = None):
        for kind in STEPS:
            replay = {} if replays is None else replays.setdefault(kind, {})
            a, b = b, a + self.step(kind, b, memory, ctx, replay)
        return a, b
