"""``--keep-best``: the weights of the run's best held-out evaluation so far, in ``RUN/best``.

A run keeps only its last ``keep_checkpoints`` checkpoints, and a model that learns a task and later loses
it (a learning rate at the edge of stability, a curriculum step too far) would lose its best weights. With
``--keep-best`` every held-out evaluation that improves on the best so far writes ``RUN/best``: a folder
that ``reformer eval``, ``generate`` and ``predict`` read as they read the run (the weights, the run's
``train_config.json`` and the task's files), with ``best.json`` saying which step and value it holds.

The task names the metric and its direction (:attr:`reformer.tasks.Task.selection`: held-out loss,
lower is better, unless the task says otherwise). A replacement is written beside the old folder and
swapped in by renames, so an interruption leaves either the old or the new one whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_write, atomic_write_text, fsync_dir
from ..tasks import Task
from .config import TRAIN_CONFIG_FILE

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestKeeper:
    """Writes ``run/best`` when an evaluation's ``task.selection`` metric beats the best so far: the value
    in ``run/best`` (a resumed run's) or, with none there, the first evaluation's."""

    def __init__(self, run: Path, task: Task) -> None:
        self.run, self.task = run, task
        self.metric, self.direction = task.selection
        if self.direction not in ("min", "max"):
            raise ValueError(f"{type(task).__name__}.selection direction {self.direction!r}: use min or max")
        _finish_swap(run)
        record = best_record(run)
        self.best = record["value"] if record and record.get("metric") == self.metric else None

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.direction == "min" else value > self.best

    def offer(self, metrics: dict[str, Any], step: int, model: nn.Module) -> bool:
        """Keep ``model`` if ``metrics[self.metric]`` is the best so far; True when it was written."""
        if self.metric not in metrics:
            raise KeyError(
                f"--keep-best: the {self.task.name} task's evaluation has no {self.metric!r} (it has "
                f"{sorted(metrics)})"
            )
        value = float(metrics[self.metric])
        if not self.better(value):
            return False
        new, final, old = (self.run / f"{BEST_DIR}{suffix}" for suffix in (".new", "", ".old"))
        shutil.rmtree(new, ignore_errors=True)
        model.save_pretrained(new)
        self.task.save_files(new)
        atomic_write(new / TRAIN_CONFIG_FILE, lambda tmp: shutil.copyfile(self.run / TRAIN_CONFIG_FILE, tmp))
        record = {"step": step, "metric": self.metric, "value": value, "direction": self.direction}
        atomic_write_text(new / BEST_FILE, json.dumps(record, indent=2) + "\n")
        if final.exists():
            final.rename(old)
        new.rename(final)
        fsync_dir(self.run)
        shutil.rmtree(old, ignore_errors=True)
        self.best = value
        return True


def _finish_swap(run: Path) -> None:
    """Complete a swap an interruption left half done: ``best.old`` without ``best`` is put back."""
    old, final = run / f"{BEST_DIR}.old", run / BEST_DIR
    if old.exists() and not final.exists():
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(run / f"{BEST_DIR}.new", ignore_errors=True)


def best_record(run: Path) -> dict[str, Any] | None:
    """What ``run/best`` holds (``step``, ``metric``, ``value``, ``direction``), or None."""
    path = run / BEST_DIR / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None
