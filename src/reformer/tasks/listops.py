"""``listops``: ListOps (Nangia & Bowman 2018) as in the Long Range Arena (Tay et al. 2021): nested MAX /
MIN / MED / SM (sum mod 10) expressions over the digits 0-9, a 10-way classification of the expression's
value, generated on the fly.

The generator follows LRA's published definition (``lra_benchmarks/data/listops.py``): a node below the
maximum depth is an operator with probability 0.25 (else a digit), an operator takes 2 to ``max_args``
arguments, and whole trees are drawn until their length lies strictly between the bounds (LRA: depth 10,
10 arguments, 500 < length < 2000). The length counts one token per digit and two per operator (its
opening ``[MAX`` and its closing ``]``); the expression is written in prefix form,
``[MAX 2 9 [MIN 4 7 ] 0 ]``, one token per symbol. (LRA's text files also wrap every node of a binarised
tree in parentheses, which only its tokenizer sees; they carry no information and are left out here.)
``MED`` is ``int(numpy.median(args))``, the mean of the two middle values truncated for an even count.

Everything is seeded: ``listops_batch`` draws from a ``torch.Generator`` (so a run's data resumes exactly)
and the fixed test set of ``reformer eval`` comes from its own seed (``TEST_SEED``).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import Batch, Preset
from .classification import ClassificationTask, ClassifierSettings
from .encoder import PAD as PAD  # the padding of listops_batch rows
from .encoder import pad_rows
from .settings import setting

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
# Token ids: the digits are their own ids, then the operators, then the closing bracket.
VOCAB = tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)  # 15
N_CLASSES = 10
MAX_DEPTH, MAX_ARGS = 10, 10
OPERATOR_P = 0.25  # LRA's VALUE_P: a node below the maximum depth is an operator with this probability
TEST_SEED = 2021  # the generated test set of `reformer eval` (training and held-out batches use others)


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: int) -> list | int:
    """A random node: a digit, or ``[operator, child, ...]``. Stops growing (returns early) once the
    running token count passes ``budget``, since such a tree is rejected anyway."""
    if depth >= max_depth or rng.random() >= OPERATOR_P:
        return rng.randrange(10)
    node: list = [rng.randrange(len(OPERATORS))]
    for _ in range(rng.randint(2, max_args)):
        node.append(_tree(rng, depth + 1, max_depth, max_args, budget))
        if _size(node) > budget:
            break
    return node


def _size(node: list | int) -> int:
    if isinstance(node, int):
        return 1
    return 2 + sum(_size(child) for child in node[1:])


def _tokens(node: list | int, out: list[int]) -> list[int]:
    if isinstance(node, int):
        out.append(node)
    else:
        out.append(10 + node[0])
        for child in node[1:]:
            _tokens(child, out)
        out.append(TOKEN_ID[END])
    return out


def generate(
    rng: random.Random,
    min_len: int = 500,
    max_len: int = 2000,
    max_depth: int = MAX_DEPTH,
    max_args: int = MAX_ARGS,
) -> list[int]:
    """One expression's token ids (a list of ints in ``[0, VOCAB_SIZE)``) with
    ``min_len < length < max_len``, drawn as LRA does: whole trees until one fits."""
    if not 0 <= min_len < max_len - 1:
        raise ValueError(f"ListOps lengths need 0 <= min_len < max_len - 1, got {min_len} and {max_len}")
    while True:
        root = _tree(rng, 1, max_depth, max_args, max_len)
        if min_len < _size(root) < max_len:
            return _tokens(root, [])


def evaluate(ids: Sequence[int]) -> int:
    """The value 0-9 of an expression given as token ids (a stack machine over the prefix form)."""
    stack: list[list[int]] = [[]]
    for token in ids:
        if token < 10:
            stack[-1].append(token)
        elif token < 10 + len(OPERATORS):
            stack.append([token - 10])
        else:
            op, *args = stack.pop()
            stack[-1].append(_apply(op, args))
    (value,) = stack[0]
    return value


def _apply(op: int, args: list[int]) -> int:
    if op == 0:
        return max(args)
    if op == 1:
        return min(args)
    if op == 2:
        ordered, half = sorted(args), len(args) // 2
        return ordered[half] if len(args) % 2 else (ordered[half - 1] + ordered[half]) // 2
    return sum(args) % 10


def to_text(ids: Sequence[int]) -> str:
    """``[MAX 2 9 [MIN 4 7 ] 0 ]`` from token ids."""
    return " ".join(VOCAB[i] for i in ids)


def from_text(text: str) -> list[int]:
    """Token ids of a whitespace-separated expression; a clear error for an unknown symbol."""
    ids = []
    for token in text.split():
        if token not in TOKEN_ID:
            raise ValueError(
                f"{token!r} is not a ListOps symbol; use digits 0-9, {', '.join(OPERATORS)} and ]"
            )
        ids.append(TOKEN_ID[token])
    if not ids:
        raise ValueError("the ListOps expression is empty")
    return ids


def listops_batch(
    size: int, min_len: int, max_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` fresh expressions: ids ``(size, longest)`` int64 padded with ``PAD`` and labels
    ``(size,)`` int64; the Python generator is seeded from ``generator`` so the batch is reproducible."""
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    rows = [generate(rng, min_len, max_len) for _ in range(size)]
    return pad_rows(rows), torch.tensor([evaluate(r) for r in rows], dtype=torch.long)


