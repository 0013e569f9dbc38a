"""A run folder's settings, task and model (:func:`load_run`: what ``reformer eval``, ``reformer
predict``, the end of ``reformer train`` and scripts read), and its evaluation (:func:`evaluate_run`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ReformerConfig
from ..devices import default_device
from ..models.base import CONFIG_FILE
from ..tasks import Task, use_full_attention
from .config import TRAIN_CONFIG_FILE, TrainConfig, read_train_config


def load_run(
    run: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TrainConfig, Task, nn.Module]:
    """The settings, the task and the newest weights of a run folder written by ``reformer train``; a
    model folder (``save_pretrained``) loads as a language model whose length is its ``max_seq_len``."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder; give a run folder written by reformer train")
    if (run / TRAIN_CONFIG_FILE).is_file():
        cfg = read_train_config(run)
    else:
        config = ReformerConfig.from_json(run / CONFIG_FILE)
        cfg = TrainConfig(model=config.to_dict(), seq_len=config.max_seq_len)
    task = cfg.make_task()
    return cfg, task, task.load_model(run, device)


def eval_options(task: type[Task] | Task, **options: Any) -> argparse.Namespace:
    """The ``reformer eval`` options of ``task``'s runs: their defaults, then ``options``."""
    parser = argparse.ArgumentParser(add_help=False)
    task.add_eval_arguments(parser)
    values = parser.parse_args([])
    for name, value in options.items():
        if not hasattr(values, name):
            known = sorted(vars(values))
            raise TypeError(
                f"{name} is not an evaluation option of --task {task.name} runs; they are {known}"
            )
        setattr(values, name, value)
    return values


def evaluate(
    task: Task,
    model: nn.Module,
    options: argparse.Namespace,
    device: torch.device,
    n_hashes: int | None = None,
) -> dict[str, float]:
    """``reformer eval``: the task's test evaluation (:meth:`Task.evaluate_test`, with ``options``)."""
    if getattr(options, "full_attention", False):
        use_full_attention(model)
    return task.evaluate_test(model, options, device, n_hashes)


def evaluate_run(
    run: str | os.PathLike, n_hashes: int | None = None, device: str | None = None, **options: Any
) -> dict[str, float]:
    """The metrics ``reformer eval RUN`` prints; ``options``: the evaluation flags of the run's task
    (``max_tokens=``, ``full_attention=``, ``batch_size=``, ``data=`` ...)."""
    device = default_device(device)
    _, task, model = load_run(run, device)
    values = eval_options(task, **options)
    values.run = str(run)
    return evaluate(task, model, values, device, n_hashes)
