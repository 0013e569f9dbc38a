"""Training and evaluation: presets, AdamW with warm-up and an rsqrt or cosine decay, accumulation,
AMP, DDP, atomic and exactly resumable checkpoints, metrics (JSONL + PNG), and the ``train`` / ``eval`` /
``predict`` commands. What differs between tasks (data, model, loss, metrics) is the task's
(:mod:`reformer.tasks`).

A run folder holds ``train_config.json`` (everything that defines the run), ``metrics.jsonl``,
``loss.png``, the latest weights as a model folder (``config.json`` + ``model.safetensors``, so
``ReformerLM.from_pretrained(run)`` works) and ``checkpoints/step-NNNNNNNN/`` folders with weights,
optimiser state, RNG states, ``trainer_state.json`` and a ``manifest.json`` of their sizes and checksums.
A checkpoint folder is written under a temporary name, flushed to the disk and renamed when complete, so
a crash never leaves a half checkpoint; ``--resume`` starts from the newest one that verifies. One
process trains into a run folder at a time (``.lock``). See docs/reliability.md.
"""

# Modules (this docstring is also `reformer train --help`'s description): config (run settings,
# train_config.json, presets, schedule), loop, checkpoints (with the RNG states), distributed, metrics
# (JSONL, plot, progress bar), runs (load_run, evaluate_run), train_command / eval_command /
# predict_command (the commands).

from .checkpoints import checkpoint_dirs, load_checkpoint, save_checkpoint
from .config import TrainConfig, TrainingError, learning_rate, preset_config, read_train_config
from .distributed import Distributed
from .eval_command import add_eval_arguments, add_task_eval_arguments, run_eval
from .loop import TrainResult, train
from .metrics import MetricsLog, plot_metrics, read_metrics
from .runs import evaluate_run, load_run
from .train_command import (
    add_task_arguments,
    add_train_arguments,
    config_from_args,
    parse_train_args,
    resumed_config,
    run_train,
)

__all__ = [
    "Distributed",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "add_eval_arguments",
    "add_task_arguments",
    "add_task_eval_arguments",
    "add_train_arguments",
    "checkpoint_dirs",
    "config_from_args",
    "evaluate_run",
    "learning_rate",
    "load_checkpoint",
    "load_run",
    "parse_train_args",
    "plot_metrics",
    "preset_config",
    "read_metrics",
    "read_train_config",
    "resumed_config",
    "run_eval",
    "run_train",
    "save_checkpoint",
    "train",
]
