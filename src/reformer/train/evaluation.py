"""Held-out loss, bits per byte and copy-task accuracy of a model or a finished run; samples."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..attention import LSHSelfAttention
from ..config import read_json_object
from ..data import IGNORE_INDEX, contiguous_windows, copy_task_batch, decode_bytes, encode_text, load_corpus
from ..devices import default_device
from ..model import ReformerLM
from .batches import EVAL_SEED
from .config import TRAIN_CONFIG_FILE, TrainConfig
from .encoder_tasks import ENCODER_TASKS, evaluate_encoder


@torch.no_grad()
def evaluate_batches(
    model: ReformerLM,
    batches,
    task: str,
    device: torch.device,
    n_hashes: int | None = None,
) -> dict[str, float]:
    """Mean loss in nats over next-token targets, plus ``bits_per_byte`` (language modelling) or
    ``accuracy`` (copy task: share of second-half tokens predicted right); encoder tasks: see
    :func:`~reformer.train.encoder_tasks.evaluate_encoder`."""
    if task in ENCODER_TASKS:
        return evaluate_encoder(model, batches, task, device, n_hashes)
    was_training = model.training
    model.eval()
    total_loss, total_count, total_correct = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        counted = targets != IGNORE_INDEX
        count = int(counted.sum())
        if task == "copy":
            logits = model(inputs, n_hashes=n_hashes).float()
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_correct += int(((logits.argmax(-1) == targets) & counted).sum())
            total_loss += float(loss)
        else:
            total_loss += float(model.loss(inputs, targets, n_hashes=n_hashes)) * count
        total_count += count
    model.train(was_training)
    loss = total_loss / max(total_count, 1)
    if task == "copy":
        return {"loss": loss, "accuracy": total_correct / max(total_count, 1)}
    return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def load_run(run: str | os.PathLike) -> tuple[TrainConfig | None, ReformerLM]:
    """The run's settings (None for a plain model folder) and its newest weights."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder; give a run folder written by reformer train")
    cfg = None
    if (run / TRAIN_CONFIG_FILE).is_file():
        cfg = TrainConfig.from_dict(read_json_object(run / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    return cfg, ReformerLM.from_pretrained(run)


def evaluate_run(
    run: str | os.PathLike,
    data: list[str] | None = None,
    n_hashes: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    full_attention: bool = False,
    device: str | None = None,
) -> dict[str, float]:
    """Held-out bits per byte on the test split (or copy-task accuracy) of a trained run."""
    cfg, model = load_run(run)
    device = default_device(device)
    model.to(device)
    if cfg is None:
        cfg = TrainConfig(model=model.config.to_dict(), seq_len=model.config.max_seq_len)
    if full_attention:
        _use_full_attention(model)
    batch_size = batch_size or max(1, min(cfg.batch_size, 8))
    if cfg.task == "copy":
        generator = torch.Generator().manual_seed(EVAL_SEED + 1)
        n_batches = max(1, -(-(max_tokens or 32 * cfg.seq_len) // (batch_size * cfg.seq_len)))
        batches = [copy_task_batch(batch_size, cfg.seq_len, generator) for _ in range(n_batches)]
    else:
        corpus = load_corpus(data if data is not None else cfg.data)
        batches = contiguous_windows(corpus.test, cfg.seq_len, batch_size, max_tokens)
    return evaluate_batches(model, batches, cfg.task, device, n_hashes)


def _use_full_attention(model: ReformerLM) -> None:
    """Exact shared-QK attention in the LSH layers: one chunk covers the whole input."""
    for module in model.modules():
        if isinstance(module, LSHSelfAttention):
            module.bucket_size = model.config.max_seq_len


SAMPLE_PROMPT = "def main():\n    "


def sample_text(model: ReformerLM, prompt: str = SAMPLE_PROMPT, n: int = 200, seed: int = 0) -> str:
    """``n`` bytes after ``prompt``, sampled with ``generate``'s defaults (temperature 1.0, no top-k or
    top-p) from a generator seeded with ``seed``: what ``reformer generate RUN --prompt PROMPT
    --max-new-tokens n --seed seed`` prints."""
    device = next(model.parameters()).device
    ids = model.generate(
        encode_text(prompt)[None].to(device), max_new_tokens=n,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip
    return decode_bytes(ids[0].cpu())
