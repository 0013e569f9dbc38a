"""``classify``: sequence classification of labelled text (``--data`` training set, ``--valid`` held-out
set; JSON lines or class folders, read by :mod:`reformer.tasks.labelled`), optionally starting from a
pretrained encoder or MLM run (``--init``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ReformerConfig
from .base import Batch, RunSettings, TrainingError
from .classification import ClassificationTask, ClassifierSettings
from .encoder import pad_rows
from .labelled import LabelledSet, load_labelled
from .model_settings import ModelSettings
from .settings import setting

# The model settings --init brings (a flag naming one of them is refused).
INIT_MODEL_FLAGS = ("d_model", "n_heads", "n_layers", "d_ff", "attn_layers")


@dataclass
class ClassifySettings(ClassifierSettings):
    data: list[str] = setting(
        default_factory=list, metavar="PATH", path=True, unset="none; required",
        help="the training set: a .jsonl file or a folder with one sub-folder per class",
    )  # fmt: skip
    valid: list[str] = setting(
        default_factory=list, help="the held-out set (.jsonl or class folders)", nargs=1, metavar="PATH",
        path=True, unset="none; required",
    )  # fmt: skip
    init: str | None = setting(
        None, "start from this pretrained encoder or MLM run (its model settings; the classification head "
        "starts fresh)", metavar="DIR", path=True, unset="a fresh model",
    )  # fmt: skip
    truncate: bool = setting(
        False, "cut texts over --seq-len bytes instead of stopping with an error", action="store_true"
    )
    labels: list[str] = setting(default_factory=list)  # the classes, recorded when the run starts


class ClassifyTask(ClassificationTask):
    """Labelled texts as UTF-8 bytes; the classes are those of the training set, in sorted order."""

    name = "classify"
    about = "sequence classification of labelled text (--data, --valid; docs/encoders.md)"
    Settings = ClassifySettings
    vocab_size = 257  # bytes and the mask id of an MLM run it may start from

    @classmethod
    def finish_config(cls, cfg: RunSettings, given: set[str]) -> None:
        init = cfg.task_settings.init
        if init is None or "init" not in given:
            return
        named = [n for n in INIT_MODEL_FLAGS if n in given]
        if named:
            raise ValueError(f"--init {init} brings its model settings; drop --{named[0].replace('_', '-')}")
        if "seq_len" not in given:  # the pretrained encoder's length
            cfg.seq_len = ReformerConfig.from_json(Path(init) / "config.json").max_seq_len

    def prepare(self) -> None:
        """Take the model settings of ``init`` and read the sets; record the classes (a resumed run
        keeps its own)."""
        s = self.settings
        if s.init:
            config = ReformerConfig.from_json(Path(s.init) / "config.json")
            if self.cfg.seq_len > config.max_seq_len:
                raise TrainingError(
                    f"--seq-len {self.cfg.seq_len} exceeds the max_seq_len {config.max_seq_len} of --init "
                    f"{s.init}; pass --seq-len {config.max_seq_len} or less"
                )
            self.cfg.model = ModelSettings.from_config(config)
        if len(s.data) != 1 or len(s.valid) != 1:
            raise TrainingError(
                "--task classify needs one --data (training set) and one --valid (held-out set), each a "
                ".jsonl file or a folder with one sub-folder per class"
            )
        self.train_set = load_labelled(s.data[0], self.cfg.seq_len, s.labels or None, s.truncate)
        s.labels = self.train_set.labels
        self.valid_set = load_labelled(s.valid[0], self.cfg.seq_len, s.labels, s.truncate)

    def describe(self) -> str:
        return (
            f"{len(self.train_set)} training and {len(self.valid_set)} held-out examples, "
            f"classes {self.settings.labels}"
        )

    def n_labels(self) -> int:
        return len(self.settings.labels)

    def class_names(self) -> list[str]:
        return self.settings.labels

    def build_model(self) -> nn.Module:
        """Fresh, or the encoder of ``init`` with a fresh classification head (a log line names the
        head's parameters)."""
        if self.settings.init:
            return self.model_class.from_pretrained(
                self.settings.init, n_labels=self.n_labels(), pooling=self.settings.pooling
            )
        return super().build_model()

    def batch(self, size: int, generator: torch.Generator, split: str = "train") -> Batch:
        data = self.train_set if split == "train" else self.valid_set
        picks = torch.randint(0, len(data), (size,), generator=generator).tolist()
        return labelled_batch(data, picks)

    def held_out(self) -> list[Batch]:
        """The held-out set in order: at most ``eval_batches * batch_size`` examples."""
        size = min(self.cfg.batch_size, 8)
        n = min(len(self.valid_set), self.cfg.eval_batches * self.cfg.batch_size)
        return [labelled_batch(self.valid_set, range(i, min(i + size, n))) for i in range(0, n, size)]

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_eval_arguments(parser)
        parser.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this labelled set instead")
        parser.add_argument("--truncate", action="store_true", help="cut texts over max_seq_len")

    def test_batches(self, model: nn.Module, options: argparse.Namespace) -> Iterable[Batch]:
        """``--data`` (default: the run's held-out set), in order."""
        s, size = self.settings, self.eval_batch_size(options)
        path = options.data[0] if options.data else s.valid[0]
        data = load_labelled(path, model.config.max_seq_len, s.labels, bool(options.truncate or s.truncate))
        return (labelled_batch(data, range(i, min(i + size, len(data)))) for i in range(0, len(data), size))


def labelled_batch(data: LabelledSet, picks) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of the examples ``picks``: inputs padded with ``PAD``, labels ``(n,)``."""
    picks = list(picks)
    rows = [data.ids[i] for i in picks]
    return pad_rows(rows), torch.tensor([data.label_ids[i] for i in picks], dtype=torch.long)


TASKS = (ClassifyTask,)
