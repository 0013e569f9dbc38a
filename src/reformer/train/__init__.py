"""Training and evaluation: presets, AdamW with warm-up + rsqrt decay, accumulation, AMP, DDP,
atomic and exactly resumable checkpoints, metrics (JSONL + PNG), and the ``train`` / ``eval`` commands.

A run folder holds ``train_config.json`` (everything that defines the run), ``metrics.jsonl``,
``loss.png``, the latest weights as a model folder (``config.json`` + ``model.safetensors``, so
``ReformerLM.from_pretrained(run)`` works) and ``checkpoints/step-NNNNNNNN/`` folders with weights,
optimiser state, RNG states, ``trainer_state.json`` and a ``manifest.json`` of their sizes and checksums.
A checkpoint folder is written under a temporary name, flushed to the disk and renamed when complete, so
a crash never leaves a half checkpoint; ``--resume`` starts from the newest one that verifies. One
process trains into a run folder at a time (``.lock``). See docs/reliability.md.
"""

# Modules (this docstring is also `reformer train --help`'s description): config (run settings, presets,
# schedule), batches, loop, checkpoints (with the RNG states), distributed, metrics (JSONL, plot, progress
# bar), evaluation, commands (`reformer train` / `reformer eval`); the encoder tasks: encoder_tasks (mlm,
# classify, listops: data, model, objective, metrics), masking, encoder_commands (their flags, eval, predict).

from .batches import Batches
from .checkpoints import checkpoint_dirs, load_checkpoint, save_checkpoint
from .commands import (
    add_eval_arguments,
    add_train_arguments,
    config_from_args,
    resumed_config,
    run_eval,
    run_train,
)
from .config import PRESETS, TrainConfig, TrainingError, learning_rate
from .distributed import Distributed
from .evaluation import evaluate_batches, evaluate_run, load_run, sample_text
from .loop import TrainResult, train
from .metrics import MetricsLog, plot_metrics, read_metrics

__all__ = [
    "PRESETS",
    "Batches",
    "Distributed",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "add_eval_arguments",
    "add_train_arguments",
    "checkpoint_dirs",
    "config_from_args",
    "evaluate_batches",
    "evaluate_run",
    "learning_rate",
    "load_checkpoint",
    "load_run",
    "plot_metrics",
    "read_metrics",
    "resumed_config",
    "run_eval",
    "run_train",
    "sample_text",
    "save_checkpoint",
    "train",
]
