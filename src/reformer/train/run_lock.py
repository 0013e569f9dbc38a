"""One training process per run folder: ``reformer train`` holds an exclusive lock on ``<run>/.lock``.

The lock is an ``flock`` on that file, so the operating system releases it when its holder exits in
any way (a crash and ``kill -9`` included); the file also records who holds it (process id, host, start
time, command line) for the message a second run gets. A lock left by a process that is no longer
running is taken over with a message. Under ``torchrun`` rank 0 holds it for the whole job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import fsync_dir, make_dirs
from .config import TrainingError
from .distributed import Distributed

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: only the process id check below
    fcntl = None


class RunInUseError(TrainingError):
    """Another process trains into the run folder."""


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that did not record itself"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (
        f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}: "
        f"{holder.get('command', '?')}"
    )


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """The lock on ``run``'s folder; ``acquire`` raises :class:`RunInUseError` naming the holder."""

    def __init__(self, run: str | os.PathLike) -> None:
        self.run = Path(run)
        self.path = self.run / LOCK_FILE
        self.fd: int | None = None

    def _read_holder(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        make_dirs(self.run)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            fsync_dir(self.run)
        try:
            previous = self._lock(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)}  # fmt: skip
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if previous:
            print(
                f"took over the lock of {self.run}: its holder ({_holder_text(previous)}) is no longer "
                "running", file=sys.stderr,
            )  # fmt: skip

    def _lock(self, fd: int) -> dict[str, Any]:
        """Take the lock on ``fd``; returns the record of a holder that died without releasing it."""
        busy = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
            except OSError as err:  # a file system without flock (some network mounts)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        holder = self._read_holder(fd)
        if busy is None:  # no flock: the recorded process, when it runs on this host, holds it
            busy = bool(holder) and holder.get("host") == socket.gethostname() and _is_running(
                int(holder.get("pid", 0))
            ) and holder.get("pid") != os.getpid()  # fmt: skip
        if busy:
            raise RunInUseError(
                f"{self.run} is in use by another training run ({_holder_text(holder)}); wait for it to "
                f"finish or stop it, or choose another --out"
            )
        return holder

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_lock(run: str | os.PathLike, dist: Distributed) -> Iterator[None]:
    """Hold ``run``'s lock on rank 0 while the block runs; every rank raises if rank 0 could not take it."""
    lock = RunLock(run) if dist.is_main else None
    failure: TrainingError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except TrainingError as err:
            failure = err
    if dist.all_reduce([float(failure is not None)], op="max")[0]:
        raise failure or RunInUseError(f"rank 0 could not lock the run folder {run}; see its message")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
