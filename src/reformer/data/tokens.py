"""The ``tokens`` format: token-id files made by any tokenizer. ``.npy``: a 1-D integer array (its dtype
is in its header); ``.bin``: raw little-endian ids of ``--dtype uint16|uint32``, nanoGPT's ``train.bin`` /
``val.bin`` layout. Both are memory-mapped and every id is checked against ``--vocab-size`` once."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .corpus import Corpus
from .paths import (
    HELD_OUT_FRACTION,
    cache_dir,
    check_disjoint,
    common_root,
    expand,
    files_key,
    split_by_file,
)
from .tokenizer import TokenizedCorpus, Tokenizer, load_tokenizer

TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SUFFIXES = (".npy", ".bin")
CHECK_BLOCK = 1 << 24  # ids per block when checking and copying


class TokenCorpus(Corpus):
    """Token ids with no text view: text in and out is the ids as decimal numbers."""

    codec = "tokens"

    def encode(self, text: str) -> torch.Tensor:
        """``"15496 11 995"`` -> ``tensor([15496, 11, 995])``: token files carry no tokenizer, so a
        prompt is given as ids (or name one with ``--tokenizer``)."""
        if not re.fullmatch(r"\s*\d+(\s+\d+)*\s*", text):
            raise ValueError(
                f"a model trained on token files reads prompts as token ids separated by spaces, not "
                f"{text[:40]!r}; give the ids or train with --tokenizer DIR to use text"
            )
        ids = torch.tensor([int(t) for t in text.split()], dtype=torch.long)
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"prompt id {int(ids.max())} is outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(str(int(i)) for i in values)


def is_token_path(path: Path) -> bool:
    return path.suffix in SUFFIXES


def open_token_file(path: str | os.PathLike, dtype: str | None = None) -> np.ndarray:
    """The ids of one token file as a read-only memory map, after checking its layout (not its ids:
    see :func:`check_ids`). ``dtype``: ``"uint16"`` or ``"uint32"`` for ``.bin``, None for ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty")
    if path.suffix == ".npy":
        return _open_npy(path, dtype)
    if path.suffix != ".bin":
        raise ValueError(
            f"{path} is not a token file: token files end in .npy (a 1-D integer array) or .bin (raw ids "
            "with --dtype); give text files with --format bytes or --tokenizer"
        )
    if dtype is None:
        raise ValueError(
            f"{path} is a raw .bin token file and its id width is not stored in it: pass --dtype uint16 "
            "(nanoGPT's layout) or --dtype uint32; to train on its bytes instead, pass --format bytes"
        )
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"--dtype {dtype!r} (for {path}) must be one of {', '.join(TOKEN_DTYPES)}")
    width = TOKEN_DTYPES[dtype].itemsize
    if size % width:
        raise ValueError(
            f"{path} has {size:,} bytes, not a whole number of {dtype} ids ({width} bytes each): the "
            f"file is truncated or its dtype is not {dtype}"
        )
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


def _open_npy(path: Path, dtype: str | None) -> np.ndarray:
    if dtype is not None:
        raise ValueError(f"--dtype is for raw .bin files; {path} is .npy and its header names its dtype")
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy file ({err}); write it with numpy.save") from err
    if data.ndim != 1:
        raise ValueError(
            f"{path} holds an array of shape {data.shape}; token files hold one 1-D array of ids "
            "(save the concatenated ids: numpy.save(path, ids.reshape(-1)) if its rows are one text)"
        )
    if data.dtype.kind not in "iu":
        raise ValueError(
            f"{path} holds {data.dtype} values; token ids must be integers (save ids.astype(numpy.uint32))"
        )
    if len(data) == 0:
        raise ValueError(f"token file {path} holds no ids")
    return data


