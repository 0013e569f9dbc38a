"""Decoding with an encoder-decoder Reformer: the encoder runs once, every decoder layer keeps the
projected keys and values of the encoder output, and (for exact self-attention) of its own past.

With ``use_cache`` and a decoder whose self-attention layers are all ``"full"``, each new token runs
through the decoder alone: its self-attention reads the layer's key/value cache, its cross-attention
the layer's precomputed encoder keys/values. With exact cross-attention that is exactly the uncached
recomputation (the decoder is causal, and a query's output does not depend on the other queries).
LSH cross-attention layers keep each round's key order and sorted buckets, and a new query attends by
the rule of :mod:`reformer.attention.lsh_cross` for a query chunk holding only itself; recomputation
groups the queries into chunks, so the two can differ. Decoders with LSH or local self-attention decode
by recomputing the decoder over the prefix at each step (the encoder still runs once).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.decode import Prompt
from ..block_decoding import prefill_decoder_block, step_decoder_block
from ..embeddings import position_ids
from .sampling import check_sampling, sample_next


def can_cache(model: nn.Module) -> bool:
    """Whether the step-by-step cached path applies (exact self-attention in every decoder layer)."""
    return all(kind == "full" for kind in model.config.decoder.attn_layers)


class _DecoderCache:
    """Per decoder layer: its cross-attention's ``prefill_memory`` of the encoder output, and its
    self-attention's cache of the decoder positions so far (None before the first position)."""

    def __init__(self, model: nn.Module, memory, memory_mask, n_hashes=None) -> None:
        blocks = model.decoder.blocks
        self.memory = [
            block.cross_attention.prefill_memory(memory, memory_mask, n_hashes) for block in blocks
        ]
        self.layers: list = [None] * len(blocks)
        self.length = 0  # decoder positions kept


def _cached_step(model, cache: _DecoderCache, ids: torch.Tensor, position: int, memory_mask) -> torch.Tensor:
    """Logits ``(batch, vocab)`` of the newest decoder input ``ids`` ``(batch, 1)`` at ``position``
    (``memory_mask`` is the cache's; kept for the call's shape)."""
    x = model.embeddings(ids, torch.tensor([position], device=ids.device))
    a, b = x, x
    kept = cache.length
    lengths = torch.full((ids.shape[0],), kept, dtype=torch.long, device=ids.device)
    for i, block in enumerate(model.decoder.blocks):
        if kept == 0:
            prompt = Prompt(lengths + 1, None)
            a, b, cache.layers[i] = prefill_decoder_block(block, cache.memory[i], a, b, prompt)
        else:
            layer, memory = cache.layers[i], cache.memory[i]
            a, b, cache.layers[i] = step_decoder_block(block, layer, memory, a, b, lengths, kept)
    cache.length = kept + 1
    return model.lm_head(model.final_norm(torch.cat([a, b], -1)))[:, -1]


@torch.no_grad()
def generate(
    model: nn.Module,
    source_ids: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    n_hashes: int | None = None,
    source_offset: int = 0,
    target_offset: int = 0,
) -> torch.Tensor:
    """Targets ``(batch, n)`` int64 decoded for ``source_ids`` ``(batch, L_enc)``: sampled at
    ``temperature`` (default 1.0, as every generate path; 0 is greedy), cut by ``top_k`` / ``top_p``.

    ``max_new_tokens`` defaults to the decoder's ``max_seq_len``. With the config's ``eos_id`` set,
    decoding stops once every row has produced it (rows that finished early repeat ``eos_id``).
    ``n_hashes`` sets the LSH rounds of the encoder, decoder and cross-attention. ``source_offset`` /
    ``target_offset``: the first source / decoder position (see :class:`ReformerEncoderDecoder`); the
    decoder's positions ``target_offset ..`` must fit its ``max_seq_len``.
    """
    position_ids(0, target_offset, model.config.decoder.max_seq_len)  # a non-negative integer that fits
    limit = model.config.decoder.max_seq_len - target_offset
    max_new_tokens = limit if max_new_tokens is None else max_new_tokens
    check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes)
    if max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder's max_seq_len={limit + target_offset} "
            f"less target_offset={target_offset}"
        )
    was_training = model.training
    model.eval()
    try:
        memory, memory_mask = model.encode(source_ids, source_mask, n_hashes, source_offset)
        batch, device = source_ids.shape[0], source_ids.device
        inputs = torch.full((batch, 1), model.config.decoder_start_id, dtype=torch.long, device=device)
        cache = (
            _DecoderCache(model, memory, memory_mask, n_hashes) if use_cache and can_cache(model) else None
        )
        eos, done = model.config.eos_id, torch.zeros(batch, dtype=torch.bool, device=device)
        out = []
        for t in range(max_new_tokens):
            if cache is not None:
                logits = _cached_step(model, cache, inputs[:, -1:], target_offset + t, memory_mask)
            else:
                hidden = model.decode(memory, memory_mask, inputs, None, n_hashes, target_offset)
                logits = model.lm_head(hidden[:, -1])
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                next_ids = next_ids.masked_fill(done, eos)
                done |= next_ids == eos
            out.append(next_ids)
            inputs = torch.cat([inputs, next_ids[:, None]], 1)
            if eos is not None and bool(done.all()):
                break
        return torch.stack(out, 1) if out else inputs[:, :0]
    finally:
        model.train(was_training)
