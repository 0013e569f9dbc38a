#!/usr/bin/env python
"""Kill ``reformer train`` at random instants, resume it each time, and check that nothing is lost.

A tiny model trains with a checkpoint every few steps. Each attempt starts ``reformer train`` (with
``--resume`` once the run has settings) and sends it a signal at a random instant: at any time, or aimed
inside a checkpoint write (``REFORMER_TEST_CHECKPOINT_PAUSE`` makes every stage of a write pause, and
the script waits for the write's temporary folder to appear). When an attempt finishes before its
signal, the round is over: its final weights and optimiser state must equal those of an uninterrupted
run bit for bit, and a new round starts. After every attempt:

* the attempt ended as its signal allows (SIGKILL: killed; SIGTERM/SIGINT: stopped after saving, or
  killed by the default handler before training started; a second SIGTERM/SIGINT: interrupted at once);
  any other ending, an ``error:`` above all, is a failed resume;
* every ``checkpoints/step-*`` folder verifies (sizes and SHA-256 of its manifest), none was set aside as
  damaged, and the newest checkpoint is no older than before the attempt (no checkpoint lost).

``--ddp-kills M``: a 2-process gloo job under torchrun; one of its ranks (chosen at random) is killed
with SIGKILL after a checkpoint; the job must exit within ``--ddp-timeout`` seconds with the survivor's
clear error, and ``--resume`` must continue; the final weights must equal an uninterrupted 2-process run.

Usage (from the repository root; about 5 s per kill on an idle 2-core machine)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/torture.py --kills 200 --json torture.json
    OMP_NUM_THREADS=1 .venv/bin/python scripts/torture.py --kills 30 --signals kill,term,int --ddp-kills 3

Exit status 0 when every check held; the summary (and ``--json``) gives the counts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from reformer.train.checkpoints import PAUSE_ENV, checkpoint_dirs, checkpoint_problem  # noqa: E402

MODEL_FLAGS = [
    "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--bucket-size", "8",
    "--attn-layers", "local,lsh", "--seq-len", "64", "--batch-size", "4", "--dropout", "0.1",
    "--eval-batches", "1", "--no-progress", "--no-sample", "--device", "cpu",
]  # fmt: skip
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def write_corpus(path: Path) -> None:
    words = random.Random(0).choices(["reformer", "hash", "bucket", "chunk", "the", "of", "attention",
                                      "memory", "layer", "a", "reversible", "sort"], k=6000)  # fmt: skip
    path.write_text(" ".join(words))


def train_command(args, corpus: Path, run: Path, steps: int, resume: bool) -> list[str]:
    return [
        sys.executable, "-m", "reformer", "train", "--data", str(corpus), "--out", str(run),
        "--steps", str(steps), "--save-every", str(args.save_every), "--eval-every", str(args.save_every * 3),
        *MODEL_FLAGS, *(["--resume"] if resume else []),
    ]  # fmt: skip


def fingerprint(run: Path) -> tuple[str, str]:
    """SHA-256 of the run folder's weights file and of the newest checkpoint's optimiser tensors."""
    weights = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    state = torch.load(checkpoint_dirs(run)[-1] / "optimizer.pt", weights_only=True)["state"]
    digest = hashlib.sha256()
    for key in sorted(state):
        for name in sorted(state[key]):
            value = state[key][name]
            digest.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.dim() else
                          str(value.item()).encode())  # fmt: skip
    return weights, digest.hexdigest()


def newest_step(run: Path) -> int:
    dirs = checkpoint_dirs(run)
    return int(dirs[-1].name[5:]) if dirs else -1


def writing(run: Path, pid: int) -> bool:
    """Whether process ``pid`` is writing or deleting a checkpoint (its temporary folder exists)."""
    root = run / "checkpoints"
    try:
        return any(p.name.startswith(".step-") and p.name.endswith(f"-{pid}") for p in root.iterdir())
    except FileNotFoundError:
        return False


def check_checkpoints(run: Path, before: int) -> list[str]:
    """Problems of ``run``'s checkpoints after an attempt (empty when none)."""
    problems = [f"{p.name}: {problem}" for p in checkpoint_dirs(run) if (problem := checkpoint_problem(p))]
    damaged = run / "checkpoints" / "damaged"
    if damaged.is_dir() and any(damaged.iterdir()):
        problems.append(f"set aside as damaged: {sorted(p.name for p in damaged.iterdir())}")
    if newest_step(run) < before:
        problems.append(f"the newest checkpoint went back from step {before} to {newest_step(run)}")
    return problems


