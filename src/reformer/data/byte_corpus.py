"""The ``bytes`` format: any file read as bytes (vocabulary 256, bits per byte). The default corpus is
this Python's standard library; ``enwik8`` gets its standard split."""

from __future__ import annotations

import hashlib
import os
import shutil
import sysconfig
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .corpus import Corpus
from .paths import (
    HELD_OUT_FRACTION,
    cache_dir,
    check_disjoint,
    common_root,
    expand,
    files_key,
    is_held_out,
    refuse_empty_splits,
    split_by_file,
)

FILE_SEPARATOR = b"\n\x00\n"
COPY_BLOCK = 1 << 20  # bytes per read when copying files into the cache
ENWIK8_BYTES = 100_000_000
ENWIK8_TRAIN, ENWIK8_VALID = 90_000_000, 95_000_000  # the standard 90M / 5M / 5M split


def default_corpus_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, sorted (no downloads needed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return sorted(files)


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus(split: str = "train") -> np.memmap:
    """Memory-mapped bytes of the default corpus split (``"train"`` or ``"test"``), built once into the
    cache folder (``$REFORMER_CACHE`` or ``~/.cache/reformer``) and written atomically: each file
    followed by ``FILE_SEPARATOR``."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    root = default_corpus_root()
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    path = cache_dir() / f"stdlib-{tag}-{split}.bin"
    if not path.is_file():

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for file in default_corpus_files():
                    if is_held_out(file, root) == (split == "test"):
                        out.write(file.read_bytes() + FILE_SEPARATOR)

        atomic_write(path, write)
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_corpus(
    paths: Sequence[str | os.PathLike] | None = None, valid: str | os.PathLike | None = None
) -> Corpus:
    """The byte corpus behind ``reformer train --data``.

    No paths: the default corpus (this Python's standard library, split by file, ~5% held out; valid
    and test are the same held-out files). ``enwik8`` or ``enwik8.zip``: the standard first 90M / next
    5M / last 5M bytes. One other file: its last 5% of bytes is held out. Several files or folders
    (searched recursively, hidden entries skipped): split by file like the default corpus. ``valid``:
    a file or folder held out instead (then every ``paths`` file trains). Nothing is read whole: files
    are memory-mapped, several files are concatenated once into the cache folder, each followed by
    ``FILE_SEPARATOR``.
    """
    if valid is not None:
        held_out = expand([valid], "--valid")
        files = expand(paths) if paths else default_corpus_files()
        check_disjoint(files, held_out)
        name = f"{_name(paths)}, held out: {valid}"
        train, test = _joined(files, "train"), _joined(held_out, "test")
        return Corpus(name, train, test, test)
    if not paths:
        train, test = default_corpus("train"), default_corpus("test")
        return Corpus("default corpus (Python standard library sources)", train, test, test)
    files = expand(paths)
    if len(files) == 1 and files[0].name in ("enwik8", "enwik8.zip"):
        return _enwik8(files[0])
    if len(files) == 1:
        data = _memmap(files[0])
        cut = len(data) - max(1, int(len(data) * HELD_OUT_FRACTION))
        return Corpus(str(files[0]), data[:cut], data[cut:], data[cut:])
    train_files, held_out = split_by_file(files)
    refuse_empty_splits(train_files, held_out)
    train, test = _concatenated(train_files, "train"), _concatenated(held_out, "test")
    return Corpus(f"{len(files)} files under {common_root(files)}", train, test, test)


def _name(paths: Sequence[str | os.PathLike] | None) -> str:
    if not paths:
        return "default corpus (Python standard library sources)"
    return ", ".join(str(p) for p in paths)


def _joined(files: list[Path], split: str) -> np.ndarray:
    return _memmap(files[0]) if len(files) == 1 else _concatenated(files, split)


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
    target = cache_dir() / f"enwik8-{files_key([archive])[:12]}"
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
    path = cache_dir() / f"files-{files_key(files)}-{split}.bin"
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
