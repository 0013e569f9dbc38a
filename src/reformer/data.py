"""Byte-level corpora: the default corpus (this Python's standard library), files, random windows."""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            for file in default_corpus_files():
                if is_held_out(file, root) == (split == "test"):
                    out.write(file.read_bytes() + FILE_SEPARATOR)
        os.replace(tmp, path)
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
