"""Whole images sampled pixel by pixel from a model trained on the ``images`` format: a start token,
then ``3 S^2`` sub-pixels in raster order (each pixel's R G B), with the cache; the start token is never
sampled. A prompt is the top rows of an image (completion)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.images import IMAGE_VOCAB, START, ids_to_image, image_to_ids
from .decoding import decode_step, prefill, run_settings
from .sampling import check_sampling, sample_next


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    n: int,
    size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    prompt: np.ndarray | None = None,
    rows: int = 0,
    n_hashes: int | None = None,
) -> np.ndarray:
    """``n`` images ``(n, size, size, 3)`` uint8 from ``model`` (a :class:`~reformer.ReformerLM`).
    ``prompt`` ``(size, size, 3)`` uint8 with ``rows`` > 0: every image starts with the prompt's top
    ``rows`` rows and the model completes the rest."""
    length = 3 * size * size
    cfg = model.config
    if cfg.vocab_size != IMAGE_VOCAB or not cfg.causal:
        raise ValueError(
            f"image sampling needs a causal model with the images format's {IMAGE_VOCAB} ids; this one "
            f"has vocab_size={cfg.vocab_size}, causal={cfg.causal}"
        )
    if cfg.max_seq_len < length:
        raise ValueError(
            f"{size}x{size}x3 images need max_seq_len >= {length}; the model has {cfg.max_seq_len}"
        )
    if n < 1:
        raise ValueError(f"--images {n} must be at least 1")
    if not 0 <= rows < size:
        raise ValueError(f"--rows {rows} must be in 0..{size - 1} (the prompt's top rows)")
    check_sampling(length, temperature, top_k, top_p, n_hashes)
    device = next(model.parameters()).device
    given = torch.zeros(n, 0, dtype=torch.long, device=device)
    if rows:
        if prompt is None or prompt.shape != (size, size, 3):
            raise ValueError(f"a prompt image must be {size}x{size}x3 to complete its top {rows} rows")
        given = image_to_ids(prompt.copy())[: 3 * size * rows].to(device).expand(n, -1)
    ids = torch.cat([torch.full((n, 1), START, dtype=torch.long, device=device), given], dim=1)
    was_training = model.training
    model.eval()
    try:
        settings = run_settings(model, length, n_hashes)
        lengths = torch.full((n,), ids.shape[1], dtype=torch.long, device=device)
        logits, cache = prefill(model, ids, lengths, settings, capacity=length)
        new = []
        for _ in range(length - given.shape[1]):
            logits[:, START] = float("-inf")
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            new.append(next_ids)
            if len(new) < length - given.shape[1]:
                logits = decode_step(model, cache, next_ids)
    finally:
        model.train(was_training)
    pixels = torch.cat([given, torch.stack(new, dim=1)], dim=1) if new else given
    return ids_to_image(pixels.cpu(), size)
