"""What every data format shares: the cache folder, expanding ``--data`` paths into files, the
deterministic held-out split by file, and the message for a missing optional extra."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path

HELD_OUT_FRACTION = 0.05


def cache_dir() -> Path:
    """``$REFORMER_CACHE``, else ``~/.cache/reformer``: where corpora built from files are kept."""
    base = os.environ.get("REFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reformer")
    return Path(base)


def files_key(files: Sequence[Path], *settings: object) -> str:
    """A short hash of the files (resolved path, size, modification time) and ``settings``: the name of
    a cache entry that is rebuilt whenever a file or a setting changes."""
    parts = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    parts += [repr(s) for s in settings]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def is_held_out(path: Path, root: Path) -> bool:
    """Deterministic ~5% split by file: a hash of the path relative to ``root``."""
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "little") < HELD_OUT_FRACTION * 2**32


def expand(paths: Sequence[str | os.PathLike], flag: str = "--data") -> list[Path]:
    """Files named by ``paths``; folders are searched recursively (sorted, hidden entries skipped)."""
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
                raise FileNotFoundError(f"{flag} folder {path} holds no files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{flag} path {path} does not exist")
    return files


def split_by_file(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Training and held-out files: ~5% held out by a hash of each path below the files' common folder
    (the last ~5% of the list when the hash holds out none or all). Needs at least two files."""
    if len(files) < 2:
        raise ValueError("a split by file needs at least two files")
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    held_out = [f for f in files if is_held_out(f, root)]
    if not held_out or len(held_out) == len(files):
        held_out = files[-max(1, round(len(files) * HELD_OUT_FRACTION)) :]  # too few files to hash
    return [f for f in files if f not in held_out], held_out


def refuse_empty_splits(train: list[Path], held_out: list[Path]) -> None:
    """Raise ``ValueError`` naming the files when every training or every held-out file is empty."""
    for split, group in (("training", train), ("held-out", held_out)):
        if all(f.stat().st_size == 0 for f in group):
            names = ", ".join(str(f) for f in group[:3]) + (
                f" and {len(group) - 3} more" if len(group) > 3 else ""
            )
            raise ValueError(
                f"--data: the {split} files ({names}) are all empty; remove the empty files or add text"
            )


def common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def require(module: str, package: str, extra: str, what: str):
    """Import the optional ``module`` (installed by pip as ``package``) or fail with the pip command
    that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the {package} package, which is not installed: "
            f"pip install 'reformer[{extra}]' (or pip install {package})"
        ) from err


def check_disjoint(train: Sequence[Path], held_out: Sequence[Path]) -> None:
    """Fail when a held-out (``--valid``) file is also a training file."""
    overlap = sorted({p.resolve() for p in train} & {p.resolve() for p in held_out})
    if overlap:
        raise ValueError(f"--valid file {overlap[0]} is also a --data file; hold it out of --data")
