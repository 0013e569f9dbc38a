"""``reformer eval``: the metrics of a trained run on its task's test data; the run's task adds its own
flags (``reformer eval RUN --help`` lists them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..devices import default_device
from ..tasks import TrainingError, get_task
from .config import TrainConfig, saved_task
from .runs import evaluate, load_run


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by reformer train (or a model folder)")
    p.add_argument("--n-hashes", type=int, help="LSH hash rounds at evaluation (default: as trained)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def add_task_eval_arguments(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """The flags of the run's task (the first folder in ``argv``; a model folder: a language model)."""
    run = next((Path(a) for a in argv if not a.startswith("-") and Path(a).is_dir()), None)
    try:
        task = get_task((run and saved_task(run)) or TrainConfig.task)
    except (ValueError, FileNotFoundError):
        return  # reported when the command loads the run
    task.add_eval_arguments(p.add_argument_group(f"runs of --task {task.name}"))


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = default_device(args.device)
    try:
        _, task, model = load_run(args.run, device)
        metrics = evaluate(task, model, args, device, args.n_hashes)
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(task.eval_lines(metrics)))
    return 0
