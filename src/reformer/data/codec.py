"""How a model's token ids read and write as text: the run folder keeps its data format
(``data_format.json``, and ``tokenizer.json`` for a tokenizer's runs), so ``reformer generate`` encodes
a prompt and spells the sampled ids the way the training data did.

One codec per format, in ``CODECS``; a folder without ``data_format.json`` is a byte model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..files import atomic_write
from .fasta import decode_bases, encode_bases
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

DATA_FORMAT_FILE = "data_format.json"


class ByteCodec:
    """Ids are bytes plus ``offset`` (HF's enwik8 checkpoints use 2)."""

    format = "bytes"

    def __init__(self, vocab_size: int, offset: int = 0) -> None:
        if offset < 0 or offset + 256 > vocab_size:
            raise ValueError(
                f"byte ids need vocab_size >= {offset + 256} with --id-offset {offset}; the model has "
                f"{vocab_size}"
            )
        self.vocab_size, self.offset = vocab_size, offset

    def encode(self, data: bytes) -> list[int]:
        return [b + self.offset for b in data]

    def spell(self, token: int) -> bytes:
        value = token - self.offset
        return bytes([value]) if 0 <= value < 256 else b""


class TokenizerCodec:
    """Ids of a subword tokenizer; every id spells a fixed byte string."""

    format = "tokenizer"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size

    def encode(self, data: bytes) -> list[int]:
        return self.tokenizer.encode_bytes(data)

    def spell(self, token: int) -> bytes:
        return self.tokenizer.token_bytes[token]


class BaseCodec:
    """Bases A C G T N (ids 0-4); the record separator spells a newline."""

    format = "fasta"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, data: bytes) -> list[int]:
        return encode_bases(data, "the prompt").tolist()

    def spell(self, token: int) -> bytes:
        return decode_bases([token]).encode("ascii")


class IdCodec:
    """Token files carry no tokenizer: prompts and samples are ids as decimal numbers."""

    format = "tokens"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="replace")
        if not re.fullmatch(r"\s*\d+(\s+\d+)*\s*", text):
            raise ValueError(
                f"a model trained on token files reads prompts as token ids separated by spaces, not "
                f"{text[:40]!r}; give the ids, or train with --tokenizer DIR to use text"
            )
        ids = [int(t) for t in text.split()]
        if max(ids) >= self.vocab_size:
            raise ValueError(f"prompt id {max(ids)} is outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def spell(self, token: int) -> bytes:
        return f"{token} ".encode("ascii")


class ImageCodec:
    """Images have no text: ``reformer generate --images N`` samples whole images instead."""

    format = "images"

    def __init__(self, vocab_size: int, size: int) -> None:
        self.vocab_size, self.size = vocab_size, size

    def encode(self, data: bytes) -> list[int]:
        raise ValueError("an image model has no text prompt; sample images with --images N --out grid.png")

    def spell(self, token: int) -> bytes:
        return f"{token} ".encode("ascii")


def save_codec(corpus, folder: str | os.PathLike) -> None:
    """Write ``folder/data_format.json`` for the model trained on ``corpus`` (and the tokenizer next to
    it when the corpus has one)."""
    info = {"format": corpus.codec, "vocab_size": int(corpus.vocab_size)}
    if corpus.codec == "images":
        info["size"] = int(corpus.size)
    tokenizer = getattr(corpus, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(folder)
    path = Path(folder) / DATA_FORMAT_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def load_codec(folder: str | os.PathLike, vocab_size: int, id_offset: int | None = None):
    """The codec of the model in ``folder`` (``vocab_size``: the model's); a folder without
    ``data_format.json`` is a byte model (``id_offset``: its byte ids' offset, only for those)."""
    path = Path(folder) / DATA_FORMAT_FILE
    if not path.is_file():
        return ByteCodec(vocab_size, id_offset or 0)
    try:
        info = json.loads(path.read_text())
        name = info["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}); delete it to read the model as bytes") from err
    if id_offset is not None and name != "bytes":
        raise ValueError(f"--id-offset is for byte models; {folder} was trained on the {name} format")
    if name not in CODECS:
        raise ValueError(f"{path}: unknown data format {name!r} (known: {', '.join(CODECS)})")
    codec = CODECS[name](Path(folder), info, vocab_size)
    if codec.vocab_size != vocab_size:
        raise ValueError(
            f"{path} describes a vocabulary of {codec.vocab_size} ids but the model has {vocab_size}"
        )
    return codec


def _tokenizer_codec(folder: Path, info: dict, vocab_size: int) -> TokenizerCodec:
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder} was trained through a tokenizer but holds no {TOKENIZER_FILE}")
    return TokenizerCodec(load_tokenizer(folder))


CODECS = {
    "bytes": lambda folder, info, vocab: ByteCodec(vocab),
    "tokenizer": _tokenizer_codec,
    "fasta": lambda folder, info, vocab: BaseCodec(info.get("vocab_size", vocab)),
    "tokens": lambda folder, info, vocab: IdCodec(info.get("vocab_size", vocab)),
    "images": lambda folder, info, vocab: ImageCodec(info.get("vocab_size", vocab), int(info["size"])),
}
