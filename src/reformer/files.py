"""Files written atomically and durably: into a temporary file beside the target, flushed to the disk
(``fsync``), renamed over the target, and the folder flushed too, so that a reader, or a run resumed
after a crash or a power cut, sees the old file or the new one, never half of one nor an empty one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data and size to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush ``path``'s entries (files created, renamed or removed in it) to the disk. A no-op where
    folders cannot be opened for that (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on a folder; the rename is still atomic
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """``mkdir -p`` that also flushes each created folder's parent, so the new folders survive a crash."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_dir(folder.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Create ``path``'s folder if needed, call ``write(tmp)`` with a temporary path in that folder, flush
    it to the disk, rename it over ``path`` and flush the folder. The file gets a normal mode (0666 less
    the umask); on any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text``."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
