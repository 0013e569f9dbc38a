"""The :class:`Task` every training task implements, its :class:`Preset` s, and what they share.

A task owns everything that differs between tasks: its settings (a dataclass whose fields make the
``reformer train`` flags of ``--task NAME``), its model, its training and held-out batches, the loss of
a batch, the evaluation of a model (the training loop and ``reformer eval`` call the same
:meth:`Task.evaluate`), what ``reformer train`` prints at the end, and any state beyond the random
generators that a resumed run needs. The loop and the commands only call these methods.

A batch is a tuple of tensors whose first dimension is the batch; by default ``(inputs, targets)`` with
``IGNORE_INDEX`` at targets that do not count. Every random choice draws from the generator passed in,
so a run's data does not depend on the process count and resumes exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..attention import LSHSelfAttention
from ..data import IGNORE_INDEX
from ..models import ReformerLM
from .model_settings import ModelSettings

# The generator seed of the fixed held-out batches of a run's periodic evaluations (apart from the
# training seed, so evaluating never moves the training data).
HELD_OUT_SEED = 12345

Batch = tuple[torch.Tensor, ...]


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class NoSettings:
    """The settings of a task that has none of its own."""


@dataclass(frozen=True)
class Preset:
    """Settings to start a run from: ``run`` (:class:`~reformer.train.TrainConfig` fields), ``model``
    (:class:`ModelSettings` fields) and ``task_settings``. ``--preset NAME`` alone trains ``task``;
    ``tasks`` are the tasks that may start from it (None: every task)."""

    task: str
    about: str
    run: dict[str, Any]
    model: dict[str, Any]
    task_settings: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None


class RunSettings(Protocol):
    """What a task reads of the run's settings (:class:`~reformer.train.TrainConfig`)."""

    task: str
    task_settings: Any
    model: ModelSettings
    seq_len: int
    batch_size: int
    eval_batches: int


