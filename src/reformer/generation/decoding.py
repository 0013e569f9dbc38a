"""Model-level cached decoding: the run's fixed LSH settings, the prefill over a prompt that builds every
layer's cache, and the decode step that appends one token per row."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..attention import LocalSelfAttention, LSHSelfAttention
from ..attention.full import full_attention
from ..attention.local import local_attention
from ..attention.lsh import lsh_attention
from ..hashing import auto_n_buckets, bucket_factors, draw_rotations
from .kv_cache import KVCache, full_decode_step
from .local_cache import LocalCache, local_decode_step
from .lsh_cache import LSHCache, lsh_decode_step
from .own_bucket_cache import OwnBucketCache, own_bucket_decode_step

if TYPE_CHECKING:
    from ..model import ReformerLM


@dataclass
class GenerationCache:
    """Every layer's cache and the number of positions kept per row (``lengths`` ``(batch,)`` int64)."""

    layers: list[LSHCache | OwnBucketCache | LocalCache | KVCache]
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
    """What a generation run fixes: the LSH bucket count, the rounds and every LSH layer's rotations.

    ``own_bucket`` is True for a model whose LSH layers follow the ``own_bucket`` key rule; their bucket
    count is then the layers' own fixed count (the one ``forward`` uses).
    """

    n_buckets: int | tuple[int, ...]
    n_hashes: int | None
    rotations: list[torch.Tensor | None] = field(default_factory=list)
    hf_compatible: bool = False
    own_bucket: bool = False


def run_settings(
    model: ReformerLM,
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
    cfg = model.config
    own_bucket = cfg.lsh_key_rule == "own_bucket" and "lsh" in cfg.attn_layers
    if own_bucket:
        fixed = next(
            b.attention.n_buckets for b in model.layers.blocks if isinstance(b.attention, LSHSelfAttention)
        )
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
    device = next(model.parameters()).device
    rotations: list[torch.Tensor | None] = []
    for block in model.layers.blocks:
        attn = block.attention
        if isinstance(attn, LSHSelfAttention):
            seed = attn.hash_seed if attn.hash_seed is not None else attn.eval_hash_seed
            rounds = n_hashes or attn.n_hashes
            rotations.append(
                draw_rotations(attn.n_heads, attn.d_head, rounds, n_buckets, seed=seed, device=device)
            )
        else:
            rotations.append(None)
    return RunSettings(n_buckets, n_hashes, rotations, hf_compatible, own_bucket)


def _logits_at(model: ReformerLM, y1: torch.Tensor, y2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logits ``(batch, vocab)`` float32 of position ``index[b]`` of each row."""
    pick = index.view(-1, 1, 1).expand(-1, 1, y1.shape[-1])
    hidden = torch.cat([y1.gather(1, pick), y2.gather(1, pick)], dim=-1)[:, 0]
    return model.lm_head(model.final_norm(hidden)).float()


@torch.no_grad()
def prefill(
    model: ReformerLM,
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
    batch, length = ids.shape
    mask = torch.arange(length, device=ids.device) < lengths[:, None]
    attention_mask = None if bool(mask.all()) else mask
    x = model.embeddings(ids)
    y1, y2 = x, x
    caches: list[LSHCache | OwnBucketCache | LocalCache | KVCache] = []
    hf_hashed, hf_padded = _hf_prompt(model, lengths) if settings.hf_compatible else (None, None)
    for block, rotations in zip(model.layers.blocks, settings.rotations, strict=True):
        attn, h = block.attention, block.attn_norm(y2)
        if isinstance(attn, LSHSelfAttention):
            qk, v = attn.split_heads(attn.to_qk(h)), attn.split_heads(attn.to_v(h))
            out = lsh_attention(
                qk, v, bucket_size=attn.bucket_size, n_hashes=rotations.shape[2],
                n_buckets=settings.n_buckets, causal=True, attention_mask=attention_mask,
                n_chunks_before=attn.n_chunks_before, n_chunks_after=attn.n_chunks_after, rotations=rotations,
                key_rule=attn.key_rule,
            )  # fmt: skip
            if keep_cache and attn.key_rule == "own_bucket":
                window = attn.n_chunks_before * attn.bucket_size
                caches.append(
                    OwnBucketCache.from_prefix(
                        qk, v, lengths, rotations, settings.n_buckets, window, capacity
                    )
                )
            elif keep_cache:
                caches.append(
                    LSHCache.from_prefix(
                        qk,
                        v,
                        lengths,
                        rotations,
                        settings.n_buckets,
                        attn.bucket_size,
                        attn.n_chunks_before,
                        attn.n_chunks_after,
                        capacity,
                        hf_hashed,
                        hf_padded,
                    )
                )
        else:
            q, k, v = (attn.split_heads(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.rotate(q, k)
            if isinstance(attn, LocalSelfAttention):
                out = local_attention(
                    q, k, v, chunk_size=attn.chunk_size, causal=True, attention_mask=attention_mask,
                    n_chunks_before=attn.n_chunks_before, n_chunks_after=attn.n_chunks_after,
                )  # fmt: skip
                if keep_cache:
                    scaled = k / math.sqrt(k.shape[-1])
                    caches.append(
                        LocalCache.from_prefix(scaled, v, lengths, attn.chunk_size, attn.n_chunks_before)
                    )
            else:
                out = full_attention(q, k, v, causal=True, attention_mask=attention_mask)
                if keep_cache:
                    caches.append(KVCache.from_prefix(k, v, capacity))
        y1 = y1 + attn.output(out)
        y2 = y2 + block.feed_forward(y1)
    logits = _logits_at(model, y1, y2, lengths - 1)
    if not keep_cache:
        return logits, None
    last_ids = ids.gather(1, (lengths - 1).clamp(min=0)[:, None])
    cache = GenerationCache(
        caches, lengths.clone(), int(lengths.max()), settings.n_buckets, settings.n_hashes, last_ids
    )
    return logits, cache


def _hf_prompt(model: ReformerLM, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
def decode_step(model: ReformerLM, cache: GenerationCache, next_ids: torch.Tensor) -> torch.Tensor:
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
    for block, layer in zip(model.layers.blocks, cache.layers, strict=True):
        attn, h = block.attention, block.attn_norm(y2)
        if isinstance(attn, LSHSelfAttention):
            qk, v = attn.split_heads(attn.to_qk(h)), attn.split_heads(attn.to_v(h))
            if isinstance(layer, OwnBucketCache):
                out = own_bucket_decode_step(layer, qk, v, lengths, max_length)
            else:
                out = lsh_decode_step(layer, qk, v, lengths, max_length)
        else:
            q, k, v = (attn.split_heads(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.rotate(q, k, lengths.view(-1, 1))
            if isinstance(attn, LocalSelfAttention):
                out = local_decode_step(layer, q, k, v, lengths)
            else:
                out = full_decode_step(layer, q, k, v, lengths, max_length)
        y1 = y1 + attn.output(out)
        y2 = y2 + block.feed_forward(y1)
    cache.lengths = lengths + 1
    cache.max_length = max_length + 1
    return _logits_at(model, y1, y2, torch.zeros_like(lengths))
