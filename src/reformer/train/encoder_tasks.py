"""The encoder tasks of ``reformer train``: ``mlm`` (masked-LM pretraining on a corpus), ``classify``
(labelled text from JSONL files or class folders) and ``listops`` (generated on the fly).

They reuse the language model's loop: :class:`EncoderData` supplies the batches, :func:`build_model`
the model, :class:`TaskObjective` the ``net(inputs, targets=...)`` call of the loop and
:func:`evaluate_encoder` the held-out metrics. In a batch, padding is ``PAD`` (-1) in ``inputs``;
:class:`TaskObjective` turns it into the ``attention_mask``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import listops
from ..config import ReformerConfig
from ..data import IGNORE_INDEX, load_corpus, random_windows
from ..labelled import LabelledSet, load_labelled
from ..models import ReformerForMaskedLM, ReformerForSequenceClassification
from .config import TrainConfig, TrainingError
from .masking import MLM_VOCAB, mask_tokens

ENCODER_TASKS = ("mlm", "classify", "listops")
CLASSIFY_TASKS = ("classify", "listops")
PAD = listops.PAD


def apply_init(cfg: TrainConfig) -> None:
    """Take the model settings of ``cfg.init`` (a pretrained encoder, MLM run or classifier folder) and
    check ``seq_len`` fits them."""
    if not cfg.init:
        return
    config = ReformerConfig.from_json(Path(cfg.init) / "config.json").to_dict()
    if cfg.seq_len > config["max_seq_len"]:
        raise TrainingError(
            f"--seq-len {cfg.seq_len} exceeds the max_seq_len {config['max_seq_len']} of --init {cfg.init}; "
            f"pass --seq-len {config['max_seq_len']} or less"
        )
    cfg.model = config


def build_model(cfg: TrainConfig) -> nn.Module:
    """The run's model: fresh, or (``classify`` with ``init``) the encoder of ``cfg.init`` with a fresh
    classification head (a log line names the head's parameters)."""
    if cfg.task == "mlm":
        return ReformerForMaskedLM(cfg.model_config())
    n_labels = listops.N_CLASSES if cfg.task == "listops" else len(cfg.labels)
    if cfg.init:
        return ReformerForSequenceClassification.from_pretrained(
            cfg.init, n_labels=n_labels, pooling=cfg.pooling
        )
    return ReformerForSequenceClassification(cfg.model_config(), n_labels=n_labels, pooling=cfg.pooling)


class TaskObjective(nn.Module):
    """``forward(inputs, targets)`` -> the model's mean loss, with ``PAD`` in ``inputs`` as padding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids, mask = split_padding(inputs)
        return self.model(ids, attention_mask=mask, labels=targets)


def split_padding(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (``PAD`` replaced by 0) and the attention mask ``(batch, length)`` (None: no padding)."""
    real = inputs != PAD
    if bool(real.all()):
        return inputs, None
    return inputs.clamp(min=0), real.long()


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    return listops.pad_rows(rows)


class EncoderData:
    """Training and held-out batches of an encoder task; all randomness comes from the given generator.

    ``classify`` reads ``cfg.data`` (training) and ``cfg.valid`` (held out) and records the classes in
    ``cfg.labels``; a resumed run keeps its classes.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        apply_init(cfg)
        self.corpus = self.train_set = self.valid_set = None
        if cfg.task == "mlm":
            self.corpus = load_corpus(cfg.data)
        elif cfg.task == "classify":
            if len(cfg.data) != 1 or len(cfg.valid) != 1:
                raise TrainingError(
                    "--task classify needs one --data (training set) and one --valid (held-out set), each "
                    "a .jsonl file or a folder with one sub-folder per class"
                )
            labels = cfg.labels or None
            self.train_set = load_labelled(cfg.data[0], cfg.seq_len, labels, cfg.truncate)
            cfg.labels = self.train_set.labels
            self.valid_set = load_labelled(cfg.valid[0], cfg.seq_len, cfg.labels, cfg.truncate)

    def describe(self) -> str:
        if self.cfg.task == "mlm":
            return f"masked LM on {self.corpus.describe()}"
        if self.cfg.task == "listops":
            return (
                f"ListOps, lengths {listops_min_len(self.cfg) + 1}-{self.cfg.seq_len} (held out: "
                f"{listops_eval_min_len(self.cfg) + 1}-{self.cfg.seq_len}), generated on the fly"
            )
        return (
            f"{len(self.train_set)} training and {len(self.valid_set)} held-out examples, "
            f"classes {self.cfg.labels}"
        )

    def draw(self, size: int, generator: torch.Generator, split: str = "train"):
        """``(inputs, targets)``: inputs ``(size, length)`` int64 with ``PAD``; targets ``(size,)`` class
        ids, or ``(size, length)`` masked-LM labels."""
        if self.cfg.task == "mlm":
            ids, _ = random_windows(getattr(self.corpus, split), self.cfg.seq_len, size, generator)
            return mask_tokens(ids, generator)
        if self.cfg.task == "listops":
            lo = listops_min_len(self.cfg) if split == "train" else listops_eval_min_len(self.cfg)
            return listops.listops_batch(size, lo, self.cfg.seq_len + 1, generator)
        data = self.train_set if split == "train" else self.valid_set
        picks = torch.randint(0, len(data), (size,), generator=generator).tolist()
        return labelled_batch(data, picks)

    def held_out(self, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation batches: ``classify`` takes the held-out set in order (at most
        ``eval_batches * batch_size`` examples); the others draw ``eval_batches`` batches."""
        size = min(self.cfg.batch_size, 8)
        if self.cfg.task != "classify":
            return [self.draw(size, generator, "valid") for _ in range(self.cfg.eval_batches)]
        n = min(len(self.valid_set), self.cfg.eval_batches * self.cfg.batch_size)
        return [labelled_batch(self.valid_set, range(i, min(i + size, n))) for i in range(0, n, size)]


def listops_min_len(cfg: TrainConfig) -> int:
    """ListOps training expressions are longer than this."""
    return cfg.min_len if cfg.min_len is not None else cfg.seq_len // 4


def listops_eval_min_len(cfg: TrainConfig) -> int:
    """Held-out ListOps expressions (the run's evaluations, ``reformer eval``) are longer than this."""
    return cfg.eval_min_len if cfg.eval_min_len is not None else listops_min_len(cfg)


def labelled_batch(data: LabelledSet, picks) -> tuple[torch.Tensor, torch.Tensor]:
    picks = list(picks)
    rows = [data.ids[i] for i in picks]
    return pad_rows(rows), torch.tensor([data.label_ids[i] for i in picks], dtype=torch.long)


def task_vocab(task: str) -> int | None:
    """The vocabulary an encoder task needs (None: not an encoder task)."""
    return {"mlm": MLM_VOCAB, "classify": MLM_VOCAB, "listops": listops.VOCAB_SIZE}.get(task)


@torch.no_grad()
def evaluate_encoder(
    model: nn.Module, batches, task: str, device: torch.device, n_hashes: int | None = None
) -> dict[str, float]:
    """``mlm``: mean loss (nats) over the masked positions and ``bits_per_byte``; classification: mean
    loss, ``accuracy`` and ``macro_f1`` (the mean F1 over the classes that occur as label or
    prediction)."""
    was_training = model.training
    model.eval()
    total_loss, total_count, true, pred = 0.0, 0, [], []
    for inputs, targets in batches:
        ids, mask = split_padding(inputs.to(device))
        targets = targets.to(device)
        if task == "mlm":
            count = int((targets != IGNORE_INDEX).sum())
            total_loss += float(model(ids, attention_mask=mask, labels=targets, n_hashes=n_hashes)) * count
            total_count += count
            continue
        logits = model(ids, attention_mask=mask, n_hashes=n_hashes).float()
        total_loss += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total_count += len(targets)
        true += targets.tolist()
        pred += logits.argmax(-1).tolist()
    model.train(was_training)
    loss = total_loss / max(total_count, 1)
    if task == "mlm":
        return {"loss": loss, "bits_per_byte": loss / torch.log(torch.tensor(2.0)).item()}
    accuracy = sum(t == p for t, p in zip(true, pred, strict=True)) / max(len(true), 1)
    return {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1(true, pred)}


def macro_f1(true: list[int], pred: list[int]) -> float:
    """Mean over the classes present in ``true`` or ``pred`` of 2 TP / (2 TP + FP + FN)."""
    scores = []
    for c in sorted(set(true) | set(pred)):
        tp = sum(t == c and p == c for t, p in zip(true, pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(true, pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(true, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)
