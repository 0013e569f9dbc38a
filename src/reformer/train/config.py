"""The settings of a training run (``train_config.json``), the presets, and the learning-rate schedule.

``train_config.json`` (``"format": 2``) holds the run settings at the top level, ``"task"``, the model
settings under ``"model"`` (every field of the task's :class:`~reformer.tasks.ModelSettings`; null:
derived from the task and the length) and the task's own settings under ``"task_settings"``.
``reformer train --config FILE`` reads the same layout, any part of it. Runs saved before this layout
(flat task settings, a partial ``"model"``) are read by :func:`from_legacy_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import read_json_object
from ..tasks import ModelSettings, Task, TrainingError, get_task, presets, tasks_with_setting
from ..tasks import settings as typed
from ..tasks.settings import setting
from .loggers import check_logger_names
from .precision import HELP as PRECISION_HELP
from .precision import PRECISIONS

TRAIN_CONFIG_FILE = "train_config.json"
FORMAT = 2
SCHEDULES = ("rsqrt", "cosine")
# Settings of the old flat layout that belonged to tasks; a task that lacks one ignored it.
LEGACY_TASK_KEYS = ("data", "valid", "init", "truncate", "labels", "min_len", "curriculum_start",
                    "curriculum_loss", "eval_min_len", "pooling")  # fmt: skip

__all__ = ["PRECISIONS", "SCHEDULES", "TRAIN_CONFIG_FILE", "TrainConfig", "TrainingError", "learning_rate"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``): the task, its settings
    (``task_settings``, the task's ``Settings`` dataclass), the model settings (``model``, the task's
    ``Model`` class) and the run settings below. ``model`` and ``task_settings`` may be given as dicts
    of their fields (None: the defaults)."""

    task: str = "lm"
    model: ModelSettings = None
    task_settings: Any = None
    seq_len: int = setting(512, "tokens per sequence")
    batch_size: int = setting(8, "sequences per optimiser step over all processes and accumulation steps")
    grad_accum: int = setting(1, "micro-batches per optimiser step")
    steps: int = setting(300, "optimiser steps in total (a resumed run continues to this)")
    lr: float = setting(6e-3, "peak learning rate")
    warmup: int = setting(50, "linear warm-up steps")
    schedule: str = setting(
        "rsqrt", "rsqrt (independent of --steps) or cosine (to --cosine-steps)", choices=SCHEDULES
    )
    cosine_steps: int | None = setting(
        None,
        "horizon of the cosine schedule; unset, it follows --steps, a resumed run's new --steps too",
        unset="--steps",
    )
    min_lr_ratio: float = 0.1
    weight_decay: float = setting(0.01, "AdamW's weight decay")
    beta1: float = 0.9
    beta2: float = 0.98
    clip: float | None = setting(1.0, "gradient-norm clipping (0: none)", unset="none")
    precision: str = setting("auto", PRECISION_HELP, choices=PRECISIONS)
    eval_every: int = setting(100, "steps between held-out evaluations")
    eval_batches: int = setting(8, "held-out batches per evaluation")
    save_every: int = setting(100, "steps between checkpoints")
    keep_checkpoints: int = 2
    keep_best: bool = setting(
        False,
        "also keep the weights of the best held-out evaluation so far in RUN/best (the task's "
        "metric: loss, or accuracy for passkey and recall); reformer eval RUN/best reads them",
        action="store_true",
    )
    log_every: int = setting(10, "steps between metrics lines")
    log: list[str] = setting(
        default_factory=list,
        help="loggers beside metrics.jsonl: tensorboard (RUN/tensorboard; the [tensorboard] extra) or one "
        "registered with reformer.train.loggers.register_logger",
        metavar="NAME",
    )
    max_minutes: float | None = setting(None, "stop (and save) after this much wall time", unset="no limit")
    skip_nonfinite: int = setting(
        0,
        "skip up to this many steps whose loss is NaN or infinite (no update; skipped_steps in "
        "metrics.jsonl) before stopping",
    )
    seed: int = setting(0, "seed of the weights, the data and the hash rotations")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", action="store_false")

    def __post_init__(self) -> None:
        task = get_task(self.task)
        self.model = _as_settings(task.Model, self.model, self.task, "model")
        self.task_settings = _as_settings(task.Settings, self.task_settings, self.task, "task_settings")

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("steps", "warmup", "skip_nonfinite"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be positive (or None for no clipping)")
        if self.cosine_steps is not None and (
            not isinstance(self.cosine_steps, int) or self.cosine_steps < 1
        ):
            raise ValueError(
                f"cosine_steps={self.cosine_steps!r} must be a positive integer or None (--steps)"
            )
        check_logger_names(self.log)
        self.make_task().validate()

    def make_task(self) -> Task:
        """The run's task, reading these settings."""
        return get_task(self.task)(self)

    def model_config(self):
        return self.make_task().model_config()

    def run_settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NESTED}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.task,
            **self.run_settings(),
            "model": typed.to_dict(self.model),
            "task_settings": typed.to_dict(self.task_settings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A saved ``train_config.json``: this layout, or the flat one of older runs."""
        if "format" not in data:
            return from_legacy_dict(data)
        return cls(**current_layout(data, "train_config"))


NESTED = ("task", "model", "task_settings")


def _as_settings(cls: type, value: Any, task: str, what: str):
    """``value`` (None, a dict of fields, or settings of another task) as ``cls``; a field another task
    has is named with the tasks that take it."""
    if isinstance(value, cls) and type(value) is cls:
        return value
    data = {} if value is None else value if isinstance(value, dict) else typed.to_dict(value)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known and tasks_with_setting(name):
            raise ValueError(other_tasks_setting(name, task))
    return typed.from_dict(cls, data, f"--task {task} {what.replace('_', ' ')}")


def other_tasks_setting(name: str, task: str) -> str:
    """The message for a setting of other tasks given to ``task``."""
    flag = "--" + name.replace("_", "-")
    return f"{flag} is for --task {' / '.join(tasks_with_setting(name))}, not --task {task}"


def current_layout(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of ``data`` (a whole or partial ``train_config.json`` of this layout) without its
    ``format``; an unknown format or key is a ``ValueError`` that names ``where``."""
    if data.get("format", FORMAT) != FORMAT:
        raise ValueError(
            f"{where}: train_config format {data['format']!r} is unknown; this version reads {FORMAT}"
        )
    data = {k: v for k, v in data.items() if k != "format"}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown train_config keys {unknown}; the keys are {sorted(known)}")
    return data


def from_legacy_dict(data: dict[str, Any]) -> TrainConfig:
    """A ``train_config.json`` of the flat layout: task settings at the top level (those the task does
    not have were ignored by it), ``"model"`` holding only what the preset and flags set. A run saved
    before ``lsh_key_rule`` existed keeps ``"chunks"``."""
    data = dict(data)
    task = get_task(data.pop("task", TrainConfig.task))
    model = {"lsh_key_rule": "chunks", **data.pop("model", {})}
    own = {f.name for f in dataclasses.fields(task.Settings)}
    task_settings = {k: data.pop(k) for k in LEGACY_TASK_KEYS if k in data and k in own}
    for key in LEGACY_TASK_KEYS:
        data.pop(key, None)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(NESTED)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown train_config keys {unknown}; known keys are {sorted(known)}")
    return TrainConfig(task=task.name, model=model, task_settings=task_settings, **data)


def read_train_config(run: str | Path) -> TrainConfig:
    """The settings of the run folder ``run``."""
    return TrainConfig.from_dict(read_json_object(Path(run) / TRAIN_CONFIG_FILE, "the run folder is damaged"))


def saved_task(run: str | Path) -> str | None:
    """The task of the run folder ``run`` (None: no run there)."""
    path = Path(run) / TRAIN_CONFIG_FILE
    return (
        read_json_object(path, "the run folder is damaged").get("task", TrainConfig.task)
        if path.is_file()
        else None
    )


def preset_config(name: str, task: str | None = None) -> TrainConfig:
    """The settings of preset ``name`` for ``task`` (default: the preset's own task)."""
    found = presets()
    if name not in found:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(sorted(found))}")
    preset = found[name]
    task = task or preset.task
    if preset.tasks is not None and task not in preset.tasks:
        fitting = sorted(n for n, p in found.items() if p.tasks is None or task in p.tasks)
        raise ValueError(
            f"--preset {name} is a {preset.task}-task preset; drop --task {task} or pick one of "
            f"{', '.join(fitting)}"
        )
    return TrainConfig(
        task=task, model=dict(preset.model), task_settings=dict(preset.task_settings), **preset.run
    )


