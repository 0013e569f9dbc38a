"""Training and held-out batches of a run: one global batch per step, sliced per process."""

from __future__ import annotations

import torch

from ..data import Corpus, copy_task_batch, random_windows
from .config import TrainConfig
from .encoder_tasks import ENCODER_TASKS, EncoderData

# Seeds of the fixed held-out batches, apart from the training seed so evaluation never moves it.
EVAL_SEED = 12345


class Batches:
    """Training and held-out batches for a task; every process draws the same global batch from one
    generator and keeps its own slice, so the data a run sees does not depend on the process count."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus | None) -> None:
        self.cfg, self.corpus = cfg, corpus
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.encoder = None
        if cfg.task in ENCODER_TASKS:
            self.encoder = EncoderData(cfg)

    def draw(self, size: int, generator: torch.Generator, split: str = "train"):
        if self.encoder is not None:
            return self.encoder.draw(size, generator, split)
        if self.cfg.task == "copy":
            return copy_task_batch(size, self.cfg.seq_len, generator)
        return random_windows(getattr(self.corpus, split), self.cfg.seq_len, size, generator)

    def next(self, size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.draw(size, self.generator)
        share = size // world_size
        return inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]

    def held_out(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``eval_batches`` batches at every evaluation, so the curve is comparable."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        if self.encoder is not None:
            return self.encoder.held_out(generator)
        size = min(self.cfg.batch_size, 8)
        return [self.draw(size, generator, "valid") for _ in range(self.cfg.eval_batches)]
