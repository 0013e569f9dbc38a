"""What the long-context retrieval tasks (``passkey``, ``recall``) share: a language model trained on
short examples with a length curriculum, scored only where an answer is due, and tested on a grid of
lengths (up to 1M tokens) x a second axis (the needle's depth, the number of pairs), with a heatmap and
the ablations that show the long context is what answers.

A task subclass supplies :meth:`RetrievalTask.example` (one example of a length at a grid value) and the
names of its grid axis.

Training: every step draws one length, log-uniform between ``--min-len`` and the curriculum's current
longest length, and fills each batch row with ``max(1, --row-tokens // length)`` examples of it. The
longest length starts at ``--curriculum-start`` and doubles (up to ``--seq-len``) whenever the accuracy
on ``CURRICULUM_PROBE`` fresh examples at it reaches ``--curriculum-accuracy``, checked every
``--curriculum-every`` steps. The loss is the mean cross-entropy of the answer tokens plus
``--lm-weight`` times the mean next-token loss of all other tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..models.loss import chunked_cross_entropy
from .base import Batch, Task
from .context_probe import ABLATIONS, last_window, lsh_outputs_zeroed, plot_heatmap
from .settings import setting

CURRICULUM_PROBE = 20  # fresh examples per curriculum check
PROBE_SEED = 777  # their generator's seed (apart from training and held-out data)
TEST_SEED = 2024  # the examples of `reformer eval`
LOSS_CHUNK = 4096  # positions per logits chunk of the loss


@dataclass
class RetrievalSettings:
    min_len: int = setting(128, "shortest training example (lengths are log-uniform up to the longest)")
    curriculum_start: int | None = setting(
        256, "longest training example at first; it doubles up to --seq-len each time the accuracy at it "
        "reaches --curriculum-accuracy", unset="off: --seq-len from the start",
    )  # fmt: skip
    curriculum_accuracy: float = setting(0.9, "accuracy at the longest length that lets it double")
    curriculum_every: int = setting(250, "steps between the curriculum's accuracy checks")
    row_tokens: int = setting(2048, "training tokens per batch row: it holds max(1, this / length) examples")
    lm_weight: float = setting(0.1, "weight of the next-token loss of the unscored tokens (0: answers only)")
    eval_lengths: tuple[int, ...] = setting((1024, 4096), "lengths of the run's held-out evaluations")


class RetrievalObjective(nn.Module):
    """``forward(inputs, targets)``: mean answer loss + ``lm_weight`` x mean next-token loss elsewhere.

    ``inputs`` ``(batch, length)`` int64 are the examples' tokens but the last, ``targets`` the answers
    (``IGNORE_INDEX`` elsewhere); the next-token targets are ``inputs`` shifted, the last one the final
    answer token."""

    def __init__(self, model: nn.Module, lm_weight: float) -> None:
        super().__init__()
        self.model, self.lm_weight = model, lm_weight

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(inputs)
        head, answers = self.model.lm_head, targets != IGNORE_INDEX
        loss = chunked_cross_entropy(head, hidden, targets, IGNORE_INDEX, LOSS_CHUNK) / answers.sum().clamp(
            min=1
        )
        if self.lm_weight == 0:
            return loss
        following = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1).masked_fill(answers, IGNORE_INDEX)
        rest = chunked_cross_entropy(head, hidden, following, IGNORE_INDEX, LOSS_CHUNK)
        return loss + self.lm_weight * rest / (following != IGNORE_INDEX).sum().clamp(min=1)


class RetrievalTask(Task):
    """Base of the retrieval tasks. Subclasses set ``grid_name`` (the second axis), ``grid_values``
    (its default values for ``reformer eval``), ``exact_match`` (an example counts as right only when all
    its answer tokens are) and implement :meth:`example` and :meth:`train_grid_value`."""

    Settings = RetrievalSettings
    grid_name: str = "depth"
    grid_values: tuple[float, ...] = ()
    exact_match: bool = True
    sequence_parallel = False
    selection = ("accuracy", "max")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.longest = self.settings.curriculum_start or cfg.seq_len
        self.model: nn.Module | None = None

    # ---- examples --------------------------------------------------------------------------------

    def example(self, length: int, value: float, generator: torch.Generator, split: str) -> Batch:
        """``(inputs, targets)`` ``(length,)`` of one example at grid value ``value``."""
        raise NotImplementedError

    def train_grid_value(self, length: int, generator: torch.Generator) -> float:
        """The grid value of a training example of ``length`` tokens."""
        raise NotImplementedError

    def examples(self, n: int, length: int, generator: torch.Generator, split: str, value=None) -> Batch:
        rows = []
        for _ in range(n):
            v = self.train_grid_value(length, generator) if value is None else value
            rows.append(self.example(length, v, generator, split))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    # ---- settings --------------------------------------------------------------------------------

    def validate(self) -> None:
        s = self.settings
        if not 2 <= s.min_len <= self.cfg.seq_len:
            raise ValueError(f"--min-len {s.min_len} must lie in [2, --seq-len {self.cfg.seq_len}]")
        if s.curriculum_start is not None and not s.min_len <= s.curriculum_start <= self.cfg.seq_len:
            raise ValueError(
                f"--curriculum-start {s.curriculum_start} must lie in [--min-len {s.min_len}, --seq-len "
                f"{self.cfg.seq_len}]"
            )
        if not 0 < s.curriculum_accuracy <= 1:
            raise ValueError(f"--curriculum-accuracy {s.curriculum_accuracy} must lie in (0, 1]")
        for name in ("curriculum_every", "row_tokens"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(s, name)} must be positive")
        if s.lm_weight < 0:
            raise ValueError(f"--lm-weight {s.lm_weight} must be non-negative")
        model_limit = self.model_config().max_seq_len
        for length in (*s.eval_lengths, self.cfg.seq_len):
            if length > model_limit:
                raise ValueError(f"length {length} exceeds the model's max_seq_len {model_limit}")

    def describe(self) -> str:
        schedule = (
            f"curriculum {self.settings.curriculum_start} -> {self.cfg.seq_len}"
            if self.settings.curriculum_start
            else f"up to {self.cfg.seq_len}"
        )
        return f"{self.name}: lengths {self.settings.min_len} .. ({schedule}), generated on the fly"

    # ---- training --------------------------------------------------------------------------------

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        """Training: one length for the batch, ``size`` rows of ``--row-tokens`` worth of examples.
        Held out (``split`` "valid"): the run's first evaluation length, ``size`` examples."""
        if split != "train":
            return self.examples(size, self.settings.eval_lengths[0], generator, split)
        lo, hi = math.log(self.settings.min_len), math.log(self.longest)
        length = int(math.exp(lo + (hi - lo) * float(torch.rand((), generator=generator))))
        per_row = max(1, self.settings.row_tokens // length)
        return self.examples(size * per_row, length, generator, split)

    def held_out(self) -> list[Batch]:
        """``eval_batches`` examples at each evaluation length (from the held-out seed)."""
        generator = torch.Generator().manual_seed(self.held_out_seed)
        return [
            self.examples(1, length, generator, "valid")
            for length in self.settings.eval_lengths
            for _ in range(self.cfg.eval_batches)
        ]

    def objective(self, model: nn.Module) -> nn.Module:
        self.model = model
        return RetrievalObjective(model, self.settings.lm_weight)

    def after_step(self, loss: float, step: int) -> str | None:
        """Every ``--curriculum-every`` steps, double the longest training length once the accuracy on
        fresh examples at it reaches ``--curriculum-accuracy``."""
        s = self.settings
        if self.model is None or self.longest >= self.cfg.seq_len or step % s.curriculum_every:
            return None
        generator = torch.Generator().manual_seed(PROBE_SEED + step)
        device = next(self.model.parameters()).device
        batches = [self.examples(1, self.longest, generator, "valid") for _ in range(CURRICULUM_PROBE)]
        accuracy = self.evaluate(self.model, batches, device)["accuracy"]
        if accuracy < s.curriculum_accuracy:
            return None
        self.longest = min(2 * self.longest, self.cfg.seq_len)
        return (
            f"curriculum: accuracy {accuracy:.2f}; training lengths up to {self.longest} from step {step + 1}"
        )

    def state(self) -> dict[str, Any]:
        return {"curriculum_longest": self.longest}

    def restore(self, state: dict[str, Any]) -> None:
        self.longest = int(state.get("curriculum_longest", self.longest))

    # ---- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """Answer loss (nats per answer token), ``accuracy`` (share of examples answered entirely right
        for exact-match tasks, of answer tokens otherwise) and the same per length as ``accuracy@L``.
        Logits are made for the answer positions only, so any length the model accepts fits."""
        was_training = model.training
        model.eval()
        loss, tokens, right, total = 0.0, 0, {}, {}
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            scored = targets != IGNORE_INDEX
            logits = model.lm_head(model.hidden_states(inputs, n_hashes=n_hashes)[scored]).float()
            loss += float(nn.functional.cross_entropy(logits, targets[scored], reduction="sum"))
            tokens += int(scored.sum())
            hits = torch.zeros_like(targets, dtype=torch.bool)
            hits[scored] = logits.argmax(-1) == targets[scored]
            self.record(targets.cpu(), hits.cpu())
            if self.exact_match:
                good, count = int((hits | ~scored).all(-1).sum()), len(targets)
            else:
                good, count = int(hits.sum()), int(scored.sum())
            length = inputs.shape[1]
            right[length] = right.get(length, 0) + good
            total[length] = total.get(length, 0) + count
        model.train(was_training)
        metrics = {
            "loss": loss / max(tokens, 1),
            "accuracy": sum(right.values()) / max(sum(total.values()), 1),
        }
        if len(total) > 1:
            metrics.update({f"accuracy@{n}": right[n] / total[n] for n in sorted(total)})
        return metrics

    def record(self, targets: torch.Tensor, hits: torch.Tensor) -> None:
        """Called by :meth:`evaluate` for every batch with its ``targets`` and ``hits`` ``(batch,
        length)`` (True where an answer token was predicted right), for a task's own statistics."""

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--lengths", type=_ints, help="comma-separated test lengths (default: the run's)")
        defaults = ",".join(f"{v:g}" for v in cls.grid_values)
        parser.add_argument(
            f"--{cls.grid_name}s", dest="grid", type=_floats,
            help=f"comma-separated {cls.grid_name} values (default: {defaults})",
        )  # fmt: skip
        parser.add_argument("--n-per-cell", type=int, default=4, help="examples per length and value")
        parser.add_argument(
            "--ablate", choices=ABLATIONS, default="none",
            help="lsh-zeroed: every LSH layer outputs zeros; last-window: the model sees only the last "
            "--window tokens of each example",
        )  # fmt: skip
        parser.add_argument("--window", type=int, default=4096, help="tokens kept by --ablate last-window")
        parser.add_argument("--heatmap", help="PNG of the accuracy grid (default: RUN/<task>_heatmap.png)")

    def evaluate_test(
        self, model: nn.Module, options: argparse.Namespace, device: torch.device, n_hashes: int | None = None
    ) -> dict[str, float]:
        """The grid: for every length and value, ``--n-per-cell`` fresh examples (seed ``TEST_SEED``,
        held-out filler); ``accuracy@L/v`` per cell, ``accuracy@L`` per length, ``accuracy`` overall, and
        per length the seconds per example and the process's peak memory so far (``seconds@L``,
        ``peak_mib@L``); writes the heatmap."""
        lengths = options.lengths or self.settings.eval_lengths
        values = options.grid or self.grid_values
        if options.n_per_cell < 1:
            raise ValueError(f"--n-per-cell {options.n_per_cell} must be positive")
        limit = model.config.max_seq_len
        if max(lengths) > limit:
            raise ValueError(f"--lengths {max(lengths)} exceeds the model's max_seq_len {limit}")
        generator = torch.Generator().manual_seed(TEST_SEED)
        metrics: dict[str, float] = {}
        grid = []
        for length in lengths:
            started, row = time.perf_counter(), []
            for value in values:
                batches = [
                    self._ablated(self.examples(1, length, generator, "test", value), options)
                    for _ in range(options.n_per_cell)
                ]
                with (
                    lsh_outputs_zeroed(model) if options.ablate == "lsh-zeroed" else contextlib.nullcontext()
                ):
                    cell = self.evaluate(model, batches, device, n_hashes)["accuracy"]
                metrics[f"accuracy@{length}/{value:g}"] = cell
                row.append(cell)
            grid.append(row)
            metrics[f"accuracy@{length}"] = sum(row) / len(row)
            metrics[f"seconds@{length}"] = (time.perf_counter() - started) / (
                len(values) * options.n_per_cell
            )
            metrics[f"peak_mib@{length}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics["accuracy"] = sum(map(sum, grid)) / (len(lengths) * len(values))
        path = options.heatmap or Path(options.run) / f"{self.name}_heatmap{_suffix(options)}.png"
        title = f"{self.name}: accuracy by length and {self.grid_name}" + (
            f" ({options.ablate})" if options.ablate != "none" else ""
        )
        plot_heatmap(grid, lengths, values, path, title, self.grid_name)
        metrics["heatmap"] = str(path)
        return metrics

    def _ablated(self, batch: Batch, options: argparse.Namespace) -> Batch:
        if options.ablate != "last-window" or batch[0].shape[1] <= options.window:
            return batch
        return last_window(*batch, options.window)

    def eval_lines(self, metrics: dict[str, Any]) -> list[str]:
        """One line per length: its accuracy, each cell, seconds per example and peak memory; then the
        overall accuracy and the heatmap's path."""
        lines = []
        for key in [k for k in metrics if k.startswith("accuracy@") and "/" not in k]:
            length = key.split("@")[1]
            cells = " ".join(
                f"{k.split('/')[1]}:{v:.2f}"
                for k, v in metrics.items()
                if k.startswith(f"accuracy@{length}/")
            )
            extra = ""
            if f"seconds@{length}" in metrics:
                seconds, peak = metrics[f"seconds@{length}"], metrics[f"peak_mib@{length}"]
                extra = f"  {seconds:.1f} s/example, peak {peak:.0f} MiB"
            lines.append(f"length {length}: accuracy {metrics[key]:.4f}  [{self.grid_name} {cells}]{extra}")
        if "heatmap" in metrics:
            lines.append(f"heatmap: {metrics['heatmap']}")
        lines.append(f"accuracy={metrics['accuracy']:.4f}")
        return lines

    def report(self, model: nn.Module, device: torch.device) -> list[str]:
        metrics = self.evaluate(model, self.held_out(), device, n_hashes=8)
        per_length = ", ".join(f"{k.split('@')[1]}: {v:.3f}" for k, v in metrics.items() if "@" in k)
        return [
            f"{self.name} accuracy with 8 hashes: {metrics['accuracy']:.4f}"
            + (f" ({per_length})" if per_length else "")
        ]


def _suffix(options: argparse.Namespace) -> str:
    return "" if options.ablate == "none" else f"_{options.ablate}"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))
