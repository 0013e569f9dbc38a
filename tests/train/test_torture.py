"""The torture test with a small count: ``reformer train`` killed (SIGKILL, SIGTERM, SIGINT) at random
instants and inside checkpoint writes, resumed each time, ends bit-identical to an uninterrupted run;
a 2-process job with one rank killed exits with the survivor's clear error and resumes
(scripts/torture.py; docs/reliability.md has the full-size run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a dozen launches of `reformer train`, two torchrun jobs: 2-4 minutes
def test_kills_at_random_instants_lose_nothing(tmp_path):
    summary = tmp_path / "summary.json"
    command = [sys.executable, str(ROOT / "scripts" / "torture.py"), "--kills", "8", "--signals",
               "kill,kill,term,int", "--steps", "16", "--save-every", "3", "--ddp-kills", "1", "--ddp-steps",
               "12", "--seed", "1", "--work", str(tmp_path / "work"), "--json", str(summary)]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tally = json.loads(summary.read_text())
    assert tally["failures"] == [] and tally["kills"] >= 8
    assert tally["rounds"] >= 1 and tally["identical_rounds"] == tally["rounds"]
    assert tally["ddp_kills"] == 1 and tally["ddp_clear_errors"] == 1 and tally["ddp_identical"] is True
    assert max(tally["ddp_exit_seconds"]) < 60


def test_a_dead_peers_error_becomes_one_clear_line():
    from reformer.train import Distributed, TrainingError
    from reformer.train.distributed import peer_failures

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:1681. This is typically caused by a remote worker crashing. Check the logs."
    )
    two = Distributed(rank=1, world_size=2)
    with pytest.raises(TrainingError) as caught, peer_failures(two, "runs/x"):
        raise gloo
    assert str(caught.value) == (
        "rank 1 of 2: another process of the job stopped (Connection closed by peer [127.0.0.1]:1681); "
        "the checkpoints in runs/x are intact: restart the job with --resume"
    )
    for dist, error in ((Distributed(), gloo), (two, RuntimeError("CUDA out of memory"))):
        with pytest.raises(RuntimeError) as caught, peer_failures(dist, "runs/x"):
            raise error
        assert caught.value is error  # one process, or not a peer's failure: unchanged
