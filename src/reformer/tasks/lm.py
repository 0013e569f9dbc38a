"""``lm``: next-byte prediction on a byte corpus (the default corpus, files, enwik8), with the ``tiny``
and ``enwik8`` presets. Bits per byte held out; ``reformer train`` ends with a sample."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..data import Corpus, contiguous_windows, decode_bytes, encode_text, load_corpus, random_windows
from .base import Batch, Preset, Task
from .settings import setting

DATA_HELP = "text/binary files or folders, or enwik8[.zip]"
DEFAULT_CORPUS = "the Python standard library sources of this machine"


# fmt: off
PRESETS = {
    # About 3 minutes on 2 CPU cores: the first run (make run) and the tests.
    # Not reversible: at 512 tokens memory is no constraint and the recomputing backward costs ~1.46x
    # the time. One sequence per step, a narrow feed-forward and a moderate learning rate learn the most
    # per second at this budget (docs/quality.md, "make run"); 32 held-out windows per evaluation.
    "tiny": Preset(
        "lm", "4 local/LSH layers, d_model 128, 512 tokens: ~3 minutes on 2 CPU cores",
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=256, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64, reversible=False),
        run=dict(seq_len=512, batch_size=1, steps=3400, lr=1.4e-3, warmup=100, schedule="cosine",
                 eval_every=850, eval_batches=32, save_every=850),
    ),
    # The paper's enwik8 model: 12 layers, d_model 1024, d_ff 4096, 8 heads, 64K tokens.
    "enwik8": Preset(
        "lm", "the paper's enwik8 model: 12 local/LSH layers, d_model 1024, 64K tokens",
        model=dict(d_model=1024, n_heads=8, n_layers=12, d_ff=4096, bucket_size=64, n_hashes=2,
                   attn_layers=("local", "lsh") * 6, local_chunk_size=128, dropout=0.1),
        run=dict(seq_len=65536, batch_size=1, steps=100000, lr=2e-4, warmup=2000, eval_every=1000,
                 save_every=500, eval_batches=2),
    ),
}
# fmt: on


@dataclass
class CorpusSettings:
    data: list[str] = setting(
        default_factory=list, help=DATA_HELP, metavar="PATH", path=True, unset=DEFAULT_CORPUS
    )


class LanguageModelTask(Task):
    """Next-byte prediction: random windows of ``seq_len + 1`` bytes; evaluation in bits per byte."""

    name = "lm"
    about = "next-byte prediction (the default)"
    Settings = CorpusSettings
    presets = PRESETS
    sequence_parallel = True
    loss_in_bits = True

    @cached_property
    def corpus(self) -> Corpus:
        return load_corpus(self.settings.data)

    def prepare(self) -> None:
        self.corpus  # noqa: B018  (read now, so that a missing file stops the run before the model is built)

    def describe(self) -> str:
        return self.corpus.describe()

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        return random_windows(getattr(self.corpus, split), self.cfg.seq_len, size, generator)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Mean next-byte loss in nats over the targets, and ``bits_per_byte``."""
        was_training = model.training
        model.eval()
        total_loss, total_count = 0.0, 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            count = self.target_count((inputs, targets))
            total_loss += float(model.loss(inputs, targets, n_hashes=n_hashes)) * count
            total_count += count
        model.train(was_training)
        loss = total_loss / max(total_count, 1)
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this corpus's test split")
        parser.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """Back-to-back windows over the test split (every byte after the first predicted once)."""
        corpus = load_corpus(options.data if options.data is not None else self.settings.data)
        size = self.eval_batch_size(options)
        return contiguous_windows(corpus.test, self.cfg.seq_len, size, options.max_tokens)

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        return ["sample:\n" + sample_text(model)]


SAMPLE_PROMPT = "def main():\n    "


def sample_text(model: nn.Module, prompt: str = SAMPLE_PROMPT, n: int = 200, seed: int = 0) -> str:
    """``n`` bytes after ``prompt``, sampled with ``generate``'s defaults (temperature 1.0, no top-k or
    top-p) from a generator seeded with ``seed``: what ``reformer generate RUN --prompt PROMPT
    --max-new-tokens n --seed seed`` prints."""
    device = next(model.parameters()).device
    ids = model.generate(
        encode_text(prompt)[None].to(device), max_new_tokens=n,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip
    return decode_bytes(ids[0].cpu())


TASKS = (LanguageModelTask,)
