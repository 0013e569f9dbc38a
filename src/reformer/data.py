"""Byte-level corpora: the default corpus (this Python's standard library), user files, enwik8, random
and contiguous windows."""

from __future__ import annotations

import hashlib
import os
import shutil
import sysconfig
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write

HELD_OUT_FRACTION = 0.05
FILE_SEPARATOR = b"\n\x00\n"


def default_corpus_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, sorted (no downloads needed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return sorted(files)


def is_held_out(path: Path, root: Path) -> bool:
    """Deterministic ~5% split by file: a hash of the path relative to ``root``."""
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "little") < HELD_OUT_FRACTION * 2**32


def _cache_dir() -> Path:
    base = os.environ.get("REFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reformer")
    return Path(base)


def default_corpus(split: str = "train") -> np.memmap:
    """Memory-mapped bytes of the default corpus split (``"train"`` or ``"test"``), built once into a
    cache folder (``$REFORMER_CACHE`` or ``~/.cache/reformer``) and written atomically."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    root = Path(sysconfig.get_paths()["stdlib"])
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    path = _cache_dir() / f"stdlib-{tag}-{split}.bin"
    if not path.is_file():

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for file in default_corpus_files():
                    if is_held_out(file, root) == (split == "test"):
                        out.write(file.read_bytes() + FILE_SEPARATOR)

        atomic_write(path, write)
    return np.memmap(path, dtype=np.uint8, mode="r")


def random_windows(
    data: np.ndarray, length: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``length + 1`` bytes: inputs and next-byte targets, both
    ``(batch_size, length)`` int64."""
    if len(data) <= length + 1:
        raise ValueError(
            f"corpus has {len(data)} bytes, too few for windows of {length + 1}; lower --seq-len"
        )
    starts = torch.randint(0, len(data) - length - 1, (batch_size,), generator=generator).tolist()
    return windows_at(data, starts, length)


def contiguous_windows(
    data: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Back-to-back windows over ``data`` (or its first ``max_tokens + 1`` bytes) so that every byte after
    the first is predicted once: batches of up to ``batch_size`` windows of ``seq_len``, then the shorter
    remainder on its own. Yields inputs and next-byte targets, both ``(n, length)`` int64."""
    limit = len(data) - 1 if max_tokens is None else min(len(data) - 1, max_tokens)
    full = limit // seq_len
    for first in range(0, full, batch_size):
        starts = range(first * seq_len, min(first + batch_size, full) * seq_len, seq_len)
        yield windows_at(data, starts, seq_len)
    if limit % seq_len:
        yield windows_at(data, [full * seq_len], limit % seq_len)


def windows_at(data: np.ndarray, starts: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of ``length + 1`` bytes at ``starts``: inputs and next-byte targets, both
    ``(len(starts), length)`` int64."""
    windows = torch.from_numpy(
        np.stack([np.asarray(data[s : s + length + 1]) for s in starts]).astype(np.int64)
    )
    return windows[:, :-1], windows[:, 1:]


def decode_bytes(ids: torch.Tensor | list[int]) -> str:
    """Bytes ``0..255`` to text (invalid UTF-8 replaced)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(int(i) for i in values).decode("utf-8", errors="replace")


def encode_text(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor ``(length,)``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


# ---- user corpora ----------------------------------------------------------------------------------

COPY_BLOCK = 1 << 20  # bytes per read when copying files into the cache
ENWIK8_BYTES = 100_000_000
ENWIK8_TRAIN, ENWIK8_VALID = 90_000_000, 95_000_000  # the standard 90M / 5M / 5M split


@dataclass
class Corpus:
    """A byte corpus split three ways; each split is a read-only ``uint8`` memory map (or a view)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train):,} train / {len(self.valid):,} valid / "
            f"{len(self.test):,} test bytes"
        )


def load_corpus(paths: Sequence[str | os.PathLike] | None = None) -> Corpus:
    """The byte corpus behind ``reformer train --data``.

    No paths: the default corpus (this Python's standard library, split by file, ~5% held out; valid
    and test are the same held-out files). ``enwik8`` or ``enwik8.zip``: the standard first 90M / next
    5M / last 5M bytes. One other file: its last 5% of bytes is held out. Several files or folders
    (searched recursively, hidden entries skipped): split by file like the default corpus. Nothing is
    read whole: files are memory-mapped, several files are concatenated once into the cache folder.
    """
    if not paths:
        train, test = default_corpus("train"), default_corpus("test")
        return Corpus("default corpus (Python standard library sources)", train, test, test)
    files = _expand(paths)
    if len(files) == 1 and files[0].name in ("enwik8", "enwik8.zip"):
        return _enwik8(files[0])
    if len(files) == 1:
        data = _memmap(files[0])
        cut = len(data) - max(1, int(len(data) * HELD_OUT_FRACTION))
        return Corpus(str(files[0]), data[:cut], data[cut:], data[cut:])
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    held_out = [f for f in files if is_held_out(f, root)]
    if not held_out or len(held_out) == len(files):
        held_out = files[-max(1, round(len(files) * HELD_OUT_FRACTION)) :]  # too few files to hash
    train = _concatenated([f for f in files if f not in held_out], "train")
    test = _concatenated(held_out, "test")
    return Corpus(f"{len(files)} files under {root}", train, test, test)


def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)
            )
            if not found:
                raise FileNotFoundError(f"--data folder {path} holds no files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"--data path {path} does not exist")
    return files


def _memmap(path: Path) -> np.memmap:
    if path.stat().st_size == 0:
        raise ValueError(f"--data file {path} is empty")
    return np.memmap(path, dtype=np.uint8, mode="r")


def _enwik8(path: Path) -> Corpus:
    if path.suffix == ".zip":
        path = _unzipped_enwik8(path)
    data = _memmap(path)
    if len(data) != ENWIK8_BYTES:
        raise ValueError(
            f"{path} has {len(data):,} bytes, but enwik8 has {ENWIK8_BYTES:,}; the file is truncated or "
            "not enwik8 (rename it to train on it as plain bytes)"
        )
    return Corpus("enwik8", data[:ENWIK8_TRAIN], data[ENWIK8_TRAIN:ENWIK8_VALID], data[ENWIK8_VALID:])


def _unzipped_enwik8(archive: Path) -> Path:
    stat = archive.stat()
    tag = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_dir() / f"enwik8-{tag}"
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(archive) as zipped, zipped.open("enwik8") as member:
            atomic_write(target, lambda tmp: _copy_to(member, tmp))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive} is not a valid zip file ({err}); download enwik8.zip again") from err
    except KeyError as err:
        raise ValueError(f"{archive} has no member named 'enwik8'") from err
    return target


def _concatenated(files: list[Path], split: str) -> np.memmap:
    """The files joined by ``FILE_SEPARATOR``, written once into the cache folder, memory-mapped."""
    key = "\n".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    path = _cache_dir() / f"files-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{split}.bin"
    if not path.is_file():

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for file in files:
                    with open(file, "rb") as source:
                        shutil.copyfileobj(source, out, COPY_BLOCK)
                    out.write(FILE_SEPARATOR)

        atomic_write(path, write)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _copy_to(source, path: Path) -> None:
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, COPY_BLOCK)


# Targets with this id do not count in a loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
