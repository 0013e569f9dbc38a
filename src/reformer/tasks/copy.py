"""``copy``: the paper's duplication task (section 5). Sequences ``0 w 0 w``; the loss and accuracy count
only the second copy of ``w``. Presets ``copy`` (256 tokens, CPU size) and ``copy-paper`` (1024)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..models.base import too_long_message
from .base import HELD_OUT_SEED, Batch, Preset, Task

COPY_SYMBOLS = 127  # symbols 1..127; 0 separates the halves
COPY_VOCAB = COPY_SYMBOLS + 1
# The test batches of `reformer eval` and of the accuracy printed after training.
TEST_SEED = HELD_OUT_SEED + 1

# fmt: off
PRESETS = {
    # One LSH layer over 256 tokens, learned positions; the copy presets keep the paper's (trax/HF) LSH
    # rule, the one its Table 2 measured.
    "copy": Preset(
        "copy", "the duplication task at a CPU size: one LSH layer over 256 tokens", tasks=("copy",),
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=32,
                   n_hashes=4, attn_layers=("lsh",), lsh_key_rule="chunks", axial_pos_shape=(256,),
                   axial_pos_dims=(256,)),
        run=dict(seq_len=256, batch_size=32, steps=600, lr=3e-3, warmup=100, eval_every=100, save_every=200),
    ),
    # The paper's duplication setting (section 5): length 1024, one layer, d_model 256, 4 heads.
    "copy-paper": Preset(
        "copy", "the paper's duplication setting: length 1024, one LSH layer", tasks=("copy",),
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=64,
                   n_hashes=4, attn_layers=("lsh",), lsh_key_rule="chunks", axial_pos_shape=(1024,),
                   axial_pos_dims=(256,)),
        run=dict(seq_len=1024, batch_size=32, steps=3000, lr=2e-3, warmup=200, eval_every=250,
                 save_every=500),
    ),
}
# fmt: on


def copy_task_batch(
    batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``0 w 0 w`` of ``length`` tokens (``w``: ``length / 2 - 1`` random symbols in 1..127).

    Returns ``inputs`` ``(batch_size, length)`` int64 and next-token ``targets`` of the same shape that
    are ``IGNORE_INDEX`` except where the second copy of ``w`` is predicted (positions
    ``length / 2 .. length - 2``), so loss and accuracy count only the second half.
    """
    if length < 4 or length % 2:
        raise ValueError(f"copy task length={length} must be even and at least 4")
    half = length // 2
    w = torch.randint(1, COPY_SYMBOLS + 1, (batch_size, half - 1), generator=generator)
    zero = torch.zeros(batch_size, 1, dtype=torch.long)
    inputs = torch.cat([zero, w, zero, w], dim=1)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, half:-1] = inputs[:, half + 1 :]
    return inputs, targets


class CopyTask(Task):
    """The duplication task: accuracy of the second copy's tokens."""

    name = "copy"
    about = "the paper's duplication task 0w0w"
    vocab_size = COPY_VOCAB
    presets = PRESETS
    default_preset = "copy"
    sequence_parallel = True

    def validate(self) -> None:
        if self.cfg.seq_len % 2 or self.cfg.seq_len < 4:
            raise ValueError(f"the copy task needs an even --seq-len of at least 4, got {self.cfg.seq_len}")

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        return copy_task_batch(size, self.cfg.seq_len, generator)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Mean loss in nats over the second copy, and ``accuracy``: the share of its tokens predicted
        right (argmax)."""
        was_training = model.training
        model.eval()
        total_loss, total_count, total_correct = 0.0, 0, 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            counted = targets != IGNORE_INDEX
            logits = model(inputs, n_hashes=n_hashes).float()
            total_loss += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            total_correct += int(((logits.argmax(-1) == targets) & counted).sum())
            total_count += int(counted.sum())
        model.train(was_training)
        return {"loss": total_loss / max(total_count, 1), "accuracy": total_correct / max(total_count, 1)}

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument(
            "--max-tokens", type=int, help="evaluate about this many tokens (default: 32 sequences)"
        )
        parser.add_argument(
            "--length", type=int,
            help="tokens per test sequence (default: the training length); longer than training needs "
            "a position scheme that runs past it (rotary or none)",
        )  # fmt: skip

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """Fresh sequences of ``--length`` tokens (default: the training length) from ``TEST_SEED``:
        ``--max-tokens`` (default 32 sequences) in whole batches."""
        size, length = self.eval_batch_size(options), options.length or self.cfg.seq_len
        if length > model.config.max_seq_len:
            raise ValueError(f"--length {length}: {too_long_message(length, model.config)}")
        generator = torch.Generator().manual_seed(TEST_SEED)
        n_batches = max(1, -(-(options.max_tokens or 32 * length) // (size * length)))
        return [copy_task_batch(size, length, generator) for _ in range(n_batches)]

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        options = argparse.Namespace(batch_size=None, max_tokens=None, length=None)
        metrics = self.evaluate(model, self.test_batches(model, options), device, n_hashes=8)
        return [f"copy-task accuracy with 8 hashes: {metrics['accuracy']:.4f}"]


TASKS = (CopyTask,)
