"""One training process per run folder: a second one is refused with the holder named; a lock left by
a killed process is taken over with a message; under torchrun rank 0 holds it and every rank stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from reformer.cli import main
from reformer.train import train
from reformer.train.run_lock import LOCK_FILE, RunInUseError, RunLock
from tests.conftest import SMALL_FLAGS
from tests.conftest import small_lm_config as small_config

HOLD = """
import sys, time
from reformer.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


pytestmark = pytest.mark.usefixtures("own_cache")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def _holder(run):
    """Another process holding ``run``'s lock, as a training run would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(), stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--steps", "2", *SMALL_FLAGS]) == 0
    proc = _holder(run)
    try:
        capsys.readouterr()
        for extra in (["--resume", "--steps", "4"], ["--data", str(corpus_file), *SMALL_FLAGS]):
            assert main(["train", "--out", str(run), *extra, "--no-sample"]) == 1
            err = capsys.readouterr().err
            assert f"error: {run} is in use by another training run (process {proc.pid} on" in err
            assert "choose another --out" in err
        with pytest.raises(RunInUseError, match=f"process {proc.pid} on {socket.gethostname()}"):
            train(small_config(corpus_file, steps=4), run, resume=True)
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # The holder was killed: its lock is taken over with a message, and the run continues.
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-sample"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {run}: its holder (process {proc.pid} on" in err
    assert "is no longer running" in err
    assert (run / LOCK_FILE).read_text() == ""  # released on a clean exit


def test_the_lock_is_released_on_errors_and_taken_only_once_per_process(tmp_path, corpus_file):
    run = tmp_path / "run"
    with RunLock(run), pytest.raises(RunInUseError, match=f"process {os.getpid()}"):
        RunLock(run).acquire()
    with pytest.raises(FileNotFoundError):
        train(small_config(tmp_path / "missing.txt"), run)  # fails inside the lock
    with RunLock(run):  # free again
        pass


def test_a_dead_holder_without_flock_is_detected_by_its_process_id(tmp_path, monkeypatch, capsys):
    """Where the file system has no flock, the recorded process id decides."""
    from reformer.train import run_lock

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    proc = _holder(run)  # holds its flock, which this process cannot see
    try:
        with pytest.raises(RunInUseError, match=f"process {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(run):
        pass
    assert f"(process {proc.pid} on" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a torchrun job
def test_under_torchrun_every_rank_stops_when_the_folder_is_in_use(tmp_path, corpus_file):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port()), "-m", "reformer"]  # fmt: skip
        start = time.monotonic()
        done = subprocess.run(
            [*launcher, "train", "--data", str(corpus_file), "--out", str(run), "--device", "cpu",
             *SMALL_FLAGS],
            env={**_env(), "REFORMER_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    assert done.returncode != 0 and time.monotonic() - start < 120
    assert f"is in use by another training run (process {proc.pid}" in done.stderr
    assert "rank 0 could not lock the run folder" in done.stderr
    assert not (run / "checkpoints").exists()
