"""Model-level cached decoding: the run's fixed LSH settings, the prefill over a prompt that builds every
layer's cache, and the decode step that appends one token per row."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention.decode import Prompt
from ..block_decoding import prefill_block, step_block
from ..hashing import auto_n_buckets, bucket_factors


@dataclass
class GenerationCache:
    """Every layer's cache (its attention kind's, see :mod:`reformer.attention.decode`) and the number of
    positions kept per row (``lengths`` ``(batch,)`` int64)."""

    layers: list
    lengths: torch.Tensor
    max_length: int
    n_buckets: int | tuple[int, ...]
    n_hashes: int | None
    last_ids: torch.Tensor | None = None  # (batch, 1): each row's newest token, for the token shift

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (allocated capacity, not just the used part)."""
        return sum(layer.nbytes() for layer in self.layers)


@dataclass
class RunSettings:
    """What a generation run fixes: the LSH bucket count, the rounds and every layer's ``decode_state``
    (``rotations``: an LSH layer's rotations, None for the others).

    ``own_bucket`` is True for a model whose LSH layers follow the ``own_bucket`` key rule; their bucket
    count is then the layers' own fixed count (the one ``forward`` uses).
    """

    n_buckets: int | tuple[int, ...]
    n_hashes: int | None
    rotations: list[torch.Tensor | None] = field(default_factory=list)
    hf_compatible: bool = False
    own_bucket: bool = False


def run_settings(
    model: nn.Module,
    total_length: int,
    n_hashes: int | None = None,
    n_buckets: int | tuple[int, ...] | None = None,
    hf_compatible: bool = False,
) -> RunSettings:
    """Bucket count and rotations for sequences up to ``total_length``: ``n_buckets`` if given, else the
    config's, else the automatic count for ``total_length`` (padded to the bucket size).

    Under the ``own_bucket`` key rule the count is the LSH layers' fixed one (``auto_n_buckets(max_seq_len,
    bucket_size)`` when the config has none); another ``n_buckets`` is refused, as is ``hf_compatible``.
    """
    cfg, blocks = model.config, model.layers.blocks
    fixed = next((b.attention.fixed_n_buckets for b in blocks if b.attention.fixed_n_buckets), None)
    if fixed is not None:
        if n_buckets is not None and bucket_factors(n_buckets) != bucket_factors(fixed):
            raise ValueError(
                f"n_buckets={n_buckets!r} differs from the LSH layers' fixed count {fixed!r}: under "
                "lsh_key_rule='own_bucket' generation uses the count the model's forward uses; omit n_buckets"
            )
        if hf_compatible:
            raise ValueError(
                "hf_compatible=True follows HF's 'chunks' LSH rule; this model uses 'own_bucket'"
            )
        n_buckets = fixed
    if n_buckets is None:
        n_buckets = cfg.n_buckets
    if n_buckets is None:
        n_buckets = auto_n_buckets(-(-total_length // cfg.bucket_size) * cfg.bucket_size, cfg.bucket_size)
    rotations = [block.attention.decode_state(n_buckets, n_hashes) for block in blocks]
    return RunSettings(n_buckets, n_hashes, rotations, hf_compatible, fixed is not None)


def _logits_at(model: nn.Module, y1: torch.Tensor, y2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logits ``(batch, vocab)`` float32 of position ``index[b]`` of each row."""
    pick = index.view(-1, 1, 1).expand(-1, 1, y1.shape[-1])
    hidden = torch.cat([y1.gather(1, pick), y2.gather(1, pick)], dim=-1)[:, 0]
    return model.lm_head(model.final_norm(hidden)).float()


@torch.no_grad()
def prefill(
    model: nn.Module,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    settings: RunSettings,
    capacity: int | None = None,
    keep_cache: bool = True,
) -> tuple[torch.Tensor, GenerationCache | None]:
    """Run ``ids`` ``(batch, length)`` (row ``b`` real for its first ``lengths[b]`` positions, then
    padding) through the model in eval semantics with the run's bucket count and rotations.

    Returns the logits ``(batch, vocab)`` of each row's last real position and, with ``keep_cache``, the
    per-layer caches (preallocated for ``capacity`` positions). Without the cache this is the
    recompute-everything reference.
    """
    hf_hashed, hf_padded = _hf_prompt(model, lengths) if settings.hf_compatible else (None, None)
    prompt = Prompt.from_lengths(
        lengths, ids.shape[1], n_buckets=settings.n_buckets, capacity=capacity, keep_cache=keep_cache,
        hf_hashed=hf_hashed, hf_padded=hf_padded,
    )  # fmt: skip
    x = model.embeddings(ids)
    y1, y2, caches = x, x, []
    for block, state in zip(model.layers.blocks, settings.rotations, strict=True):
        y1, y2, cache = prefill_block(block, y1, y2, prompt, state)
        caches.append(cache)
    logits = _logits_at(model, y1, y2, lengths - 1)
    if not keep_cache:
        return logits, None
    last_ids = ids.gather(1, (lengths - 1).clamp(min=0)[:, None])
    cache = GenerationCache(
        caches, lengths.clone(), int(lengths.max()), settings.n_buckets, settings.n_hashes, last_ids
    )
    return logits, cache


def _hf_prompt(model: nn.Module, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether HF hashes, and whether it pads, prompts of ``lengths`` ``(batch,)``: it pads a prompt to a
    multiple of the least common multiple of its chunk lengths and hashes when that is longer than one
    LSH chunk."""
    cfg = model.config
    kinds = set(cfg.attn_layers)
    if kinds == {"local"}:
        multiple = cfg.local_chunk_size
    elif kinds == {"lsh"}:
        multiple = cfg.bucket_size
    else:
        multiple = math.lcm(cfg.bucket_size, cfg.local_chunk_size)
    padded = (lengths + multiple - 1) // multiple * multiple
    return padded > cfg.bucket_size, padded != lengths


@torch.no_grad()
def decode_step(model: nn.Module, cache: GenerationCache, next_ids: torch.Tensor) -> torch.Tensor:
    """Append ``next_ids`` ``(batch,)`` at each row's next position; their logits ``(batch, vocab)``."""
    lengths, max_length = cache.lengths, cache.max_length
    if max_length + 1 > model.config.max_seq_len:
        raise ValueError(
            f"the cached sequence would exceed max_seq_len={model.config.max_seq_len}; "
            "generate with use_cache=False to slide a window over the context"
        )
    next_ids = next_ids.view(-1, 1).long()
    x = model.embeddings(next_ids, position_ids=lengths.view(-1, 1), previous_ids=cache.last_ids)
    cache.last_ids = next_ids
    y1, y2 = x, x
    for i, block in enumerate(model.layers.blocks):
        y1, y2, cache.layers[i] = step_block(block, cache.layers[i], y1, y2, lengths, max_length)
    cache.lengths = lengths + 1
    cache.max_length = max_length + 1
    return _logits_at(model, y1, y2, torch.zeros_like(lengths))
