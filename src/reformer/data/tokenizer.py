"""The ``tokenizer`` format: text read through a subword tokenizer of HF's ``tokenizers`` library (the
``[tokenizers]`` extra). ``train_tokenizer`` trains a byte-level BPE offline; ``load_tokenizer`` reads a
folder holding ``tokenizer.json`` or any local ``tokenizer.json`` whose tokens decode one by one.

Every token id stands for a fixed byte string, so ids and bytes convert exactly both ways, and the
metric stays bits per byte: the bits of the predicted tokens over the UTF-8 bytes they spell, which
makes byte and subword models comparable on the same text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .byte_corpus import load_corpus
from .corpus import IGNORE_INDEX, Corpus
from .paths import cache_dir, require

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 256  # the byte alphabet
# Text that every usable tokenizer must spell back byte for byte, token by token.
PROBE = "def f(x):\n\treturn x  # naïve café, 日本語, emoji 😀, tabs\tand  spaces\r\n{}[]<>\x00"
ENCODE_CHUNK = 1 << 18  # bytes of text per encode call when encoding a corpus


def byte_symbols() -> list[str]:
    """The printable character that stands for each byte in a byte-level BPE vocabulary (GPT-2's table):
    printable Latin-1 bytes are themselves, the others are shifted to ``chr(256 + k)``."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


class Tokenizer:
    """A ``tokenizers.Tokenizer`` whose every id spells a fixed byte string (``token_bytes``), so that
    :meth:`encode_bytes` / :meth:`decode_bytes` convert any bytes exactly."""

    def __init__(self, tokenizer, source: str) -> None:
        self.hf, self.source = tokenizer, source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.token_bytes = self._token_bytes()
        self.byte_lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        singles = {b: i for i, b in enumerate(self.token_bytes) if len(b) == 1}
        self.byte_ids = [singles.get(bytes([b])) for b in range(256)]
        spelled = b"".join(self.token_bytes[i] for i in self.encode(PROBE))
        if spelled != PROBE.encode("utf-8"):
            raise ValueError(
                f"tokenizer {source} does not spell text back token by token (a probe text came back as "
                f"{spelled[:60]!r}...), so bits per byte cannot be counted; use a byte-level BPE such as "
                "`reformer tokenizer train` makes"
            )
        self.digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    def _token_bytes(self) -> list[bytes]:
        to_byte = {s: b for b, s in enumerate(byte_symbols())}
        spelled = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is not None and token and all(c in to_byte for c in token):
                spelled.append(bytes(to_byte[c] for c in token))
            else:
                spelled.append(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return spelled

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """The ids of any bytes: UTF-8 runs through the tokenizer, each byte that is not UTF-8 as its
        single-byte token (the byte fallback), so ``decode_bytes(encode_bytes(b)) == b``."""
        ids: list[int] = []
        while data:
            try:
                return ids + self.encode(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                ids += self.encode(data[: err.start].decode("utf-8"))
                for b in data[err.start : err.end]:
                    if self.byte_ids[b] is None:
                        raise ValueError(
                            f"byte 0x{b:02x} is not UTF-8 and tokenizer {self.source} has no token for it"
                        ) from None
                    ids.append(self.byte_ids[b])
                data = data[err.end :]
        return ids

    def decode_bytes(self, ids: torch.Tensor | Sequence[int]) -> bytes:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return b"".join(self.token_bytes[int(i)] for i in values)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of ``ids`` (bytes that are not UTF-8 replaced)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/tokenizer.json`` (atomically); returns its path."""
        path = Path(folder) / TOKENIZER_FILE
        atomic_write(path, lambda tmp: tmp.write_text(self.hf.to_str(pretty=True)))
        return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A folder holding ``tokenizer.json``, or a ``tokenizer.json`` file."""
    tokenizers = require("tokenizers", "tokenizers", "tokenizers", "--tokenizer")
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"folder {path} holds no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"--tokenizer: {where}; make one with `reformer tokenizer train`")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the library raises plain Exception for unreadable JSON
        raise ValueError(f"{file} is not a tokenizers tokenizer.json ({err})") from err
    return Tokenizer(hf, str(file))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE trained on ``texts``: the 256 byte symbols are always in its vocabulary (so any
    input encodes, never to an unknown token), then merges up to ``vocab_size`` tokens. No normaliser,
    no prefix space: ``decode(encode(text)) == text``. Fewer tokens result when the text allows fewer
    merges of ``min_frequency`` occurrences."""
    tokenizers = require("tokenizers", "tokenizers", "tokenizers", "reformer tokenizer train")
    if vocab_size < MIN_VOCAB + 1:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs more than the {MIN_VOCAB} bytes")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, f"byte-level BPE of {hf.get_vocab_size()} tokens")


def text_chunks(data: np.ndarray, skipped: list[int] | None = None) -> Iterator[str]:
    """``data`` (bytes, ``uint8`` array) as text pieces cut after newlines, for training. Bytes that are
    not UTF-8 are left out of the text (their count is appended to ``skipped``); they still encode."""
    for chunk in _byte_chunks(data):
        text = chunk.decode("utf-8", errors="ignore")
        if skipped is not None:
            skipped.append(len(chunk) - len(text.encode("utf-8")))
        yield text


def _byte_chunks(data: np.ndarray) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = min(start + ENCODE_CHUNK, len(data))
        if end < len(data):
            newline = np.flatnonzero(np.asarray(data[end : end + ENCODE_CHUNK]) == 10)
            end = end + int(newline[0]) + 1 if len(newline) else min(end + ENCODE_CHUNK, len(data))
        yield bytes(np.asarray(data[start:end]))
        start = end


def encode_array(tokenizer: Tokenizer, data: np.ndarray) -> np.ndarray:
    """Token ids of ``data`` (``uint8`` bytes), cached in the cache folder by content and tokenizer;
    ``uint16`` when the vocabulary fits, else ``uint32``, memory-mapped."""
    digest = hashlib.sha256()
    for start in range(0, len(data), 1 << 24):
        digest.update(np.asarray(data[start : start + (1 << 24)]).tobytes())
    path = cache_dir() / f"tokenized-{tokenizer.digest}-{digest.hexdigest()[:16]}.npy"
    if not path.is_file():
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        ids = np.concatenate(
            [np.asarray(tokenizer.encode_bytes(chunk), dtype=dtype) for chunk in _byte_chunks(data)]
        )

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                np.save(out, ids)

        atomic_write(path, write)
    return np.load(path, mmap_mode="r")


class TokenizedCorpus(Corpus):
    """Text through a tokenizer: ids ``0 .. tokenizer.vocab_size - 1``; the metric is bits per byte of
    the text the predicted tokens spell."""

    codec = "tokenizer"

    def __init__(self, name: str, train, valid, test, tokenizer: Tokenizer, text_bytes: int) -> None:
        super().__init__(name, train, valid, test, tokenizer.vocab_size, "byte")
        self.tokenizer, self.text_bytes = tokenizer, text_bytes

    def describe(self) -> str:
        per_token = self.text_bytes / max(len(self.train) + len(self.test), 1)
        return (
            f"{self.name} through {self.tokenizer.source} ({self.vocab_size:,} tokens): "
            f"{len(self.train):,} train / {len(self.valid):,} valid / {len(self.test):,} test tokens, "
            f"{per_token:.2f} bytes per token"
        )

    def units(self, targets: torch.Tensor) -> int:
        """The UTF-8 bytes spelled by the counted ``targets``."""
        counted = targets[targets != IGNORE_INDEX].cpu().numpy()
        return int(self.tokenizer.byte_lengths[counted].sum())

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text), dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(ids)


def load_tokenized(
    paths: Sequence[str | os.PathLike] | None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    valid: str | os.PathLike | None = None,
) -> TokenizedCorpus:
    """The byte corpus of ``paths`` (see :func:`~reformer.data.byte_corpus.load_corpus`: the default
    corpus when empty, the same splits) encoded through ``tokenizer`` (a folder, a ``tokenizer.json`` or
    a :class:`Tokenizer`); the encoded splits are cached."""
    if tokenizer is None:
        raise ValueError("the tokenizer format needs --tokenizer DIR (make one: reformer tokenizer train)")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    corpus = load_corpus(paths, valid)
    train = encode_array(tokenizer, corpus.train)
    test = encode_array(tokenizer, corpus.test)
    valid_ids = test if corpus.valid is corpus.test else encode_array(tokenizer, corpus.valid)
    text_bytes = len(corpus.train) + len(corpus.test)
    return TokenizedCorpus(corpus.name, train, valid_ids, test, tokenizer, text_bytes)
