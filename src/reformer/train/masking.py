"""BERT-style masking for masked-LM pretraining on bytes (Devlin et al. 2019, section 3.1).

In each row 15% of the positions (rounded, at least one) are chosen; a chosen position's input becomes
the reserved ``MASK_ID`` 80% of the time, a random byte 10% of the time and stays as it is 10% of the
time, and its label is the original byte. Unchosen positions get the label ``IGNORE_INDEX``.
"""

from __future__ import annotations

import torch

from ..data import IGNORE_INDEX

N_BYTES = 256
MASK_ID = 256  # reserved after the 256 byte values
MLM_VOCAB = 257
MASK_FRACTION = 0.15
MASK_SHARES = (0.8, 0.1, 0.1)  # [MASK], random byte, unchanged


def mask_tokens(
    ids: torch.Tensor, generator: torch.Generator, fraction: float = MASK_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and labels for ``ids`` ``(batch, length)`` int64 byte ids (0-255).

    Returns ``(inputs, labels)``, both ``(batch, length)`` int64: exactly ``max(1, round(fraction *
    length))`` chosen positions per row, labelled with the original ids; the rest labelled
    ``IGNORE_INDEX``. Draws from ``generator`` only (reproducible, resumable).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (batch, length), got shape {tuple(ids.shape)}")
    batch, length = ids.shape
    n_chosen = max(1, round(fraction * length))
    scores = torch.rand(batch, length, generator=generator)
    chosen = torch.zeros(batch, length, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(n_chosen, dim=1).indices, True)
    action = torch.rand(batch, length, generator=generator)
    random_bytes = torch.randint(0, N_BYTES, (batch, length), generator=generator)
    inputs = ids.clone()
    to_mask = chosen & (action < MASK_SHARES[0])
    to_random = chosen & (action >= MASK_SHARES[0]) & (action < MASK_SHARES[0] + MASK_SHARES[1])
    inputs[to_mask] = MASK_ID
    inputs[to_random] = random_bytes[to_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels
