"""The encoder-decoder tasks (:class:`~reformer.models.seq2seq.ReformerEncoderDecoder`).

* ``reverse`` / ``sort``: synthetic; the source is ``seq_len`` random symbols in ``1 .. vocab-1`` and the
  target is the source reversed / sorted (id 0 is the decoder's start token).
* ``pairs``: ``--data pairs.jsonl``, one ``{"source": ..., "target": ...}`` object per line, texts as
  UTF-8 bytes (ids 0..255; 256 starts the decoder, 257 ends a target). Every 20th line is held out.
  A pair longer than ``--seq-len`` bytes (the target with its end token) is an error, not truncated.

Batches are ``(sources, targets)``: sources ``(batch, L_enc)`` with -1 at padding, targets ``(batch,
L_dec)`` with -100 at padding; :class:`TeacherForced` turns them into the model's loss.

``--curriculum-start L0`` (reverse / sort): training examples of ``l = L0`` tokens, centred in the
``--seq-len L`` positions (source and target both at positions ``(L - l) // 2 ..``, so the reversal's
mirror ``i -> L - 1 - i`` is that of full-length examples when ``L - l`` is even), ``L / l`` times as many
rows, so the tokens per step stay ``batch_size * L``; ``l`` doubles (up to ``L``) once the mean training
loss of the last ``CURRICULUM_WINDOW`` steps at the current length is below ``--curriculum-loss``.
Held-out evaluation is always at the full length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig, shift_right
from .base import Batch, Preset, Task, TrainingError
from .model_settings import Seq2SeqModelSettings
from .settings import setting

SYNTHETIC_VOCAB = 64  # symbols 1..63, 0 starts the decoder
BYTE_START, BYTE_EOS, BYTE_VOCAB = 256, 257, 258
SOURCE_PAD = -1
HELD_OUT_EVERY = 20
CURRICULUM_WINDOW = 10

# fmt: off
PRESETS = {
    # 2 + 2 layers, exact cross-attention, learned positions.
    "seq2seq": Preset(
        "reverse", "encoder-decoder: 2 + 2 layers, d_model 128, exact cross-attention, 128 tokens",
        tasks=("reverse", "sort", "pairs"),
        model=dict(d_model=128, n_heads=4, n_layers=2, d_ff=256, attn_layers=("full", "full"),
                   axial_pos_shape=(128,), axial_pos_dims=(128,), cross_attention="full"),
        run=dict(seq_len=128, batch_size=16, steps=1000, lr=2e-3, warmup=100, eval_every=100, save_every=200,
                 eval_batches=4),
    ),
}
# fmt: on


def centred_offset(length: int, max_len: int) -> int:
    """The first position of a ``length``-token example centred in ``max_len`` positions."""
    return (max_len - length) // 2


class TeacherForced(nn.Module):
    """``forward(sources, targets)`` -> the mean cross-entropy over real target tokens (the objective
    of the encoder-decoder tasks); sources with -1 at padding, targets with -100 at padding.
    ``centre``: sources and targets shorter than the model's ``max_seq_len`` are placed at the middle
    positions (:func:`centred_offset`), for the length curriculum."""

    def __init__(self, model: ReformerEncoderDecoder, centre: bool = False) -> None:
        super().__init__()
        self.model, self.centre = model, centre

    def forward(self, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        source_mask = None if bool((sources >= 0).all()) else sources >= 0
        target_mask = None if bool((targets != IGNORE_INDEX).all()) else targets != IGNORE_INDEX
        offsets = {}
        if self.centre:
            c = self.model.config
            offsets = dict(
                source_offset=centred_offset(sources.shape[1], c.encoder.max_seq_len),
                target_offset=centred_offset(targets.shape[1], c.decoder.max_seq_len),
            )
        return self.model.loss(
            sources.clamp(min=0), targets.clamp(min=0), source_mask, target_mask, **offsets
        )


class Seq2SeqTask(Task):
    """What the encoder-decoder tasks share: the model, the teacher-forced objective and metrics."""

    Model = Seq2SeqModelSettings
    model_class = ReformerEncoderDecoder
    presets = PRESETS
    default_preset = "seq2seq"
    held_out_seed = 54321  # the generator seed of this family's held-out batches
    bits_per_byte = False  # report the loss in bits as well (byte targets)
    decoder_ids: dict[str, int] = {}  # decoder_start_id / eos_id of the model

    def model_config(self) -> Seq2SeqConfig:
        """Both stacks from the model settings (the encoder with ``causal=False`` and the trax/HF LSH
        rule, the decoder causal) and the cross-attention settings; shared embeddings."""
        m, seq_len = self.cfg.model, self.cfg.seq_len
        encoder = m.reformer_config(
            seq_len, self.vocab_size, False, {"causal": False, "lsh_key_rule": "chunks"}
        )
        decoder = m.reformer_config(seq_len, self.vocab_size, True, {"causal": True})
        return Seq2SeqConfig(
            encoder, decoder, share_embeddings=True, **m.cross_settings(), **self.decoder_ids
        )

    def load_model(self, folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return self.model_class.from_pretrained(folder, map_location=device)

    def describe_model(self, model: nn.Module) -> str:
        n_params = sum(p.numel() for p in model.parameters())
        c = model.config
        return f"{n_params:,} parameters, {c.encoder.n_layers} + {c.decoder.n_layers} layers"

    def objective(self, model: nn.Module) -> nn.Module:
        return TeacherForced(model)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Teacher-forced loss (nats per target token), token accuracy (argmax) and, for byte pairs,
        bits per byte (the loss in bits; the end token counts as one byte)."""
        was_training = model.training
        model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for sources, targets in batches:
            sources, targets = sources.to(device), targets.to(device)
            source_mask = sources >= 0
            inputs = shift_right(targets.clamp(min=0), model.config.decoder_start_id)
            counted = targets != IGNORE_INDEX
            logits = model(sources.clamp(min=0), inputs, source_mask, counted, n_hashes).float()
            total_loss += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            correct += int(((logits.argmax(-1) == targets) & counted).sum())
            count += int(counted.sum())
        model.train(was_training)
        loss = total_loss / max(count, 1)
        metrics = {"loss": loss, "accuracy": correct / max(count, 1)}
        if self.bits_per_byte:
            metrics["bits_per_byte"] = loss / math.log(2)
        return metrics

    @classmethod
    def add_eval_arguments(cls, parser) -> None:
        """None: ``reformer eval`` evaluates the run's own held-out batches."""

    def eval_lines(self, metrics: dict[str, float]) -> list[str]:
        return [f"{k}={v:.4f}" for k, v in metrics.items()]

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        metrics = self.evaluate(model, self.held_out(), device, n_hashes=8)
        return [f"held-out token accuracy with 8 hashes: {metrics['accuracy']:.4f}"]