def run_to_end(command: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``command`` to its end; returns (seconds to its first step, seconds after)."""
    start, first_step = time.monotonic(), None
    with open(log, "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            if first_step is None and started_training(log):
                first_step = time.monotonic()
            time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}); see {log}")
    end = time.monotonic()
    first_step = first_step or end
    return first_step - start, end - first_step


def expected_exit(code: int, sig: int, twice: bool) -> bool:
    if code == 0:  # finished before the signal
        return True
    if sig == signal.SIGKILL:
        return code == -signal.SIGKILL
    # Stopped after saving (128 + signal); killed by the default handler before training started; an
    # uncaught KeyboardInterrupt (SIGINT before the handler, or a second signal) exits as SIGINT does.
    return code in (128 + sig, -sig) or code == -signal.SIGINT and (twice or sig == signal.SIGINT)


def started_training(log: Path) -> bool:
    """Whether the run logging to ``log`` has built its model (its last line before the first step)."""
    return "\nmodel: " in "\n" + log.read_text()


def attempt(args, rng, corpus, run, env, timing, logs, tally) -> bool:
    """One start of ``reformer train`` into ``run`` and one signal; returns whether the run finished.
    ``timing``: [seconds to the first step, seconds a step], updated from the attempts (the machine's
    load changes), so that the random instants cover the start, the steps and the saves."""
    resume = (run / "train_config.json").is_file()
    before = newest_step(run)
    train_window = (args.steps - max(before, 0)) * timing[1]
    name = rng.choice(args.signals)
    sig, aim = SIGNALS[name], rng.choice(["anytime", "in-training", "in-training", "in-save", "in-save"])
    log = logs / f"attempt-{tally['attempts']:04d}.log"
    tally["attempts"] += 1
    with open(log, "w") as err:
        proc = subprocess.Popen(train_command(args, corpus, run, args.steps, resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        start, first_step = time.monotonic(), None
        deadline = start + (rng.uniform(0, timing[0] + train_window) if aim == "anytime" else 600)
        while proc.poll() is None and time.monotonic() < deadline:
            if aim == "in-save" and writing(run, proc.pid):
                time.sleep(rng.uniform(0, 4 * args.pause))
                break
            if first_step is None and started_training(log):
                first_step = time.monotonic()
                if aim == "in-training":
                    deadline = first_step + rng.uniform(0, train_window)
            time.sleep(0.005)
        twice = False
        if proc.poll() is None:
            in_save = writing(run, proc.pid)
            proc.send_signal(sig)
            if sig != signal.SIGKILL and rng.random() < 0.25:
                time.sleep(rng.uniform(0, 0.5))
                twice = proc.poll() is None
                if twice:
                    proc.send_signal(sig)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                tally["failures"].append(f"{log.name}: still running 120 s after {name}")
            if proc.returncode != 0:
                tally["kills"] += 1
                tally["by_signal"][name + (" twice" if twice else "")] += 1
                tally["by_aim"][aim] += 1
                tally["in_save"] += in_save
        else:
            proc.wait()
    if first_step is not None:
        timing[0] = (timing[0] + first_step - start) / 2
        if proc.returncode == 0 and args.steps > max(before, 0):
            timing[1] = (timing[1] + (time.monotonic() - first_step) / (args.steps - max(before, 0))) / 2
    text = log.read_text()
    tally["leftovers_removed"] += text.count("a checkpoint write that was interrupted")
    crashed = "Traceback" in text and "KeyboardInterrupt" not in text
    if not expected_exit(proc.returncode, sig, twice) or "error:" in text or crashed:
        tail = " | ".join(text.strip().splitlines()[-3:])
        tally["failures"].append(f"{log.name}: exit {proc.returncode} after {name}: {tail}")
    for problem in check_checkpoints(run, before):
        tally["failures"].append(f"{log.name}: {problem}")
    return proc.returncode == 0


def torture(args, work: Path, corpus: Path, env: dict, tally) -> None:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    reference = work / "reference"
    timing = run_to_end(
        train_command(args, corpus, reference, args.steps, False), env, logs / "reference.log"
    )
    expected = fingerprint(reference)
    print(
        f"uninterrupted run: {timing[0]:.1f} s to start, {args.steps} steps in {timing[1]:.1f} s", flush=True
    )
    timing = [timing[0], timing[1] / args.steps]
    rng = random.Random(args.seed)
    rounds = 0

    def done() -> bool:
        return tally["kills"] >= args.kills or time.monotonic() > args.deadline

    while not done() or rounds == 0 or tally["attempts"] == 0:
        run = work / f"round-{rounds:03d}"
        rounds += 1
        while not attempt(args, rng, corpus, run, env, timing, logs, tally):
            if done():  # the last round: finish it without signals
                resume = (run / "train_config.json").is_file()
                run_to_end(
                    train_command(args, corpus, run, args.steps, resume), env, logs / f"{run.name}-end.log"
                )
                break
        tally["rounds"] += 1
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".step-")]
        if leftovers:
            tally["failures"].append(f"{run.name}: left behind after the last attempt: {leftovers}")
        same = fingerprint(run) == expected
        tally["identical_rounds"] += same
        if not same:
            tally["failures"].append(
                f"{run.name}: final weights or optimiser state differ from the uninterrupted run"
            )
        print(f"{run.name}: {tally['kills']} signals so far, {len(tally['failures'])} failures, "
              f"bit-identical: {same}; start {timing[0]:.1f} s, {timing[1]:.2f} s a step",
              flush=True)  # fmt: skip
        if same and not args.keep:
            subprocess.run(["rm", "-rf", str(run)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers(parent: int) -> list[int]:
    """Process ids of ``parent``'s children that are torchrun workers (Linux /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(Path(stat).read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(stat).with_name("environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"\0RANK=" in b"\0" + environ:
            found.append(int(Path(stat).parent.name))
    return found


def ddp(args, work: Path, corpus: Path, env: dict, tally) -> None:
    def command(run: Path, resume: bool) -> list[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
        return [*launcher, *train_command(args, corpus, run, args.ddp_steps, resume)[1:]]

    logs = work / "logs"
    reference, run = work / "ddp-reference", work / "ddp-run"
    run_to_end(command(reference, False), env, logs / "ddp-reference.log")
    rng = random.Random(args.seed + 1)
    for i in range(args.ddp_kills):
        log = logs / f"ddp-{i:02d}.log"
        before = newest_step(run)
        with open(log, "w") as err:
            proc = subprocess.Popen(command(run, (run / "train_config.json").is_file()), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
            while proc.poll() is None and newest_step(run) <= before:  # killed once it saved something
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 1.0))
            ranks = workers(proc.pid)
            if proc.poll() is not None or not ranks:
                tally["failures"].append(f"{log.name}: the job ended before a rank could be killed")
                proc.wait()
                continue
            os.kill(rng.choice(ranks), signal.SIGKILL)
            killed = time.monotonic()
            try:
                proc.wait(timeout=args.ddp_timeout)
            except subprocess.TimeoutExpired:
                tally["failures"].append(
                    f"{log.name}: the job still ran {args.ddp_timeout} s after a rank died"
                )
                proc.kill()
                proc.wait()
        tally["ddp_kills"] += 1
        tally["ddp_exit_seconds"].append(round(time.monotonic() - killed, 2))
        text = log.read_text()
        tally["ddp_clear_errors"] += "another process of the job stopped" in text
        for problem in check_checkpoints(run, before):
            tally["failures"].append(f"{log.name}: {problem}")
    run_to_end(command(run, True), env, logs / "ddp-end.log")
    tally["ddp_identical"] = fingerprint(run) == fingerprint(reference)
    if not tally["ddp_identical"]:
        tally["failures"].append("ddp: final weights or optimiser state differ from the uninterrupted job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="signals to send in all (default 20)")
    parser.add_argument("--signals", default="kill", help="comma-separated: kill, term, int (default kill)")
    parser.add_argument("--steps", type=int, default=40, help="steps of each run (default 40)")
    parser.add_argument("--save-every", type=int, default=4, help="steps between checkpoints (default 4)")
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds at each stage of a checkpoint write"
    )
    parser.add_argument(
        "--ddp-kills", type=int, default=0, help="ranks to kill in a 2-process job (default 0)"
    )
    parser.add_argument("--ddp-steps", type=int, default=24, help="steps of the 2-process job (default 24)")
    parser.add_argument("--ddp-timeout", type=float, default=60.0, help="seconds the job may take to exit")
    parser.add_argument(
        "--minutes", type=float, default=None,
        help="send no signal after this many minutes (the round under way then finishes without one)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep every round's run folder")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    args.signals = [s.strip() for s in args.signals.split(",")]
    if not set(args.signals) <= set(SIGNALS):
        parser.error(f"--signals {args.signals}: each must be one of {sorted(SIGNALS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="torture-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    write_corpus(corpus)
    env = {**os.environ, "REFORMER_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), PAUSE_ENV: str(args.pause)}  # fmt: skip
    tally = {"attempts": 0, "kills": 0, "by_signal": Counter(), "by_aim": Counter(), "in_save": 0,
             "leftovers_removed": 0, "rounds": 0, "identical_rounds": 0, "ddp_kills": 0,
             "ddp_exit_seconds": [], "ddp_clear_errors": 0, "ddp_identical": None,
             "failures": []}  # fmt: skip
    start = time.monotonic()
    args.deadline = start + 60 * args.minutes if args.minutes is not None else float("inf")
    torture(args, work, corpus, env, tally)
    if args.ddp_kills:
        ddp(args, work, corpus, env, tally)
    tally["seconds"] = round(time.monotonic() - start)
    tally["work"] = str(work)
    print(json.dumps(tally, indent=2, default=dict))
    if args.json:
        Path(args.json).write_text(json.dumps(tally, indent=2, default=dict) + "\n")
    return 1 if tally["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
