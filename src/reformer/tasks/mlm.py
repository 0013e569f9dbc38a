"""``mlm``: masked-LM pretraining of a bidirectional encoder on a byte corpus, with BERT's masking on
bytes (Devlin et al. 2019, section 3.1).

In each row 15% of the positions (rounded, at least one) are chosen; a chosen position's input becomes
the reserved ``MASK_ID`` 80% of the time, a random byte 10% of the time and stays as it is 10% of the
time, and its label is the original byte. Unchosen positions get the label ``IGNORE_INDEX``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from functools import cached_property

import torch
from torch import nn

from ..data import IGNORE_INDEX, Corpus, contiguous_windows, load_corpus, random_windows
from ..models import ReformerForMaskedLM
from .base import Batch, Task
from .encoder import EncoderObjective, split_padding
from .lm import CorpusSettings

N_BYTES = 256
MASK_ID = 256  # reserved after the 256 byte values
MLM_VOCAB = 257
MASK_FRACTION = 0.15
MASK_SHARES = (0.8, 0.1, 0.1)  # [MASK], random byte, unchanged
TEST_SEED = 4242  # the masking of `reformer eval` on an MLM run


def mask_tokens(
    ids: torch.Tensor, generator: torch.Generator, fraction: float = MASK_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and labels for ``ids`` ``(batch, length)`` int64 byte ids (0-255).

    Returns ``(inputs, labels)``, both ``(batch, length)`` int64: exactly ``max(1, round(fraction *
    length))`` chosen positions per row, labelled with the original ids; the rest labelled
    ``IGNORE_INDEX``. Draws from ``generator`` only (reproducible, resumable).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (batch, length), got shape {tuple(ids.shape)}")
    batch, length = ids.shape
    n_chosen = max(1, round(fraction * length))
    scores = torch.rand(batch, length, generator=generator)
    chosen = torch.zeros(batch, length, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(n_chosen, dim=1).indices, True)
    action = torch.rand(batch, length, generator=generator)
    random_bytes = torch.randint(0, N_BYTES, (batch, length), generator=generator)
    inputs = ids.clone()
    to_mask = chosen & (action < MASK_SHARES[0])
    to_random = chosen & (action >= MASK_SHARES[0]) & (action < MASK_SHARES[0] + MASK_SHARES[1])
    inputs[to_mask] = MASK_ID
    inputs[to_random] = random_bytes[to_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


class MaskedLMTask(Task):
    """Masked-LM pretraining: random windows, masked; evaluation in bits per masked byte."""

    name = "mlm"
    about = "masked-LM pretraining of an encoder (docs/encoders.md)"
    Settings = CorpusSettings
    model_class = ReformerForMaskedLM
    vocab_size = MLM_VOCAB
    causal = False

    def validate(self) -> None:
        """Masked LM reads bytes: the options of the other data formats would be ignored, so they are
        refused."""
        super().validate()
        s = self.settings
        given = {
            "--format": s.format not in (None, "bytes") and s.format, "--tokenizer": s.tokenizer,
            "--dtype": s.dtype, "--vocab-size": s.vocab_size, "--reverse-complement": s.reverse_complement,
            "--image-size": s.image_size,
        }  # fmt: skip
        for flag, value in given.items():
            if value not in (None, False):
                raise ValueError(
                    f"{flag} {value}: --task mlm pretrains on bytes (UTF-8 text, any file); drop {flag}, or "
                    "train a next-token model on that format with --task lm"
                )

    @cached_property
    def corpus(self) -> Corpus:
        return load_corpus(self.settings.data, self.settings.valid)

    def prepare(self) -> None:
        self.corpus  # noqa: B018  (read now, so that a missing file stops the run before the model is built)

    def describe(self) -> str:
        return f"masked LM on {self.corpus.describe()}"

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        ids, _ = random_windows(getattr(self.corpus, split), self.cfg.seq_len, size, generator)
        return mask_tokens(ids, generator)

    def objective(self, model: nn.Module) -> nn.Module:
        return EncoderObjective(model)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Mean loss (nats) over the masked positions and ``bits_per_byte``."""
        was_training = model.training
        model.eval()
        total_loss, total_count = 0.0, 0
        for inputs, targets in batches:
            ids, mask = split_padding(inputs.to(device))
            targets = targets.to(device)
            count = int((targets != IGNORE_INDEX).sum())
            total_loss += float(model(ids, attention_mask=mask, labels=targets, n_hashes=n_hashes)) * count
            total_count += count
        model.train(was_training)
        loss = total_loss / max(total_count, 1)
        return {"loss": loss, "bits_per_byte": loss / torch.log(torch.tensor(2.0)).item()}

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this corpus's test split")
        parser.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """Back-to-back windows of the test split, masked from ``TEST_SEED``."""
        corpus = load_corpus(options.data) if options.data else self.corpus
        generator = torch.Generator().manual_seed(TEST_SEED)
        size = self.eval_batch_size(options)
        windows = contiguous_windows(corpus.test, self.cfg.seq_len, size, options.max_tokens)
        return (mask_tokens(inputs, generator) for inputs, _ in windows)


TASKS = (MaskedLMTask,)
