"""``lm``: next-token prediction on a corpus of any data format (bytes: the default corpus, files,
enwik8; token files; text through a tokenizer; genomes; images), with the ``tiny``, ``enwik8``, ``dna``
and ``image`` presets. The held-out metric is the format's (bits per byte, token, base or dimension);
``reformer train`` ends with a sample."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import FORMATS, TOKEN_DTYPES, load_data, save_codec
from ..data.tokenizer import TOKENIZER_FILE
from .base import Batch, Preset, Task
from .settings import setting

DATA_HELP = (
    "files or folders: text/binary (bytes), enwik8[.zip], token ids (.npy, .bin), FASTA/FASTQ[.gz], "
    "PNG/JPEG (docs/data.md)"
)
DEFAULT_CORPUS = "the format's default: the Python standard library sources for bytes"
PROMPT_TOKENS = 32  # the held-out tokens that prompt the sample printed after training


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
    # Next-base prediction on E. coli K-12 (the [dna] extra), both strands; bits per base held out on
    # the genome's last 5%. Rotary local layers and position-free LSH layers, as the long-context tasks.
    "dna": Preset(
        "lm", "4 local/LSH layers, d_model 128, 2,048 bases of E. coli K-12: bits per base",
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=256, bucket_size=64, n_hashes=2,
                   attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=128, reversible=False,
                   position_embedding="rotary"),
        run=dict(seq_len=2048, batch_size=2, steps=2000, lr=1e-3, warmup=100, schedule="cosine",
                 eval_every=500, eval_batches=16, save_every=500),
        task_settings=dict(format="fasta"),
    ),
    # Pixel-by-pixel generation of 16 x 16 RGB crops of scikit-image's photographs (the [image] extra):
    # 768 sub-pixels after a start token, bits per dimension held out.
    "image": Preset(
        "lm", "4 local/LSH layers, d_model 128, 16x16x3 = 768 sub-pixels: bits per dimension",
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=256, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64, reversible=False),
        run=dict(seq_len=768, batch_size=2, steps=2000, lr=1e-3, warmup=100, schedule="cosine",
                 eval_every=500, eval_batches=8, save_every=500),
        task_settings=dict(format="images", image_size=16),
    ),
}
# fmt: on


@dataclass
class CorpusSettings:
    data: list[str] = setting(
        default_factory=list, help=DATA_HELP, metavar="PATH", path=True, unset=DEFAULT_CORPUS
    )
    format: str | None = setting(
        None, "how to read --data", choices=tuple(FORMATS), unset="from the files' names (bytes)"
    )
    valid: str | None = setting(
        None, "a held-out file or folder (then all of --data trains)", metavar="PATH", path=True,
        unset="5% of --data",
    )  # fmt: skip
    dtype: str | None = setting(None, "the ids' type in .bin token files", choices=tuple(TOKEN_DTYPES))
    vocab_size: int | None = setting(None, "token files: the vocabulary every id is checked against")
    tokenizer: str | None = setting(
        None, "a tokenizer folder or tokenizer.json (reformer tokenizer train): text through it, "
        "or the tokenizer of token files; bits per byte", metavar="PATH", path=True,
    )  # fmt: skip
    reverse_complement: float | None = setting(
        None, "FASTA: the chance a training window is read from the other strand", unset="0.5"
    )
    image_size: int | None = setting(None, "images: the side S of the S x S x 3 images", unset="32")

    def load(self, data: list[str] | None = None):
        """The corpus these settings name (``data``: other paths, read the same way)."""
        return load_data(
            data if data is not None else self.data, self.format, self.valid, dtype=self.dtype,
            vocab_size=self.vocab_size, tokenizer=self.tokenizer,
            reverse_complement=self.reverse_complement, size=self.image_size,
        )  # fmt: skip


class LanguageModelTask(Task):
    """Next-token prediction: random windows of ``seq_len + 1`` tokens of the corpus (whole images for
    images); evaluation in the corpus's metric, the loss in bits over its units (bytes of text for a
    tokenizer's runs, so byte and subword models compare)."""

    name = "lm"
    about = "next-token prediction on bytes, token files, tokenized text, genomes or images (the default)"
    Settings = CorpusSettings
    presets = PRESETS
    sequence_parallel = True
    loss_in_bits = True

    @cached_property
    def corpus(self):
        return self._load(None)

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    def prepare(self) -> None:
        self.corpus  # noqa: B018  (read now, so that a missing file stops the run before the model is built)

    def describe(self) -> str:
        return self.corpus.describe()

    def save_files(self, folder: Path) -> None:
        """The data format (and tokenizer) beside the model, for ``reformer generate``."""
        save_codec(self.corpus, folder)

    def load_model(self, folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        """The model of a run folder; a tokenizer's run then reads its data through the tokenizer kept
        in the folder, the one its ids were trained with, even if the tokenizer it named has since been
        retrained, moved or deleted."""
        kept = Path(folder) / TOKENIZER_FILE
        if self.settings.tokenizer is not None and kept.is_file():
            self.settings = dataclasses.replace(self.settings, tokenizer=str(kept))
            self.__dict__.pop("corpus", None)
        return super().load_model(folder, device)

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        return self.corpus.sample(split, size, self.cfg.seq_len, generator)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Mean next-token loss in nats over the counted targets, and the corpus's metric (``bits_per_byte``
        ...): the summed loss in bits over the units (bytes, tokens, bases, sub-pixels) the targets cover."""
        corpus = self.corpus
        was_training = model.training
        model.eval()
        total_loss, total_count, total_units = 0.0, 0, 0
        for inputs, targets in batches:
            count = self.target_count((inputs, targets))
            total_units += corpus.units(targets)
            inputs, targets = inputs.to(device), targets.to(device)
            total_loss += float(model.loss(inputs, targets, n_hashes=n_hashes)) * count
            total_count += count
        model.train(was_training)
        loss = total_loss / max(total_count, 1)
        return {"loss": loss, corpus.metric: total_loss / max(total_units, 1) / math.log(2)}

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this corpus's test split")
        parser.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """Back-to-back windows over the test split (every token after the first predicted once; every
        held-out image once), of ``--data`` when given, read like the run's data."""
        corpus = self.corpus if options.data is None else self._load(options.data)
        if options.data is not None:
            self.__dict__["corpus"] = corpus  # its units count the metric in evaluate
        size = self.eval_batch_size(options)
        return corpus.sequential("test", self.cfg.seq_len, size, options.max_tokens)

    def _load(self, data: list[str] | None):
        """The corpus of the run's data settings (``data``: other paths, split on their own: the run's
        ``--valid`` file is not theirs); a missing extra is a ``ValueError`` too, so every command
        reports it as bad input."""
        if data is None:
            settings = self.settings
        else:
            settings = dataclasses.replace(self.settings, valid=None)
            data = [str(Path(p).resolve()) for p in data]
        try:
            return settings.load(data)
        except ImportError as err:
            raise ValueError(str(err)) from err

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        if self.corpus.codec == "images":
            return []  # reformer generate RUN --images N writes samples
        return ["sample:\n" + sample_text(model, self.corpus)]


def sample_text(model: nn.Module, corpus, n: int = 200, seed: int = 0) -> str:
    """Up to ``n`` tokens sampled with ``generate``'s defaults (temperature 1.0, no top-k or top-p) from a
    generator seeded with ``seed``, after the first ``PROMPT_TOKENS`` held-out tokens of ``corpus`` (fewer
    for short models: all fit in ``max_seq_len``), as text: the prompt, ``|``, the continuation. For a
    byte corpus this is what ``reformer generate RUN --prompt PROMPT --max-new-tokens n --seed seed``
    prints."""
    device = next(model.parameters()).device
    room = model.config.max_seq_len
    prompt = torch.from_numpy(np.asarray(corpus.test[: min(PROMPT_TOKENS, room // 4)]).astype(np.int64))
    n = min(n, room - len(prompt))
    ids = model.generate(
        prompt[None].to(device), max_new_tokens=n,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip
    return corpus.decode(prompt) + "|" + corpus.decode(ids[0, len(prompt) :].cpu())


TASKS = (LanguageModelTask,)