class Objective(nn.Module):
    """``forward(inputs, targets)`` -> ``model(inputs, targets=targets)``, the mean loss over the counted
    targets: what the loop differentiates (and DDP wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, targets=targets)


class Task:
    """A training task; subclasses set the class attributes and override what differs.

    Class attributes: ``name`` (``--task NAME``), ``about`` (its line in ``--help``), ``Settings`` (the
    dataclass of its own settings, fields made with :func:`~reformer.tasks.settings.setting`), ``Model``
    (its model settings class), ``model_class`` (what :meth:`build_model` / :meth:`load_model` make),
    ``vocab_size`` and ``causal`` (the model's, where the model settings leave them None), ``presets``
    (named :class:`Preset` s it adds) and ``default_preset``, ``sequence_parallel`` (the objective runs
    under ``--sequence-parallel``), ``loss_in_bits`` (progress bar and plot in bits per byte),
    ``selection`` (the held-out metric and direction, ``"min"`` or ``"max"``, that ``--keep-best`` ranks
    evaluations by) and ``held_out_seed``.
    """

    name: ClassVar[str]
    about: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    Model: ClassVar[type[ModelSettings]] = ModelSettings
    model_class: ClassVar[type[nn.Module]] = ReformerLM
    vocab_size: ClassVar[int] = 256
    causal: ClassVar[bool] = True
    presets: ClassVar[dict[str, Preset]] = {}
    default_preset: ClassVar[str] = "tiny"
    sequence_parallel: ClassVar[bool] = False
    loss_in_bits: ClassVar[bool] = False
    selection: ClassVar[tuple[str, str]] = ("loss", "min")
    held_out_seed: ClassVar[int] = HELD_OUT_SEED

    def __init__(self, cfg: RunSettings) -> None:
        self.cfg = cfg
        self.settings = cfg.task_settings

    # ---- settings --------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and the fix for settings this task cannot use."""

    @classmethod
    def finish_config(cls, cfg: RunSettings, given: set[str]) -> None:
        """Complete ``cfg`` once the command line is applied (``given``: the settings it named)."""

    # ---- data ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read the task's data: called once when training starts, before the model is built (may record
        settings such as the classes). A run loaded for ``reformer eval`` or the report after training
        is not prepared: what those use reads its data itself (a ``cached_property`` serves both)."""

    def save_files(self, folder: Path) -> None:
        """Write what the task keeps beside the model in the run folder (its data format, a tokenizer),
        once the data is read; called on the main process when a run starts or resumes."""

    def describe(self) -> str:
        """One line on the data, printed when training starts."""
        return f"{self.name} task, length {self.cfg.seq_len}"

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """``size`` examples of ``split`` ("train" or "valid") drawn with ``generator``."""
        raise NotImplementedError

    def held_out(self) -> list[Batch]:
        """The same ``eval_batches`` batches at every evaluation, so the curve is comparable."""
        generator = torch.Generator().manual_seed(self.held_out_seed)
        size = min(self.cfg.batch_size, 8)
        return [self.batch(size, generator, "valid") for _ in range(self.cfg.eval_batches)]

    def target_count(self, batch: Batch) -> int:
        """The targets a batch's mean loss is over: the loop weights each micro-batch's loss by its share
        of the step's targets, so an accumulated step is the mean over all of them."""
        return int((batch[1] != IGNORE_INDEX).sum())

    # ---- model -----------------------------------------------------------------------------------

    def model_config(self) -> Any:
        return self.cfg.model.reformer_config(self.cfg.seq_len, self.vocab_size, self.causal)

    def build_model(self) -> nn.Module:
        """A fresh model (the caller seeds the global generator)."""
        return self.model_class(self.model_config())

    def load_model(self, folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        """The model saved in a run or model folder."""
        return self.model_class.from_pretrained(folder, map_location=device)

    def describe_model(self, model: nn.Module) -> str:
        n_params = sum(p.numel() for p in model.parameters())
        return f"{n_params:,} parameters, {model.config.n_layers} layers"

    def objective(self, model: nn.Module) -> nn.Module:
        """The module whose ``forward(*batch)`` is the mean loss of a batch over its counted targets
        (:meth:`target_count`). ``model`` may be wrapped for sequence parallelism."""
        return Objective(model)

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Metrics of ``model`` on ``batches`` (``loss`` first): the run's held-out evaluations and
        ``reformer eval`` both come here."""
        raise NotImplementedError

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The ``reformer eval`` flags of this task's runs (besides the run, --n-hashes and --device)."""
        parser.add_argument("--batch-size", type=int, help="sequences per forward pass")
        parser.add_argument("--full-attention", action="store_true", help="exact attention in the LSH layers")

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """The batches ``reformer eval`` evaluates (``options``: its flags)."""
        return self.held_out()

    def evaluate_test(
        self, model: nn.Module, options: argparse.Namespace, device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """``reformer eval``: :meth:`evaluate` on :meth:`test_batches`. A task that evaluates several
        test sets (lengths x depths, say) overrides this, calls :meth:`evaluate` on each and may write
        figures next to the run (``options.run``, the run folder)."""
        return self.evaluate(model, self.test_batches(model, options), device, n_hashes)

    def eval_batch_size(self, options: argparse.Namespace) -> int:
        return getattr(options, "batch_size", None) or max(1, min(self.cfg.batch_size, 8))

    def eval_lines(self, metrics: dict[str, float]) -> list[str]:
        """What ``reformer eval`` prints: the loss in nats, then the other metrics."""
        return [f"loss={metrics['loss']:.4f} nats"] + [
            f"{k}={v:.4f}" for k, v in metrics.items() if k != "loss"
        ]

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        """Lines ``reformer train`` prints once the run is saved (``--no-sample`` skips them)."""
        return []

    # ---- state a resumed run needs ---------------------------------------------------------------

    def after_step(self, loss: float, step: int) -> str | None:
        """Called after optimiser step ``step`` (1-based) with its training loss (the same on every
        process); returns a line to print, or None."""
        return None

    def state(self) -> dict[str, Any]:
        """What the trainer state must keep for :meth:`restore` (JSON values)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a trainer state written with :meth:`state`'s entries."""

    # ---- classifiers (reformer predict) ----------------------------------------------------------

    def class_names(self) -> list[str] | None:
        """The classes of a classifier run, in id order (None: not a classifier)."""
        return None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of one input text."""
        return list(text.encode("utf-8"))


def use_full_attention(model: nn.Module) -> None:
    """Exact shared-QK attention in the LSH layers: one chunk covers the whole input."""
    for module in model.modules():
        if isinstance(module, LSHSelfAttention):
            module.bucket_size = model.config.max_seq_len
