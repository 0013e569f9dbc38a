"""Passkey retrieval data: a haystack of filler with one needle at a chosen depth, then the question.

The format is the standard passkey test (Mohtashami & Jaggi, *Landmark Attention*, 2023), as bytes::

    <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler>
    What is the pass key? The pass key is 71432

Only the answer's digits are scored. The needle starts at ``depth`` (0 = the start of the haystack, 1 = just
before the question) of the filler. Fillers: ``corpus`` (windows of the default corpus: the train split for
training, the held-out split for evaluation), ``repeat`` (the test's own "The grass is green. ..." lines)
and ``noise`` (random printable bytes). No filler window contains the phrase "pass key".
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import IGNORE_INDEX, default_corpus

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "
REPEATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLERS = ("corpus", "repeat", "noise")
PHRASE = b"pass key"


class Filler:
    """Filler bytes of one kind; ``split`` ``"train"`` or ``"test"`` picks the corpus split."""

    def __init__(self, kind: str = "corpus", split: str = "train") -> None:
        if kind not in FILLERS:
            raise ValueError(f"filler={kind!r} is unknown; use one of {FILLERS}")
        self.kind = kind
        self.data = np.asarray(default_corpus(split)) if kind == "corpus" else None

    def take(self, n: int, generator: torch.Generator) -> np.ndarray:
        """``n`` filler bytes ``(n,)`` uint8 that never contain "pass key" (any case)."""
        if self.kind == "noise":
            return torch.randint(32, 127, (n,), generator=generator).numpy().astype(np.uint8)
        if self.kind == "repeat":
            start = int(torch.randint(0, len(REPEATED_FILLER), (), generator=generator))
            text = REPEATED_FILLER.encode() * (n // len(REPEATED_FILLER) + 2)
            return np.frombuffer(text[start : start + n], dtype=np.uint8)
        if n >= len(self.data):
            raise ValueError(f"a haystack of {n:,} bytes needs more than the corpus's {len(self.data):,}")
        while True:
            start = int(torch.randint(0, len(self.data) - n, (), generator=generator))
            window = self.data[start : start + n]
            if PHRASE not in window.tobytes().lower():
                return window


def passkey_example(
    length: int, depth: float, filler: Filler, generator: torch.Generator, digits: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """One example of exactly ``length`` input tokens: ``(inputs, targets)``, both ``(length,)`` int64.

    ``targets`` is ``IGNORE_INDEX`` except at the last ``digits`` positions, which predict the key's digits
    (teacher forced: the input ends with all digits but the last).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
    needle, tail = NEEDLE.format(key=key).encode(), (QUESTION + key).encode()
    n_fill = length + 1 - len(needle) - len(tail)
    if n_fill < 0:
        raise ValueError(
            f"length={length} is too short for a passkey example; the needle and question alone take "
            f"{len(needle) + len(tail) - 1} tokens"
        )
    fill = filler.take(n_fill, generator)
    cut = int(round(depth * n_fill))
    sequence = np.concatenate(
        [fill[:cut], np.frombuffer(needle, np.uint8), fill[cut:], np.frombuffer(tail, np.uint8)]
    )
    sequence = torch.from_numpy(sequence.astype(np.int64))
    targets = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    targets[-digits:] = sequence[-digits:]
    return sequence[:-1], targets


def min_passkey_length(digits: int = 5) -> int:
    """The shortest input that holds a needle and the question with ``digits``-digit keys."""
    return len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + digits - 1