def listops_set(n: int, min_len: int, max_len: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """A fixed set of ``n`` expressions and their values (the validation / test sets)."""
    rng = random.Random(seed)
    rows = [generate(rng, min_len, max_len) for _ in range(n)]
    return rows, [evaluate(r) for r in rows]


# fmt: off
PRESETS = {
    # Lengths 129-512, a small local/LSH encoder (docs/encoders.md; LRA's lengths: --seq-len 2000
    # --min-len 500).
    "listops": Preset(
        "listops", "ListOps at a CPU size: lengths 129-512, a 2-layer local/LSH encoder", tasks=("listops",),
        model=dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh"), local_chunk_size=64),
        run=dict(seq_len=512, batch_size=16, steps=2000, lr=2e-3, warmup=30, eval_every=50, save_every=50,
                 eval_batches=16),
        task_settings=dict(min_len=128),
    ),
}
# fmt: on


@dataclass
class ListOpsSettings(ClassifierSettings):
    min_len: int | None = setting(None, "shortest expression: training expressions are longer than this",
                                  unset="--seq-len / 4")  # fmt: skip
    eval_min_len: int | None = setting(
        None, "shortest held-out expression, for the run's evaluations and reformer eval's test set",
        unset="--min-len",
    )  # fmt: skip


class ListOpsTask(ClassificationTask):
    """ListOps expressions of ``min_len < length <= seq_len`` tokens, classified by their value."""

    name = "listops"
    about = "ListOps as in the Long Range Arena, generated (docs/encoders.md)"
    Settings = ListOpsSettings
    vocab_size = VOCAB_SIZE
    presets = PRESETS
    default_preset = "listops"

    def validate(self) -> None:
        super().validate()
        for name in ("min_len", "eval_min_len"):
            value = getattr(self.settings, name)
            if value is not None and not 0 <= value < self.cfg.seq_len:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value} must lie in [0, --seq-len {self.cfg.seq_len})")

    def min_len(self) -> int:
        """Training expressions are longer than this."""
        return self.settings.min_len if self.settings.min_len is not None else self.cfg.seq_len // 4

    def eval_min_len(self) -> int:
        """Held-out expressions (the run's evaluations, ``reformer eval``) are longer than this."""
        return self.settings.eval_min_len if self.settings.eval_min_len is not None else self.min_len()

    def describe(self) -> str:
        return (
            f"ListOps, lengths {self.min_len() + 1}-{self.cfg.seq_len} (held out: "
            f"{self.eval_min_len() + 1}-{self.cfg.seq_len}), generated on the fly"
        )

    def n_labels(self) -> int:
        return N_CLASSES

    def class_names(self) -> list[str]:
        return [str(d) for d in range(N_CLASSES)]

    def encode_text(self, text: str) -> list[int]:
        return from_text(text)

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        lo = self.min_len() if split == "train" else self.eval_min_len()
        return listops_batch(size, lo, self.cfg.seq_len + 1, generator)

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument("--n-examples", type=int, default=2000, help="generated test expressions")
        parser.add_argument("--min-len", type=int, help="test expressions are longer than this (default: "
                            "the run's --eval-min-len, else its --min-len)")  # fmt: skip

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """``--n-examples`` expressions from ``TEST_SEED``, longer than ``--min-len``."""
        lo = self.eval_min_len() if options.min_len is None else options.min_len
        if not 0 <= lo < self.cfg.seq_len:
            raise ValueError(f"--min-len {lo} must lie in [0, the run's --seq-len {self.cfg.seq_len})")
        rows, labels = listops_set(options.n_examples, lo, self.cfg.seq_len + 1, TEST_SEED)
        size = self.eval_batch_size(options)
        return (
            (pad_rows(rows[i : i + size]), torch.tensor(labels[i : i + size]))
            for i in range(0, len(rows), size)
        )


TASKS = (ListOpsTask,)
