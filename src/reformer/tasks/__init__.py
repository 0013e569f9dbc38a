"""Training tasks as plug-ins: one :class:`~reformer.tasks.base.Task` subclass per task, found by name.

Adding a task is one module in this package that defines its Task class(es) in a ``TASKS`` tuple, and
one line in ``MODULES`` below; nothing else names tasks. ``register`` adds a task at run time (tests,
code outside the package).
"""

from __future__ import annotations

import dataclasses
import importlib

from .base import HELD_OUT_SEED, Batch, NoSettings, Objective, Preset, Task, TrainingError, use_full_attention
from .model_settings import ModelSettings, Seq2SeqModelSettings
from .settings import setting

# The registry: the modules whose TASKS tuples hold the built-in tasks, one line each, in --help order.
MODULES = (
    "lm",
    "copy",
    "mlm",
    "classify",
    "listops",
    "seq2seq",  # reverse, sort, pairs
    "passkey",
    "recall",
)

_TASKS: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    """Make ``task`` available by its ``name`` (``reformer train --task NAME``); usable as a decorator."""
    if not getattr(task, "name", None):
        raise ValueError(f"{task.__name__} needs a name")
    _load()[task.name] = task
    return task


def unregister(name: str) -> None:
    _load().pop(name, None)


def _load() -> dict[str, type[Task]]:
    if not _TASKS:
        for module in MODULES:
            for task in importlib.import_module(f"{__name__}.{module}").TASKS:
                _TASKS[task.name] = task
    return _TASKS


def task_names() -> list[str]:
    return list(_load())


def get_task(name: str) -> type[Task]:
    """The Task class called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    tasks = _load()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(tasks)}")
    return tasks[name]


def tasks_with_setting(name: str) -> list[str]:
    """The tasks whose own settings or model settings have a field ``name``."""
    return [
        task.name
        for task in _load().values()
        if any(f.name == name for cls in (task.Settings, task.Model) for f in dataclasses.fields(cls))
    ]


def presets() -> dict[str, Preset]:
    """Every task's presets by name."""
    found: dict[str, Preset] = {}
    for task in _load().values():
        for name, preset in task.presets.items():
            if found.get(name, preset) is not preset:
                raise ValueError(f"two tasks define a preset called {name!r}; rename one")
            found[name] = preset
    return found


__all__ = [
    "HELD_OUT_SEED",
    "MODULES",
    "Batch",
    "ModelSettings",
    "NoSettings",
    "Objective",
    "Preset",
    "Seq2SeqModelSettings",
    "Task",
    "TrainingError",
    "get_task",
    "presets",
    "register",
    "setting",
    "task_names",
    "tasks_with_setting",
    "unregister",
    "use_full_attention",
]