def check_ids(data: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    """Fail, naming ``path``, the position and the value, unless every id is in ``0 .. vocab_size - 1``.
    Reads the file once, in blocks."""
    for start in range(0, len(data), CHECK_BLOCK):
        block = np.asarray(data[start : start + CHECK_BLOCK])
        low, high = int(block.min()), int(block.max())
        if low < 0 or high >= vocab_size:
            bad = int(np.flatnonzero((block < 0) | (block >= vocab_size))[0])
            raise ValueError(
                f"{path} holds id {int(block[bad])} at position {start + bad:,}, outside the vocabulary "
                f"0..{vocab_size - 1} (--vocab-size {vocab_size}); give the tokenizer's vocabulary size "
                "or check --dtype"
            )


def load_tokens(
    paths: Sequence[str | os.PathLike] | None,
    dtype: str | None = None,
    vocab_size: int | None = None,
    valid: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> Corpus:
    """Token files as a corpus with ``bits_per_token`` as its metric, or, with the ``tokenizer`` that
    made them (a folder, a ``tokenizer.json`` or a :class:`Tokenizer`), bits per byte of their text.

    One file: its last 5% of ids is held out; several files (or folders): ~5% of the files are held out
    (see :func:`~reformer.data.paths.split_by_file`) and the rest are joined end to end once into the
    cache folder; ``valid``: that file or folder is held out instead (nanoGPT's ``val.bin``).
    """
    if not paths:
        raise ValueError("the tokens format has no default corpus: give --data FILE.bin|FILE.npy")
    if tokenizer is not None:
        tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"--vocab-size {vocab_size} differs from the tokenizer's {tokenizer.vocab_size}; drop it"
            )
        vocab_size = tokenizer.vocab_size
        plain = load_tokens(paths, dtype, vocab_size, valid)
        train, test = plain.train, plain.test
        text_bytes = _spelled_bytes(train, tokenizer) + _spelled_bytes(test, tokenizer)
        return TokenizedCorpus(plain.name, train, plain.valid, test, tokenizer, text_bytes)
    files = expand(paths)
    for file in files:
        open_token_file(file, dtype)  # the layout first: a .bin without --dtype says so
    if vocab_size is None:
        largest = max(int(np.max(open_token_file(f, dtype))) for f in files)
        raise ValueError(
            f"token files need --vocab-size N, the tokenizer's vocabulary (every id is checked against "
            f"it); the largest id in --data is {largest}"
        )
    if vocab_size < 1:
        raise ValueError(f"--vocab-size {vocab_size} must be positive")
    if valid is not None:
        train_files, held_out = files, expand([valid], "--valid")
    elif len(files) == 1:
        data = _opened(files, dtype, vocab_size)[0]
        cut = len(data) - max(1, int(len(data) * HELD_OUT_FRACTION))
        if cut < 1:
            raise ValueError(f"{files[0]} holds {len(data)} ids, too few to hold 5% out; give --valid FILE")
        return TokenCorpus(str(files[0]), data[:cut], data[cut:], data[cut:], vocab_size, "token")
    else:
        train_files, held_out = split_by_file(files)
    check_disjoint(train_files, held_out)
    train = _joined(train_files, dtype, vocab_size, "train")
    test = _joined(held_out, dtype, vocab_size, "test")
    name = f"{len(files)} token file(s) under {common_root(files)}"
    return TokenCorpus(name, train, test, test, vocab_size, "token")


def _spelled_bytes(ids: np.ndarray, tokenizer: Tokenizer) -> int:
    total = 0
    for start in range(0, len(ids), CHECK_BLOCK):
        total += int(tokenizer.byte_lengths[np.asarray(ids[start : start + CHECK_BLOCK])].sum())
    return total


def _opened(files: list[Path], dtype: str | None, vocab_size: int) -> list[np.ndarray]:
    arrays = [open_token_file(f, dtype) for f in files]
    for array, file in zip(arrays, files, strict=True):
        check_ids(array, vocab_size, file)
    return arrays


def _joined(files: list[Path], dtype: str | None, vocab_size: int, split: str) -> np.ndarray:
    """One checked file as it is, several joined end to end into the cache folder (memory-mapped)."""
    arrays = _opened(files, dtype, vocab_size)
    if len(arrays) == 1:
        return arrays[0]
    width = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    path = cache_dir() / f"tokens-{files_key(files, dtype, width.str)}-{split}.bin"
    if not path.is_file():

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for array in arrays:
                    for start in range(0, len(array), CHECK_BLOCK):
                        out.write(np.asarray(array[start : start + CHECK_BLOCK]).astype(width).tobytes())

        atomic_write(path, write)
    return np.memmap(path, dtype=width, mode="r")
