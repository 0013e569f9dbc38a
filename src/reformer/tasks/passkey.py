"""``passkey``: find a needle in a haystack. A haystack of filler with one needle at a chosen depth, then
the question; the model must produce the key's digits.

The format is the standard passkey test (Mohtashami & Jaggi, *Landmark Attention*, 2023), as bytes::

    <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler>
    What is the pass key? The pass key is 71432

Only the answer's digits are scored. The needle starts at ``depth`` (0 = the start of the haystack, 1 = just
before the question) of the filler. Fillers: ``corpus`` (windows of the default corpus: the train split for
training, the held-out split for evaluation), ``repeat`` (the test's own "The grass is green. ..." lines)
and ``noise`` (random printable bytes). No filler window contains the phrase "pass key".

The ``passkey`` preset trains a byte-level local/LSH model with rotary positions in the local layers and
none in the LSH layers, on haystacks of 128 tokens and up (a length curriculum to 8K), and tests it at any
length up to 1M tokens (:mod:`reformer.tasks.retrieval`; docs/long_context.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import IGNORE_INDEX, default_corpus
from .base import Batch, Preset
from .retrieval import RetrievalSettings, RetrievalTask
from .settings import setting

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


def decoy_numbers(key: str, n: int, generator: torch.Generator) -> list[bytes]:
    """``n`` numbers of ``len(key)`` digits, each ``key``'s first ``p`` digits (``p`` drawn from 0 to
    ``len(key) - 1``) followed by other digits, never ``key`` itself, as ``b" 71402 "``."""
    numbers = []
    for _ in range(n):
        keep = int(torch.randint(0, len(key), (), generator=generator))
        tail = [int(d) for d in torch.randint(0, 10, (len(key) - keep,), generator=generator)]
        first = int(key[keep])
        if tail[0] == first:  # differ at the first redrawn digit, so never the key
            tail[0] = (first + 1 + int(torch.randint(0, 9, (), generator=generator))) % 10
        numbers.append(f" {key[:keep]}{''.join(map(str, tail))} ".encode())
    return numbers


def passkey_example(
    length: int,
    depth: float,
    filler: Filler,
    generator: torch.Generator,
    digits: int = 5,
    decoys: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One example of exactly ``length`` input tokens: ``(inputs, targets)``, both ``(length,)`` int64.

    ``targets`` is ``IGNORE_INDEX`` except at the last ``digits`` positions, which predict the key's digits
    (teacher forced: the input ends with all digits but the last). ``decoys`` numbers that share a prefix
    with the key (:func:`decoy_numbers`) overwrite filler, one in each of ``decoys`` equal stretches of it
    (fewer where the filler is too short to hold them).
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
    if decoys:
        fill = fill.copy()
        width = digits + 2
        slots = min(decoys, n_fill // width)
        stretch = n_fill // max(slots, 1)
        for slot, number in enumerate(decoy_numbers(key, slots, generator)):
            at = slot * stretch + int(torch.randint(0, stretch - width + 1, (), generator=generator))
            fill[at : at + width] = np.frombuffer(number, np.uint8)
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


# fmt: off
PRESETS = {
    "passkey": Preset(
        "passkey", "passkey retrieval: a 4-layer local/LSH byte model trained on 128-8K tokens with decoys, "
        "tested to 1M", tasks=("passkey",),
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=256, attn_layers=("local", "lsh", "local", "lsh"),
                   bucket_size=64, n_hashes=4, lsh_key_rule="chunks", local_chunk_size=64,
                   position_embedding="rotary", reversible=False, max_seq_len=1 << 20),
        run=dict(seq_len=8192, batch_size=1, steps=2000, lr=1e-3, warmup=100, schedule="cosine",
                 eval_every=250, eval_batches=8, save_every=250, keep_best=True),
        task_settings=dict(train_decoys=8, decoys_from=512),
    ),
}
# fmt: on


@dataclass
class PasskeySettings(RetrievalSettings):
    filler: str = setting(
        "corpus", "haystack text: corpus (the default corpus), repeat or noise", choices=FILLERS
    )
    digits: int = setting(5, "digits of the key")
    train_decoys: int = setting(
        0, "numbers sharing a prefix with the key hidden in each training haystack (held-out and test "
        "haystacks have none): they make the model bind the digits to the phrase, not to the digits "
        "before them, which text full of numbers defeats at long lengths",
    )  # fmt: skip
    decoys_from: int = setting(
        0, "training haystacks shorter than this many tokens get no decoys, so that a model learns the "
        "task on short clean haystacks before the decoys make it harder (0: every training haystack)",
    )  # fmt: skip


class PasskeyTask(RetrievalTask):
    """Passkey retrieval: accuracy is the share of examples whose every digit is predicted right."""

    name = "passkey"
    about = "find the pass key hidden in a haystack (long-context retrieval; docs/long_context.md)"
    Settings = PasskeySettings
    presets = PRESETS
    default_preset = "passkey"
    grid_name = "depth"
    grid_values = tuple(i / 10 for i in range(11))
    exact_match = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._fillers: dict[str, Filler] = {}

    def validate(self) -> None:
        super().validate()
        if self.settings.filler not in FILLERS:
            raise ValueError(f"--filler {self.settings.filler!r} is unknown; use one of {FILLERS}")
        if self.settings.train_decoys < 0:
            raise ValueError(f"--train-decoys {self.settings.train_decoys} must be 0 or more")
        if self.settings.decoys_from < 0:
            raise ValueError(f"--decoys-from {self.settings.decoys_from} must be 0 or more")
        if not 1 <= self.settings.digits <= 64:
            raise ValueError(f"--digits {self.settings.digits} must lie in [1, 64]")
        shortest = min_passkey_length(self.settings.digits)
        if self.settings.min_len < shortest:
            raise ValueError(
                f"--min-len {self.settings.min_len} is below the {shortest} tokens of a needle and question"
            )

    def filler(self, split: str) -> Filler:
        """The filler of ``split``: the corpus's training text for training, its held-out text otherwise."""
        key = "train" if split == "train" else "test"
        if key not in self._fillers:
            self._fillers[key] = Filler(self.settings.filler, key)
        return self._fillers[key]

    def example(self, length: int, value: float, generator: torch.Generator, split: str) -> Batch:
        with_decoys = split == "train" and length >= self.settings.decoys_from
        decoys = self.settings.train_decoys if with_decoys else 0
        return passkey_example(length, value, self.filler(split), generator, self.settings.digits, decoys)

    def train_grid_value(self, length: int, generator: torch.Generator) -> float:
        return float(torch.rand((), generator=generator))


TASKS = (PasskeyTask,)
