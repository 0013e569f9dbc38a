"""Sequence-to-sequence training tasks for :class:`~reformer.models.seq2seq.ReformerEncoderDecoder`.

* ``reverse`` / ``sort``: synthetic; the source is ``seq_len`` random symbols in ``1 .. vocab-1`` and the
  target is the source reversed / sorted (id 0 is the decoder's start token).
* ``pairs``: ``--data pairs.jsonl``, one ``{"source": ..., "target": ...}`` object per line, texts as
  UTF-8 bytes (ids 0..255; 256 starts the decoder, 257 ends a target). Every 20th line is held out.
  A pair longer than ``--seq-len`` bytes (the target with its end token) is an error, not truncated.

The training loop's batches are ``(sources, targets)``: sources ``(batch, L_enc)`` with -1 at padding,
targets ``(batch, L_dec)`` with -100 at padding; :class:`TeacherForced` turns them into the model's loss.

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
from pathlib import Path

import torch
from torch import nn

from ..config import ReformerConfig, default_axial_shape
from ..data import IGNORE_INDEX
from ..devices import default_device
from ..models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig, shift_right
from .config import TrainConfig, TrainingError

SYNTHETIC_VOCAB = 64  # symbols 1..63, 0 starts the decoder
BYTE_START, BYTE_EOS, BYTE_VOCAB = 256, 257, 258
SOURCE_PAD = -1
HELD_OUT_EVERY = 20
# Model settings of the seq2seq presets that are not ReformerConfig fields.
SEQ2SEQ_KEYS = (
    "cross_attention", "cross_n_heads", "cross_chunk_size", "cross_window", "cross_n_hashes",
    "cross_n_buckets",
)  # fmt: skip
EVAL_SEED = 54321
CURRICULUM_WINDOW = 10


def model_config(cfg: TrainConfig) -> Seq2SeqConfig:
    """The encoder-decoder of a run: ``cfg.model`` holds the settings of both stacks (the encoder is
    built with ``causal=False``, the decoder with ``causal=True``) and the ``cross_*`` settings."""
    settings = dict(cfg.model)
    cross = {k: settings.pop(k) for k in SEQ2SEQ_KEYS if k in settings}
    if isinstance(cross.get("cross_n_buckets"), list):
        cross["cross_n_buckets"] = tuple(cross["cross_n_buckets"])
    settings.setdefault("max_seq_len", cfg.seq_len)
    if "axial_pos_shape" not in settings:
        settings["axial_pos_shape"] = default_axial_shape(settings["max_seq_len"])
    vocab = BYTE_VOCAB if cfg.task == "pairs" else SYNTHETIC_VOCAB
    settings.setdefault("vocab_size", vocab)
    encoder = ReformerConfig(**{**settings, "causal": False, "lsh_key_rule": "chunks"})
    decoder = ReformerConfig(**{**settings, "causal": True})
    extra = dict(decoder_start_id=BYTE_START, eos_id=BYTE_EOS) if cfg.task == "pairs" else {}
    return Seq2SeqConfig(encoder, decoder, share_embeddings=True, **cross, **extra)


def centred_offset(length: int, max_len: int) -> int:
    """The first position of a ``length``-token example centred in ``max_len`` positions."""
    return (max_len - length) // 2


class TeacherForced(nn.Module):
    """``forward(sources, targets=targets)`` -> the mean cross-entropy over real target tokens (the
    interface of the training loop); sources with -1 at padding, targets with -100 at padding.
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


def synthetic_batch(task: str, size: int, length: int, vocab: int, generator: torch.Generator):
    """``(sources, targets)`` ``(size, length)``: random symbols in ``1 .. vocab-1``, reversed or sorted."""
    sources = torch.randint(1, vocab, (size, length), generator=generator)
    targets = sources.flip(1) if task == "reverse" else sources.sort(1).values
    return sources, targets


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


