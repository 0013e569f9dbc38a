"""Generation from prompts: token by token (:func:`stream`) or all at once (:func:`generate`), cached or
recomputing the context, with per-row prompt lengths."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .decoding import decode_step, prefill, run_settings
from .sampling import apply_repetition_penalty, check_sampling, sample_next
from .stopping import Stopping


def _compact(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front: ``(ids, lengths)``; padding anywhere is dropped."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return input_ids.long(), torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(input_ids.device).bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token (1)")
    order = torch.sort((~mask).long(), dim=1, stable=True).indices
    return input_ids.long().gather(1, order), lengths


@torch.no_grad()
def stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    n_hashes: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    n_buckets: int | tuple[int, ...] | None = None,
    hf_compatible: bool = False,
    on_cache=None,
    eos_token_id: int | list[int] | None = None,
    stop: list[list[int]] | None = None,
    pad_token_id: int | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[torch.Tensor]:
    """Yield the next ids ``(batch,)`` one step at a time (see :func:`generate`); the model is in eval
    mode while the iterator runs. ``on_cache(cache)`` is called once the prompt's cache exists.

    Stops after ``max_new_tokens`` ids, or earlier once every row has finished: a row finishes with an id
    of ``eos_token_id`` or when its new ids end with one of ``stop`` (lists of ids); afterwards it yields
    ``pad_token_id`` (default: the first ``eos_token_id``, else 0). ``repetition_penalty`` (HF's, 1.0 =
    none) scales the logits of every id already in the row (prompt included) before sampling.

    Example, printing bytes as they come::

        for next_ids in stream(model, ids, 200, eos_token_id=10):   # stop after a newline
            print(chr(int(next_ids[0])), end="", flush=True)
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes, repetition_penalty)
    if not model.config.causal:
        raise ValueError("generation needs a causal model (config.causal=True)")
    window = slice(-model.config.max_seq_len, None)  # longer prompts are checked by their last window
    model._check_inputs(input_ids[:, window], None if attention_mask is None else attention_mask[:, window])
    if max_new_tokens == 0:
        return
    cfg = model.config
    ids, lengths = _compact(input_ids, attention_mask)
    stopping = Stopping(ids.shape[0], cfg.vocab_size, ids.device, eos_token_id, stop, pad_token_id)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(ids.shape[0], cfg.vocab_size, dtype=torch.bool, device=ids.device)
        real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        seen[rows[real], ids[real]] = True

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        next_ids = stopping.update(sample_next(logits, temperature, top_k, top_p, generator))
        if seen is not None:
            seen[torch.arange(len(next_ids), device=next_ids.device), next_ids] = True
        return next_ids

    total = int(lengths.max()) + max_new_tokens
    if use_cache and total > cfg.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens = {total} exceeds max_seq_len={cfg.max_seq_len}; the cache cannot "
            "slide a window: use use_cache=False, a shorter prompt or fewer new tokens"
        )
    if use_cache and cfg.local_chunks_after and "local" in cfg.attn_layers:
        raise ValueError(
            "cached decoding needs local_chunks_after=0 (a causal model's setting); use use_cache=False"
        )
    was_training = model.training
    model.eval()
    try:
        settings = run_settings(model, min(total, cfg.max_seq_len), n_hashes, n_buckets, hf_compatible)
        if use_cache:
            logits, cache = prefill(model, ids, lengths, settings, capacity=total)
            if on_cache is not None:
                on_cache(cache)
            for step in range(max_new_tokens):
                next_ids = choose(logits)
                yield next_ids
                if stopping.all_finished:
                    return
                if step + 1 < max_new_tokens:
                    logits = decode_step(model, cache, next_ids)
            return
        tokens = torch.cat([ids, ids.new_zeros(ids.shape[0], max_new_tokens)], dim=1)
        for _ in range(max_new_tokens):
            start = (lengths - cfg.max_seq_len).clamp(min=0)  # slide a window past max_seq_len
            width = int((lengths - start).max())
            window = tokens.gather(
                1, (start[:, None] + torch.arange(width, device=ids.device)).clamp(max=tokens.shape[1] - 1)
            )
            logits, _ = prefill(model, window, lengths - start, settings, keep_cache=False)
            next_ids = choose(logits)
            yield next_ids
            if stopping.all_finished:
                return
            tokens.scatter_(1, lengths[:, None], next_ids[:, None])
            lengths = lengths + 1
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 100, **options) -> torch.Tensor:
    """``input_ids`` ``(batch, length)`` followed by the sampled ids: ``(batch, length + n)`` in
    ``input_ids``'s dtype, ``n = max_new_tokens`` unless every row finished earlier (``eos_token_id``,
    ``stop``). ``options`` are :func:`stream`'s; see
    :meth:`~reformer.generation.mixin.GenerationMixin.generate`."""
    new = list(stream(model, input_ids, max_new_tokens, **options))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
