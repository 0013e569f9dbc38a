"""Batches of the encoder tasks: rows of different lengths padded with ``PAD`` (-1) in the inputs, which
:func:`split_padding` turns into token ids and the ``attention_mask``, and the objective that does so."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PAD = -1  # padding in the inputs of a batch (rows are as long as their example)


def pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(len(rows), longest)`` int64 with ``PAD`` after each row's tokens."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def split_padding(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (``PAD`` replaced by 0) and the attention mask ``(batch, length)`` (None: no padding)."""
    real = inputs != PAD
    if bool(real.all()):
        return inputs, None
    return inputs.clamp(min=0), real.long()


class EncoderObjective(nn.Module):
    """``forward(inputs, labels)`` -> the model's mean loss, with ``PAD`` in ``inputs`` as padding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ids, mask = split_padding(inputs)
        return self.model(ids, attention_mask=mask, labels=labels)
