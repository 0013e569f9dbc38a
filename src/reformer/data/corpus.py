"""A corpus: a stream of token ids split three ways, and the windows a model trains and is evaluated on.

Every stream format (bytes, token files, tokenized text, genomes) gives a :class:`Corpus`; what differs
between formats (the vocabulary, what one metric unit is, augmentation, the text view) is overridden in
a subclass, so training and evaluation never ask which format they hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # targets that count in no loss or metric
SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    """Token ids ``0 .. vocab_size - 1`` split three ways; each split is a 1-D integer array (a read-only
    memory map or a view of one). ``unit`` names what the metric counts: ``bits_per_<unit>``."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab_size: int = 256
    unit: str = "byte"
    codec = "bytes"  # how a model folder spells ids (data/codec.py)

    @property
    def metric(self) -> str:
        """The name of the held-out metric: ``bits_per_byte``, ``bits_per_token``, ``bits_per_base``."""
        return f"bits_per_{self.unit}"

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train):,} train / {len(self.valid):,} valid / "
            f"{len(self.test):,} test {self.unit}s"
        )

    def split(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        return getattr(self, split)

    def sample(
        self, split: str, batch_size: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of ``split``: inputs and next-token targets, both ``(batch_size, length)``
        int64."""
        return random_windows(self.split(split), length, batch_size, generator)

    def sequential(
        self, split: str, length: int, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Back-to-back windows over ``split`` (see :func:`contiguous_windows`)."""
        return contiguous_windows(self.split(split), length, batch_size, max_tokens)

    def units(self, targets: torch.Tensor) -> int:
        """How many metric units the ``targets`` (any shape, int64) cover: one per counted target."""
        return int((targets != IGNORE_INDEX).sum())

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text``, ``(length,)`` int64: its UTF-8 bytes."""
        return encode_text(text)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of ``ids`` (bytes ``0..255``; invalid UTF-8 replaced)."""
        return decode_bytes(ids)


def random_windows(
    data: np.ndarray, length: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``length + 1`` tokens: inputs and next-token targets, both
    ``(batch_size, length)`` int64."""
    if len(data) <= length + 1:
        raise ValueError(
            f"corpus has {len(data)} tokens, too few for windows of {length + 1}; lower --seq-len"
        )
    starts = torch.randint(0, len(data) - length - 1, (batch_size,), generator=generator).tolist()
    return windows_at(data, starts, length)


def contiguous_windows(
    data: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Back-to-back windows over ``data`` (or its first ``max_tokens + 1`` tokens) so that every token
    after the first is predicted once: batches of up to ``batch_size`` windows of ``seq_len``, then the
    shorter remainder on its own. Yields inputs and next-token targets, both ``(n, length)`` int64."""
    limit = len(data) - 1 if max_tokens is None else min(len(data) - 1, max_tokens)
    full = limit // seq_len
    for first in range(0, full, batch_size):
        starts = range(first * seq_len, min(first + batch_size, full) * seq_len, seq_len)
        yield windows_at(data, starts, seq_len)
    if limit % seq_len:
        yield windows_at(data, [full * seq_len], limit % seq_len)


def windows_at(data: np.ndarray, starts: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of ``length + 1`` tokens at ``starts``: inputs and next-token targets, both
    ``(len(starts), length)`` int64."""
    windows = torch.from_numpy(
        np.stack([np.asarray(data[s : s + length + 1]) for s in starts]).astype(np.int64)
    )
    return windows[:, :-1], windows[:, 1:]


def decode_bytes(ids: torch.Tensor | Sequence[int]) -> str:
    """Bytes ``0..255`` to text (invalid UTF-8 replaced)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(int(i) for i in values).decode("utf-8", errors="replace")


def encode_text(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor ``(length,)``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
