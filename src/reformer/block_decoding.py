"""Decoding through the layers' own blocks: the prefill and step counterparts of
:meth:`ReformerBlock.forward <reformer.reversible.ReformerBlock.forward>` and of
:class:`~reformer.reversible_decoder.DecoderBlock`'s three half-steps.

Each function runs the block's own norms, attention (``prefill`` / ``step`` of its attention kind, see
:mod:`reformer.attention.decode`) and feed-forward in eval semantics. A decode step only runs forward,
so reversible and plain stacks decode alike. What a block reads: ``attn_norm``, ``attention`` and
``feed_forward`` (a :class:`~reformer.reversible.ReformerBlock`); ``self_norm``, ``self_attention``,
``cross_norm``, ``cross_attention`` and ``feed_forward`` (a decoder block).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention.decode import Prompt


def prefill_block(
    block: nn.Module, x1: torch.Tensor, x2: torch.Tensor, prompt: Prompt, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The block's forward over the streams ``x1, x2`` ``(batch, length, d_model)`` of a prompt batch:
    ``y1 = x1 + attention(attn_norm(x2))``, ``y2 = x2 + feed_forward(y1)``, and its attention's cache."""
    out, cache = block.attention.prefill(block.attn_norm(x2), prompt, state)
    y1 = x1 + out
    return y1, x2 + block.feed_forward(y1), cache


def step_block(
    block: nn.Module,
    cache: object,
    x1: torch.Tensor,
    x2: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One new position per row through the block: ``x1, x2`` ``(batch, 1, d_model)`` at position
    ``lengths[b]`` (``(batch,)`` int64, ``max_length == int(lengths.max())``) -> ``y1, y2`` and the cache."""
    out, cache = block.attention.step(cache, block.attn_norm(x2), lengths, max_length)
    y1 = x1 + out
    return y1, x2 + block.feed_forward(y1), cache


def prefill_decoder_block(
    block: nn.Module, memory_cache: object, a: torch.Tensor, b: torch.Tensor, prompt: Prompt
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """A decoder block's three half-steps ``(a, b) -> (b, a + f(b))`` over the decoder positions ``a, b``
    ``(batch, length, d_model)`` of a prompt batch: causal self-attention (``prefill``), cross-attention
    over ``memory_cache`` (the layer's ``prefill_memory`` of the encoder output), feed-forward. Returns
    the new ``a, b`` and the self-attention cache."""
    out, self_cache = block.self_attention.prefill(block.self_norm(b), prompt)
    a, b = _cross_and_feed_forward(block, memory_cache, b, a + out)
    return a, b, self_cache


def step_decoder_block(
    block: nn.Module,
    self_cache: object,
    memory_cache: object,
    a: torch.Tensor,
    b: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One new decoder position per row, ``a, b`` ``(batch, 1, d_model)`` at position ``lengths[b]``,
    through :func:`prefill_decoder_block`'s half-steps with the self-attention's ``step`` over
    ``self_cache``. Returns the new ``a, b`` and the self-attention cache."""
    out, self_cache = block.self_attention.step(self_cache, block.self_norm(b), lengths, max_length)
    a, b = _cross_and_feed_forward(block, memory_cache, b, a + out)
    return a, b, self_cache


def _cross_and_feed_forward(block: nn.Module, memory_cache: object, a: torch.Tensor, b: torch.Tensor):
    """The decoder block's last two half-steps: cross-attention over the memory, then feed-forward."""
    a, b = b, a + block.cross_attention.step(memory_cache, block.cross_norm(b))
    return b, a + block.feed_forward(b)
