"""Multi-query associative recall (MQAR) data, as Zoology defines it (Arora et al., *Zoology*, 2023).

A sequence of ``length`` tokens over a vocabulary of ``vocab_size`` ids: first ``n_pairs`` key-value pairs
``k1 v1 k2 v2 ...`` (keys drawn without replacement from ``1 .. vocab/2 - 1``, values from
``vocab/2 .. vocab - 1``), then every key once more at an even offset ``2 g`` after the pairs, the gaps
``g`` drawn without replacement from ``p(g) ~ power_a * g ** (power_a - 1)`` (small gaps likelier), and
random tokens everywhere else. The token after each queried key must be its value; only those positions
are scored.

One difference from Zoology's generator: its filler may repeat a key (it asks for ``vocab_size >
length``, which makes that rare), and here the filler never holds one of the example's keys, so each key
occurs in its pair and its query only at any length and vocabulary.
"""

from __future__ import annotations

import torch

from ..data import IGNORE_INDEX


def recall_example(
    length: int, n_pairs: int, vocab_size: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, both ``(length,)`` int64; ``targets`` is ``IGNORE_INDEX`` except at the
    queried keys, where it is the key's value."""
    check_recall_settings(length, n_pairs, vocab_size, power_a)
    half = vocab_size // 2
    keys = torch.randperm(half - 1, generator=generator)[:n_pairs] + 1
    values = torch.randperm(vocab_size - half, generator=generator)[:n_pairs] + half
    context = 2 * n_pairs
    space = (length - context) // 2
    g = torch.arange(1, space + 1, dtype=torch.float64)
    weights = power_a * g ** (power_a - 1)
    gaps = torch.multinomial(weights / weights.sum(), n_pairs, replacement=False, generator=generator)
    sequence = torch.zeros(length + 1, dtype=torch.long)
    sequence[0:context:2], sequence[1:context:2] = keys, values
    sequence[context + 2 * gaps] = keys
    labels = torch.full((length + 1,), IGNORE_INDEX, dtype=torch.long)
    labels[context + 2 * gaps + 1] = values
    inputs, targets = sequence[:-1].clone(), labels[1:].clone()
    is_filler = inputs == 0
    inputs[is_filler] = _filler(int(is_filler.sum()), vocab_size, keys, generator)
    return inputs, targets


def _filler(n: int, vocab_size: int, keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ids in ``1 .. vocab_size - 1`` none of which is in ``keys``."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[0] = False
    allowed[keys] = False
    choices = allowed.nonzero().squeeze(1)
    return choices[torch.randint(0, len(choices), (n,), generator=generator)]


def check_recall_settings(length: int, n_pairs: int, vocab_size: int, power_a: float) -> None:
    """Raise ``ValueError`` naming the setting and the fix for an impossible recall example."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs={n_pairs} must be at least 1")
    if 4 * n_pairs > length:
        raise ValueError(
            f"{n_pairs} pairs need at least {4 * n_pairs} tokens (the pairs, then room for every query); "
            f"got length={length}: lower the pairs or lengthen the sequence"
        )
    if vocab_size // 2 - 1 < n_pairs or vocab_size - vocab_size // 2 < n_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} holds {vocab_size // 2 - 1} keys; {n_pairs} pairs need a vocabulary "
            f"of at least {2 * n_pairs + 2}"
        )
    if not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a={power_a} must lie in (0, 1] (Zoology uses 0.01)")


def query_gaps(targets: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """The distance in tokens from each scored position ``(n,)`` back to the end of the pairs, for
    accuracy by gap: ``targets`` ``(length,)`` as made by :func:`recall_example`."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1) - 2 * n_pairs + 1
