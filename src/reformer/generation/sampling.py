"""Choosing the next token from logits: greedy, temperature, top-k and nucleus sampling, and the
repetition penalty."""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids ``(batch,)`` int64 from ``logits`` ``(batch, vocab)``.

    ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``, cut to the
    ``top_k`` largest and then to the smallest set whose probability reaches ``top_p`` (nucleus
    sampling; the most likely token always stays), and one id is drawn per row from ``generator``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop = before >= top_p
        logits = logits.scatter(-1, sorted_ids, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al. 2019) as HF's ``repetition_penalty``: for every id
    already in the row (``seen`` ``(batch, vocab)`` bool), a positive logit is divided by ``penalty``
    and a negative one multiplied by it; other ids keep theirs. ``penalty`` 1.0 changes nothing, above
    1 discourages repeats. ``logits`` ``(batch, vocab)``; returns float32 logits of the same shape."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes, repetition_penalty=1.0) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] or be None")
    if n_hashes is not None and (not isinstance(n_hashes, int) or n_hashes < 1):
        raise ValueError(f"n_hashes={n_hashes!r} must be a positive integer or None")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be > 0 (1.0: no penalty)")
