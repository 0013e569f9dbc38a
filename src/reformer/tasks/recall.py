"""``recall``: multi-query associative recall (MQAR) as Zoology defines it (Arora et al., *Zoology*, 2023).

A sequence of ``length`` tokens over a vocabulary of ``vocab_size`` ids: first ``n_pairs`` key-value pairs
``k1 v1 k2 v2 ...`` (keys drawn without replacement from ``1 .. vocab/2 - 1``, values from
``vocab/2 .. vocab - 1``), then every key once more at an even offset ``2 g`` after the pairs, the gaps
``g`` drawn without replacement from ``p(g) ~ power_a * g ** (power_a - 1)`` (small gaps likelier), and
random tokens everywhere else. The token after each queried key must be its value; only those positions
are scored.

One difference from Zoology's generator: its filler may repeat a key (it asks for ``vocab_size >
length``, which makes that rare), and here the filler never holds one of the example's keys, so each key
occurs in its pair and its query only at any length and vocabulary.

Accuracy is the share of queried values predicted right; ``reformer eval`` shows it by length and number
of pairs (and ``accuracy_by_gap``: by the distance from the pairs to the query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import IGNORE_INDEX
from .base import Batch, Preset
from .retrieval import RetrievalSettings, RetrievalTask
from .settings import setting


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


# fmt: off
PRESETS = {
    "recall": Preset(
        "recall",
        "multi-query associative recall: 2 LSH layers with token shift and no positions, trained on 64-4K "
        "tokens", tasks=("recall",),
        model=dict(d_model=128, n_heads=4, n_layers=2, d_ff=256, attn_layers=("lsh", "lsh"),
                   bucket_size=64, n_hashes=4, lsh_key_rule="chunks", position_embedding="none",
                   token_shift=True, reversible=False, max_seq_len=1 << 20),
        run=dict(seq_len=4096, batch_size=1, steps=3000, lr=1e-3, warmup=100, schedule="cosine",
                 eval_every=250, eval_batches=4, save_every=250, keep_best=True),
        task_settings=dict(min_len=64, curriculum_start=128, lm_weight=0.0, eval_lengths=(1024, 4096)),
    ),
}
# fmt: on


@dataclass
class RecallSettings(RetrievalSettings):
    vocab: int = setting(8192, "token ids: keys below vocab/2, values from vocab/2 (Zoology: 8192)")
    min_pairs: int = setting(4, "fewest key-value pairs of a training example")
    max_pairs: int = setting(64, "most key-value pairs of a training example (at most length / 4)")
    power_a: float = setting(0.01, "the query gaps' power law p(g) ~ g ** (power_a - 1)")


class RecallTask(RetrievalTask):
    """MQAR: accuracy is the share of queried values predicted right."""

    name = "recall"
    about = "multi-query associative recall, Zoology's MQAR (long-context retrieval; docs/long_context.md)"
    Settings = RecallSettings
    presets = PRESETS
    default_preset = "recall"
    grid_name = "pair"
    grid_values = (16.0, 64.0, 256.0)
    exact_match = False

    @property
    def vocab_size(self) -> int:  # the model's vocabulary is the task's
        return self.settings.vocab

    def validate(self) -> None:
        super().validate()
        s = self.settings
        if not 1 <= s.min_pairs <= s.max_pairs:
            raise ValueError(
                f"--min-pairs {s.min_pairs} and --max-pairs {s.max_pairs} must satisfy 1 <= min <= max"
            )
        check_recall_settings(max(s.min_len, 4 * s.min_pairs), s.min_pairs, s.vocab, s.power_a)
        check_recall_settings(self.cfg.seq_len, min(s.max_pairs, self.cfg.seq_len // 4), s.vocab, s.power_a)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.gap_hits: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def record(self, targets: torch.Tensor, hits: torch.Tensor) -> None:
        if self.gap_hits is None:
            return
        for row_targets, row_hits in zip(targets, hits, strict=True):
            scored = row_targets != IGNORE_INDEX
            pairs = int(scored.sum())
            self.gap_hits.append((query_gaps(row_targets, pairs), row_hits[scored]))

    def evaluate_test(self, model, options, device, n_hashes=None) -> dict[str, float]:
        """The grid of :class:`RetrievalTask`, and ``accuracy_gap@A-B``: the accuracy of the queries
        ``A <= gap < B`` tokens after the pairs, over every example of the grid (gaps in powers of 4)."""
        self.gap_hits = []
        try:
            metrics = super().evaluate_test(model, options, device, n_hashes)
            gaps = torch.cat([g for g, _ in self.gap_hits])
            hits = torch.cat([h for _, h in self.gap_hits])
        finally:
            self.gap_hits = None
        lo = 1
        while lo <= int(gaps.max()):
            inside = (gaps >= lo) & (gaps < 4 * lo)
            if bool(inside.any()):
                metrics[f"accuracy_gap@{lo}-{4 * lo}"] = float(hits[inside].float().mean())
            lo *= 4
        return metrics

    def eval_lines(self, metrics: dict) -> list[str]:
        lines = super().eval_lines(metrics)
        by_gap = [f"{k.split('@')[1]}:{v:.2f}" for k, v in metrics.items() if k.startswith("accuracy_gap@")]
        return (
            lines[:-1]
            + (["by gap (tokens after the pairs): " + " ".join(by_gap)] if by_gap else [])
            + lines[-1:]
        )

    def example(self, length: int, value: float, generator: torch.Generator, split: str) -> Batch:
        return recall_example(length, int(value), self.settings.vocab, generator, self.settings.power_a)

    def train_grid_value(self, length: int, generator: torch.Generator) -> float:
        most = max(1, min(self.settings.max_pairs, length // 4))
        fewest = min(self.settings.min_pairs, most)
        return float(torch.randint(fewest, most + 1, (), generator=generator))


TASKS = (RecallTask,)
