"""The paper's duplication (copy) task, section 5: sequences ``0 w 0 w`` made on the fly."""

from __future__ import annotations

import torch

from .corpus import IGNORE_INDEX

COPY_SYMBOLS = 127  # symbols 1..127; 0 separates the halves


def copy_task_batch(
    batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``0 w 0 w`` of ``length`` tokens (``w``: ``length / 2 - 1`` random symbols in 1..127).

    Returns ``inputs`` ``(batch_size, length)`` int64 and next-token ``targets`` of the same shape that
    are ``IGNORE_INDEX`` except where the second copy of ``w`` is predicted (positions
    ``length / 2 .. length - 2``), so loss and accuracy count only the second half.
    """
    if length < 4 or length % 2:
        raise ValueError(f"copy task length={length} must be even and at least 4")
    half = length // 2
    w = torch.randint(1, COPY_SYMBOLS + 1, (batch_size, half - 1), generator=generator)
    zero = torch.zeros(batch_size, 1, dtype=torch.long)
    inputs = torch.cat([zero, w, zero, w], dim=1)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, half:-1] = inputs[:, half + 1 :]
    return inputs, targets