def default_preset(task: str | None) -> str:
    """The preset a task starts from when --preset is not given."""
    return get_task(task or TrainConfig.task).default_preset


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based).

    ``rsqrt``: linear warm-up to ``lr`` then ``lr * sqrt(warmup / step)``, as in the paper's
    configurations; it does not depend on ``steps``, so extending a run follows the same curve.
    ``cosine``: warm-up then a cosine from ``lr`` to ``lr * min_lr_ratio`` over ``cosine_steps`` (None:
    over ``steps``, so a run resumed with more steps stretches the rest of its curve to the new end);
    steps past the horizon train at the floor ``lr * min_lr_ratio``.
    """
    step = step + 1
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "rsqrt":
        return cfg.lr * warm * math.sqrt(max(cfg.warmup, 1) / max(step, cfg.warmup, 1))
    horizon = cfg.cosine_steps or cfg.steps
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, horizon - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return warm * (floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_change(saved: TrainConfig, resumed: TrainConfig, step: int) -> str | None:
    """What resuming ``saved`` at ``step`` as ``resumed`` does to a cosine schedule, in words (None when
    nothing changes): a stretched horizon raises the learning rate, a fixed one that ends before the
    new ``steps`` leaves the extra steps at the floor."""
    if resumed.schedule != "cosine" or step >= resumed.steps:
        return None
    before, after = saved.cosine_steps or saved.steps, resumed.cosine_steps or resumed.steps
    lr_before, lr_after = learning_rate(saved, step), learning_rate(resumed, step)
    if after != before:
        keep = f"--cosine-steps {before}"
        return (
            f"cosine schedule: its horizon moves from step {before} to {after}, so the learning rate at "
            f"step {step + 1} is {lr_after:.3g} instead of {lr_before:.3g} and decays to the floor at step "
            f"{after} (pass {keep} to keep the old curve)"
        )
    if after < resumed.steps:
        return (
            f"cosine schedule: its horizon is step {after} (--cosine-steps), so steps "
            f"{max(step, after) + 1} to {resumed.steps} train at the floor learning rate "
            f"{resumed.lr * resumed.min_lr_ratio:.3g} (pass --cosine-steps {resumed.steps} to stretch the "
            "curve to the new end)"
        )
    return None