class Seq2SeqBatches:
    """The loop's batches for the seq2seq tasks (the interface of :class:`~.batches.Batches`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.vocab = cfg.model.get("vocab_size", SYNTHETIC_VOCAB)
        self.pairs = read_pairs(cfg.data, cfg.seq_len) if cfg.task == "pairs" else None
        self.length = cfg.curriculum_start or cfg.seq_len  # the training examples' length
        self.recent: list[float] = []  # training losses at the current length

    def describe(self) -> str:
        if self.pairs is None:
            curriculum = ""
            if self.cfg.curriculum_start is not None:
                curriculum = f" (curriculum from {self.cfg.curriculum_start}, centred)"
            return f"{self.cfg.task} task, length {self.cfg.seq_len}{curriculum}, symbols 1..{self.vocab - 1}"
        return f"{len(self.pairs[0])} training / {len(self.pairs[1])} held-out pairs from {self.cfg.data}"

    def draw(self, size: int, generator: torch.Generator, split: str = "train", length: int | None = None):
        """``size`` synthetic pairs of ``length`` tokens (default ``--seq-len``), or ``split``'s pairs."""
        if self.pairs is None:
            return synthetic_batch(self.cfg.task, size, length or self.cfg.seq_len, self.vocab, generator)
        pool = self.pairs[0 if split == "train" else 1]
        picks = torch.randint(0, len(pool), (size,), generator=generator).tolist()
        return pad_pairs([pool[i] for i in picks])

    def next(self, size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = size * self.cfg.seq_len // self.length  # the curriculum's rows: as many tokens as full ones
        sources, targets = self.draw(size, self.generator, length=self.length)
        share = size // world_size
        return sources[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]

    def after_step(self, loss: float) -> bool:
        """Record a step's training loss (the same on every process); True when the curriculum's length
        grew. The trainer state keeps :meth:`curriculum_state` so that a resumed run continues where the
        uninterrupted one would (:meth:`restore`)."""
        if self.length >= self.cfg.seq_len:
            return False
        self.recent = [*self.recent[-(CURRICULUM_WINDOW - 1) :], loss]
        if (
            len(self.recent) < CURRICULUM_WINDOW
            or sum(self.recent) / CURRICULUM_WINDOW >= self.cfg.curriculum_loss
        ):
            return False
        self.length, self.recent = min(2 * self.length, self.cfg.seq_len), []
        return True

    def curriculum_state(self) -> dict:
        """The curriculum's length and the training losses recorded at it, for the trainer state."""
        return {"curriculum_length": self.length, "curriculum_recent": list(self.recent)}

    def restore(self, state: dict) -> None:
        """Continue the curriculum at the length and with the recent losses a trainer state recorded."""
        self.length = int(state.get("curriculum_length", self.length))
        self.recent = [float(x) for x in state.get("curriculum_recent", [])]

    def held_out(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same batches at every evaluation: synthetic ones from a fixed seed, or the held-out pairs."""
        size = min(self.cfg.batch_size, 8)
        if self.pairs is not None:
            pool = self.pairs[1][: size * self.cfg.eval_batches]
            return [pad_pairs(pool[i : i + size]) for i in range(0, len(pool), size)]
        generator = torch.Generator().manual_seed(EVAL_SEED)
        return [self.draw(size, generator, "valid") for _ in range(self.cfg.eval_batches)]


@torch.no_grad()
def evaluate_seq2seq(
    net: nn.Module, batches, task: str, device: torch.device, n_hashes: int | None = None
) -> dict[str, float]:
    """Teacher-forced held-out loss (nats per target token), token accuracy (argmax) and, for byte pairs,
    bits per byte (the loss in bits; the end token counts as one byte)."""
    model = net.model if isinstance(net, TeacherForced) else net
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for sources, targets in batches:
        sources, targets = sources.to(device), targets.to(device)
        source_mask = sources >= 0
        inputs = shift_right(targets.clamp(min=0), model.config.decoder_start_id)
        logits = model(sources.clamp(min=0), inputs, source_mask, targets != IGNORE_INDEX, n_hashes).float()
        counted = targets != IGNORE_INDEX
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
    if task == "pairs":
        metrics["bits_per_byte"] = loss / math.log(2)
    return metrics


def evaluate_seq2seq_run(
    run: str | Path, n_hashes: int | None = None, device: str | None = None
) -> dict[str, float]:
    """Held-out metrics of a finished seq2seq run folder (its own held-out batches)."""
    from ..config import read_json_object
    from .config import TRAIN_CONFIG_FILE

    run = Path(run)
    cfg = TrainConfig.from_dict(read_json_object(run / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    dev = default_device(device)
    model = ReformerEncoderDecoder.from_pretrained(run).to(dev)
    return evaluate_seq2seq(model, Seq2SeqBatches(cfg).held_out(), cfg.task, dev, n_hashes)