@dataclass
class CurriculumSettings:
    curriculum_start: int | None = setting(
        None, "train on examples of this many tokens centred in the --seq-len positions, doubling the "
        "length when the training loss falls below --curriculum-loss (docs/seq2seq.md)", metavar="L0",
        unset="off",
    )  # fmt: skip
    curriculum_loss: float = setting(0.3, "the curriculum's loss threshold (nats)")


class SyntheticTask(Seq2SeqTask):
    """Random symbols and their reversal / sorting, with the optional length curriculum."""

    Settings = CurriculumSettings
    vocab_size = SYNTHETIC_VOCAB

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.vocab = cfg.model.vocab_size or SYNTHETIC_VOCAB
        self.length = self.settings.curriculum_start or cfg.seq_len  # the training examples' length
        self.recent: list[float] = []  # training losses at the current length

    def validate(self) -> None:
        start, loss = self.settings.curriculum_start, self.settings.curriculum_loss
        if start is not None:
            if not isinstance(start, int) or not 1 <= start <= self.cfg.seq_len:
                raise ValueError(f"--curriculum-start {start!r} must lie in [1, --seq-len]")
            if not loss > 0:
                raise ValueError(f"--curriculum-loss {loss} must be positive")

    def describe(self) -> str:
        curriculum = ""
        if self.settings.curriculum_start is not None:
            curriculum = f" (curriculum from {self.settings.curriculum_start}, centred)"
        return f"{self.name} task, length {self.cfg.seq_len}{curriculum}, symbols 1..{self.vocab - 1}"

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """Training: ``size * seq_len / length`` examples of the curriculum's length (as many tokens as
        ``size`` full ones); held out: ``size`` full-length ones."""
        length = self.length if split == "train" else self.cfg.seq_len
        return synthetic_batch(self.name, size * self.cfg.seq_len // length, length, self.vocab, generator)

    def objective(self, model: nn.Module) -> nn.Module:
        return TeacherForced(model, centre=self.settings.curriculum_start is not None)

    def after_step(self, loss: float, step: int) -> str | None:
        """Record a step's training loss; the curriculum's length doubles once the mean of the last
        ``CURRICULUM_WINDOW`` losses at the current length is below the threshold."""
        if self.length >= self.cfg.seq_len:
            return None
        self.recent = [*self.recent[-(CURRICULUM_WINDOW - 1) :], loss]
        if (
            len(self.recent) < CURRICULUM_WINDOW
            or sum(self.recent) / CURRICULUM_WINDOW >= self.settings.curriculum_loss
        ):
            return None
        self.length, self.recent = min(2 * self.length, self.cfg.seq_len), []
        return f"curriculum: length {self.length} from step {step + 1}"

    def state(self) -> dict[str, Any]:
        """The curriculum's length and the training losses recorded at it."""
        if self.settings.curriculum_start is None:
            return {}
        return {"curriculum_length": self.length, "curriculum_recent": list(self.recent)}

    def restore(self, state: dict[str, Any]) -> None:
        self.length = int(state.get("curriculum_length", self.length))
        self.recent = [float(x) for x in state.get("curriculum_recent", [])]


class ReverseTask(SyntheticTask):
    name = "reverse"
    about = "encoder-decoder: reverse random symbols (preset seq2seq; docs/seq2seq.md)"


class SortTask(SyntheticTask):
    name = "sort"
    about = "encoder-decoder: sort random symbols (preset seq2seq)"


def synthetic_batch(task: str, size: int, length: int, vocab: int, generator: torch.Generator):
    """``(sources, targets)`` ``(size, length)``: random symbols in ``1 .. vocab-1``, reversed or sorted."""
    sources = torch.randint(1, vocab, (size, length), generator=generator)
    targets = sources.flip(1) if task == "reverse" else sources.sort(1).values
    return sources, targets


@dataclass
class PairsSettings:
    data: list[str] = setting(
        default_factory=list, help='JSON-lines files of {"source": ..., "target": ...} texts', metavar="PATH",
        path=True, unset="none; required",
    )  # fmt: skip


class PairsTask(Seq2SeqTask):
    """Byte pairs from JSON-lines files; every ``HELD_OUT_EVERY``-th pair is held out."""

    name = "pairs"
    about = 'encoder-decoder on {"source", "target"} byte pairs (--data F.jsonl)'
    Settings = PairsSettings
    vocab_size = BYTE_VOCAB
    bits_per_byte = True
    decoder_ids = dict(decoder_start_id=BYTE_START, eos_id=BYTE_EOS)

    @cached_property
    def pairs(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """The (training, held-out) pairs, read once."""
        return read_pairs(self.settings.data, self.cfg.seq_len)

    def prepare(self) -> None:
        self.pairs  # noqa: B018  (read now, so that a bad file stops the run before the model is built)

    def describe(self) -> str:
        return (
            f"{len(self.pairs[0])} training / {len(self.pairs[1])} held-out pairs from {self.settings.data}"
        )

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        pool = self.pairs[0 if split == "train" else 1]
        picks = torch.randint(0, len(pool), (size,), generator=generator).tolist()
        return pad_pairs([pool[i] for i in picks])

    def held_out(self) -> list[Batch]:
        """The held-out pairs in order (at most ``eval_batches`` batches)."""
        size = min(self.cfg.batch_size, 8)
        pool = self.pairs[1][: size * self.cfg.eval_batches]
        return [pad_pairs(pool[i : i + size]) for i in range(0, len(pool), size)]


def read_pairs(paths: list[str], max_len: int) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(train, held-out) byte pairs from JSON-lines files; every ``HELD_OUT_EVERY``-th line is held out."""
    if not paths:
        raise TrainingError('--task pairs needs --data FILE.jsonl with one {"source", "target"} per line')
    train, held_out, index = [], [], 0
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                source, target = record["source"].encode("utf-8"), record["target"].encode("utf-8")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise TrainingError(
                    f"{path}:{number} is not a JSON object with string fields source and target ({err})"
                ) from err
            if not source:
                raise TrainingError(f"{path}:{number} has an empty source; every pair needs source bytes")
            if len(source) > max_len or len(target) + 1 > max_len:
                raise TrainingError(
                    f"{path}:{number}: source {len(source)} / target {len(target)} + 1 bytes exceed "
                    f"--seq-len {max_len}; raise --seq-len or shorten the pair"
                )
            (held_out if index % HELD_OUT_EVERY == 0 else train).append((source, target))
            index += 1
    if not train or not held_out:
        raise TrainingError(
            f"{paths} hold {index} pairs; give at least 2 (every {HELD_OUT_EVERY}th is held out)"
        )
    return train, held_out


def pad_pairs(pairs: list[tuple[bytes, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte pairs -> sources (padding -1) and targets with the end token (padding -100)."""
    ls = max(len(s) for s, _ in pairs)
    lt = max(len(t) for _, t in pairs) + 1
    sources = torch.full((len(pairs), ls), SOURCE_PAD, dtype=torch.long)
    targets = torch.full((len(pairs), lt), IGNORE_INDEX, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        sources[i, : len(s)] = torch.tensor(list(s))
        targets[i, : len(t) + 1] = torch.tensor([*t, BYTE_EOS])
    return sources, targets


TASKS = (ReverseTask, SortTask, PairsTask)
