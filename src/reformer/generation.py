"""Autoregressive generation with per-layer caches, sampling, and the ``reformer generate`` command.

Semantics (docs/generation.md has the long form). A generation run fixes the LSH bucket count (the
config's, or the automatic count for the run's final length) and so the rotations, and uses them with
and without the cache. With the cache, each token's per-layer states are computed once, when the token
enters the sequence (the prompt's in one forward pass over the prompt), and kept:

* LSH layers keep the normalised keys, the values and the bucket id of every position in every round,
  plus each round's positions sorted by (bucket, position) and a per-bucket count. A new token's rank
  in a round is the number of kept positions with a bucket id not above its own; the chunks it attends
  to (its own chunk and ``n_chunks_before`` before it, wrapping as the chunked computation wraps, and
  the exact single-chunk path while the sequence fits one chunk) are read off the sorted positions. So
  the new token gathers exactly the keys that the chunked computation over [kept states + new token]
  gives it (tested against :func:`~reformer.attention.lsh.lsh_attention` to 1e-12 in float64).
* Local layers keep a ring of the last ``(n_chunks_before + 1) * chunk_size`` keys/values; full layers
  keep every key/value. Reversible layers need no stored activations: a decode step only runs forward.

Caveat, by construction of causal LSH attention: which keys position ``i`` sees depends on where later
tokens sort, so in full recomputation the states of earlier tokens change as the sequence grows. A
cache that keeps them therefore equals full recomputation exactly only where no LSH layer feeds another
layer with chunked (longer than one chunk) attention: local/full-only models, models whose only LSH
layer is the last, and sequences within one LSH chunk. Elsewhere it is the approximation HF transformers'
cache also makes (it keeps the prefix's per-layer inputs); docs/generation.md measures how often greedy
tokens agree with recomputation.

HF's cached LSH step gathers other keys than the chunked computation once the sequence passes one chunk
(it wraps within the round modulo the unpadded length, and its sort keys depend on its padding);
``hf_compatible=True`` follows HF's rule instead, so that a model converted with ``from_hf`` generates
HF's tokens.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .attention import LocalSelfAttention, LSHSelfAttention
from .attention.chunked import SELF_MASK_VALUE
from .attention.full import full_attention
from .attention.local import local_attention
from .attention.lsh import lsh_attention, normalize_keys
from .hashing import auto_n_buckets, draw_rotations, hash_vectors, sort_by_bucket, total_buckets

if TYPE_CHECKING:
    from .model import ReformerLM

# Caches that must grow past their preallocated capacity grow by this many positions at a time.
GROW_BLOCK = 1024
# Token ids of HF's enwik8 checkpoints are byte + 2 (0 is padding); ours are plain bytes.
ENWIK8_VOCAB, ENWIK8_OFFSET = 258, 2


def _grow(t: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    """``t`` grown to hold ``capacity`` entries along ``dim`` (in ``GROW_BLOCK`` steps), contents kept."""
    if t.shape[dim] >= capacity:
        return t
    shape = list(t.shape)
    shape[dim] = -(-capacity // GROW_BLOCK) * GROW_BLOCK
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _preallocate(x: torch.Tensor, dim: int, capacity: int | None) -> torch.Tensor:
    """A copy of ``x`` in a buffer of ``max(capacity, size)`` entries along ``dim`` (the rest zeros)."""
    shape = list(x.shape)
    shape[dim] = max(capacity or 0, x.shape[dim])
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def _write_at(store: torch.Tensor, dim: int, positions: torch.Tensor, new: torch.Tensor) -> None:
    """``store[b, ..., positions[b], ...] = new[b, ...]`` along ``dim`` (>= 1) for every batch row ``b``.

    ``new`` has ``store``'s shape with ``dim`` of size 1.
    """
    shape = [1] * store.dim()
    shape[0] = positions.shape[0]
    index = positions.view(shape).expand(new.shape)
    store.scatter_(dim, index, new)


# ---- per-layer caches and their decode steps ------------------------------------------------------


@dataclass
class LSHCache:
    """What one LSH layer keeps of a prefix, per batch row (rows may hold different lengths).

    Attributes:
        keys: ``(batch, heads, capacity, head_dim)`` normalised shared-QK keys.
        values: ``(batch, heads, capacity, head_dim_v)``.
        buckets: ``(batch, heads, rounds, capacity)`` int32 bucket id of every position per round.
        order: ``(batch, heads, rounds, capacity)`` int32: the first ``length`` entries of a row are its
            positions sorted by (bucket, position).
        counts: ``(batch, heads, rounds, total_buckets)`` int64 positions per bucket.
        rotations: ``(heads, head_dim, rounds, sum(factors) // 2)`` float32, fixed for the run.
        hf_hashed: ``(batch,)`` bool in HF-compatible mode (None otherwise): whether HF would hold bucket
            ids for the row's prefix yet (until then HF attends to every kept position).
        hf_keys: ``(batch, heads, rounds, capacity)`` int64 in HF-compatible mode: HF's sort keys, the
            bucket plus ``round * offset``, where HF's offset is ``total_buckets + 1`` for a padded prompt
            and, in later steps, depends on the largest key kept (HF's ``increase_num_buckets``); ``order``
            then follows these keys.
    """

    keys: torch.Tensor
    values: torch.Tensor
    buckets: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    rotations: torch.Tensor
    n_buckets: int | tuple[int, ...]
    bucket_size: int
    n_chunks_before: int
    n_chunks_after: int
    hf_hashed: torch.Tensor | None = None
    hf_keys: torch.Tensor | None = None

    @classmethod
    def from_prefix(
        cls,
        qk: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        rotations: torch.Tensor,
        n_buckets: int | tuple[int, ...],
        bucket_size: int,
        n_chunks_before: int = 1,
        n_chunks_after: int = 0,
        capacity: int | None = None,
        hf_hashed: torch.Tensor | None = None,
        hf_padded: torch.Tensor | None = None,
    ) -> LSHCache:
        """Cache of ``qk``/``v`` ``(batch, heads, length, dim)`` whose row ``b`` holds ``lengths[b]`` real
        positions followed by padding. ``hf_hashed`` ``(batch,)`` bool selects HF-compatible decoding;
        ``hf_padded`` ``(batch,)`` bool says whether HF padded that prompt."""
        batch, heads, length, _ = qk.shape
        valid = torch.arange(length, device=qk.device) < lengths[:, None]
        buckets = hash_vectors(qk, rotations, n_buckets)
        order = sort_by_bucket(buckets, valid)  # padding sorts last
        counts = torch.zeros(*buckets.shape[:3], total_buckets(n_buckets), dtype=torch.long, device=qk.device)
        counts.scatter_add_(-1, buckets, valid[:, None, None, :].expand_as(buckets).long())

        cache = cls(
            keys=_preallocate(normalize_keys(qk), 2, capacity), values=_preallocate(v, 2, capacity),
            buckets=_preallocate(buckets.int(), 3, capacity), order=_preallocate(order.int(), 3, capacity),
            counts=counts, rotations=rotations, n_buckets=n_buckets,
            bucket_size=bucket_size, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
            hf_hashed=hf_hashed,
        )  # fmt: skip
        if hf_hashed is not None:
            # HF hashes a padded prompt with one extra (padding) bucket per round; an unhashed prompt is
            # hashed later, unpadded.
            extra = (hf_hashed & hf_padded).long().view(batch, 1, 1, 1)
            offsets = torch.arange(cache.order.shape[2], device=qk.device).view(1, 1, -1, 1)
            keys = buckets + offsets * (total_buckets(n_buckets) + extra)
            cache.hf_keys = _preallocate(keys, 3, capacity)
        return cache

    def reserve(self, capacity: int) -> None:
        self.keys, self.values = _grow(self.keys, 2, capacity), _grow(self.values, 2, capacity)
        self.buckets, self.order = _grow(self.buckets, 3, capacity), _grow(self.order, 3, capacity)
        if self.hf_keys is not None:
            self.hf_keys = _grow(self.hf_keys, 3, capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.buckets, self.order))


def _hf_rank(cache: LSHCache, bucket: torch.Tensor, lengths: torch.Tensor, n_seen: int) -> torch.Tensor:
    """HF's rank of the new position ``(batch, heads, rounds, 1)`` under its sort keys (records the key)."""
    batch, _, rounds, _ = bucket.shape
    n_total = total_buckets(cache.n_buckets)
    kept = cache.hf_keys[..., : n_seen - 1]
    real = (torch.arange(n_seen - 1, device=bucket.device) < lengths[:, None]).view(batch, 1, 1, -1)
    # HF's increase_num_buckets: one extra bucket per round iff some kept key (whole batch) exceeds the
    # plain range; only in its gather step, i.e. for a prefix that has been hashed.
    increase = kept.masked_fill(~real, -1).amax() > rounds * n_total - 1
    extra = (increase & cache.hf_hashed).long().view(batch, 1, 1, 1)
    key = bucket + torch.arange(rounds, device=bucket.device).view(1, 1, rounds, 1) * (n_total + extra)
    _write_at(cache.hf_keys, 3, lengths, key)
    return ((kept <= key) & real).sum(-1, keepdim=True)


def lsh_decode_step(
    cache: LSHCache, qk: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, max_length: int | None = None
) -> torch.Tensor:
    """Append one position per row and return its causal LSH attention output.

    The new position of row ``b`` is ``lengths[b]``. It attends to exactly the keys that
    ``lsh_attention(..., causal=True)`` over the row's ``lengths[b] + 1`` positions (the kept ones and
    the new one, same rotations and bucket count) gives to its last position.

    In HF-compatible mode (``cache.hf_hashed`` set) it follows HF transformers' cached step instead:
    every kept position until HF would have hashed the prefix, then in each round the
    ``(n_chunks_before + 1 + n_chunks_after) * bucket_size`` sorted positions from the start of the
    new position's chunk minus ``n_chunks_before`` chunks, wrapping modulo the unpadded length within the
    same round.

    Args:
        qk, v: ``(batch, heads, 1, head_dim)`` the new position's shared query/key and value.
        lengths: ``(batch,)`` int64 positions already kept per row.
        max_length: ``int(lengths.max())`` if the caller knows it (saves a device sync).

    Returns:
        ``(batch, heads, 1, head_dim_v)`` in ``v``'s dtype.
    """
    batch, heads, _, head_dim = qk.shape
    device = qk.device
    max_length = int(lengths.max()) if max_length is None else max_length
    n_seen = max_length + 1  # entries of `order` that matter this step
    cache.reserve(n_seen)
    rounds = cache.order.shape[2]
    bucket = hash_vectors(qk, cache.rotations, cache.n_buckets)  # (batch, heads, rounds, 1)
    _write_at(cache.keys, 2, lengths, normalize_keys(qk).to(cache.keys.dtype))
    _write_at(cache.values, 2, lengths, v.to(cache.values.dtype))
    _write_at(cache.buckets, 3, lengths, bucket.int())

    # Rank of the new position in each round: kept positions sort before it iff their bucket is <= its.
    rank = cache.counts.cumsum(-1).gather(-1, bucket)  # (batch, heads, rounds, 1)
    cache.counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    if cache.hf_keys is not None:
        rank = _hf_rank(cache, bucket, lengths, n_seen)
    # Insert it: entries from its rank on move one slot up (contiguous copies, no random access).
    slots = torch.arange(n_seen, device=device)
    order = cache.order[..., :n_seen]
    torch.where(slots > rank, order.roll(1, dims=-1), order, out=order)
    order.scatter_(-1, rank, lengths.view(batch, 1, 1, 1).expand_as(rank).to(order.dtype))

    # The chunks the new position attends to, in the round-concatenated sorted sequence of n real
    # positions: m real chunks per round, neighbours wrap over the real chunks as chunk_neighbours does.
    bs = cache.bucket_size
    n = (lengths + 1).view(batch, 1, 1, 1)
    round_ids = torch.arange(rounds, device=device).view(1, 1, rounds, 1)
    if cache.hf_hashed is None:
        m = (n + bs - 1) // bs
        deltas = torch.arange(-cache.n_chunks_before, cache.n_chunks_after + 1, device=device)
        chunk_ids = (round_ids * m + rank // bs + deltas) % (rounds * m)  # (batch, heads, rounds, window)
        ranks = (chunk_ids % m)[..., None] * bs + torch.arange(bs, device=device)  # (..., window, bs)
        valid = (ranks < n[..., None]).flatten(2)
        flat = (chunk_ids // m)[..., None] * n_seen + ranks.clamp(max=n_seen - 1)
        # While a row fits one chunk, the computation is exact attention over all of its positions.
        short = n.view(batch, 1, 1) <= bs
    else:
        width = (cache.n_chunks_before + 1 + cache.n_chunks_after) * bs
        start = (rank // bs - cache.n_chunks_before) * bs
        ranks = (start + torch.arange(width, device=device)) % n  # (batch, heads, rounds, width)
        valid = torch.ones(ranks.shape, dtype=torch.bool, device=device).flatten(2)
        flat = round_ids * n_seen + ranks
        short = ~cache.hf_hashed.view(batch, 1, 1)
        cache.hf_hashed = cache.hf_hashed | (n.view(batch) >= bs)
    positions = order.reshape(batch, heads, rounds * n_seen).gather(-1, flat.flatten(2)).long()
    exact_width = min(n_seen, bs + 1)  # the exact path sees up to bs (HF's: bs + 1) positions
    if positions.shape[-1] < exact_width:
        extra = exact_width - positions.shape[-1]
        positions = torch.cat([positions, positions.new_zeros(batch, heads, extra)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(batch, heads, extra)], dim=-1)
    everything = torch.arange(positions.shape[-1], device=device)
    positions = torch.where(short, everything.clamp(max=n_seen - 1), positions)
    valid = torch.where(short, everything < n.view(batch, 1, 1), valid)

    keys = cache.keys.gather(2, positions[..., None].expand(-1, -1, -1, head_dim))
    values = cache.values.gather(2, positions[..., None].expand(-1, -1, -1, cache.values.shape[-1]))
    acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
    scores = torch.matmul(qk.to(keys.dtype), keys.transpose(-1, -2)).to(acc)  # (batch, heads, 1, cand)
    is_self = (positions == lengths.view(batch, 1, 1))[:, :, None]
    scores = scores.masked_fill(is_self, SELF_MASK_VALUE).masked_fill(~valid[:, :, None], float("-inf"))
    return torch.matmul(scores.softmax(-1).to(values.dtype), values).to(v.dtype)


@dataclass
class LocalCache:
    """One local layer's window: a ring of the last ``(n_chunks_before + 1) * chunk_size`` positions.

    Position ``p`` of a row lives in slot ``p % ring``. ``keys`` (already scaled by 1/sqrt(head_dim))
    ``(batch, heads, ring, head_dim)``, ``values`` ``(batch, heads, ring, head_dim_v)``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    chunk_size: int
    n_chunks_before: int

    @classmethod
    def from_prefix(
        cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, chunk_size: int, n_chunks_before: int
    ) -> LocalCache:
        """From scaled keys ``k`` and values ``v`` ``(batch, heads, length, dim)``; row ``b`` holds
        ``lengths[b]`` real positions."""
        ring = (n_chunks_before + 1) * chunk_size
        positions = lengths[:, None] - ring + torch.arange(ring, device=k.device)  # (batch, ring)
        slots, source = positions % ring, positions.clamp(min=0, max=k.shape[2] - 1)

        def fill(x: torch.Tensor) -> torch.Tensor:
            index = source[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
            out = x.new_zeros(x.shape[0], x.shape[1], ring, x.shape[-1])
            return out.scatter_(2, slots[:, None, :, None].expand_as(index), x.gather(2, index))

        return cls(fill(k), fill(v), chunk_size, n_chunks_before)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def local_decode_step(
    cache: LocalCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Append one position per row (at ``lengths[b]``) and return its causal local attention output.

    Equal to the last position of ``local_attention(..., causal=True)`` over the row's ``lengths + 1``
    positions, including the wrap-around of the first chunks (a chunk met twice counts twice).

    Args:
        q, k, v: ``(batch, heads, 1, head_dim)``, ``k`` unscaled.

    Returns:
        ``(batch, heads, 1, head_dim_v)``.
    """
    batch = q.shape[0]
    ring, cs = cache.keys.shape[2], cache.chunk_size
    _write_at(cache.keys, 2, lengths % ring, (k / math.sqrt(q.shape[-1])).to(cache.keys.dtype))
    _write_at(cache.values, 2, lengths % ring, v.to(cache.values.dtype))
    t = lengths[:, None]
    positions = t - (t - torch.arange(ring, device=q.device)) % ring  # (batch, ring) position per slot
    chunk = t // cs
    deltas = torch.arange(-cache.n_chunks_before, 1, device=q.device)
    seen = (chunk + deltas) % (chunk + 1)  # (batch, window): real chunks met, with repeats
    multiplicity = (seen[:, None, :] == (positions // cs)[..., None]).sum(-1)
    multiplicity = torch.where(t + 1 <= cs, 1, multiplicity)  # one chunk: exact attention
    multiplicity = multiplicity.masked_fill(positions < 0, 0)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(cache.keys.dtype), cache.keys.transpose(-1, -2)).to(acc)
    scores = scores + multiplicity.to(acc).log().view(batch, 1, 1, ring)
    return torch.matmul(scores.softmax(-1).to(cache.values.dtype), cache.values).to(v.dtype)


@dataclass
class KVCache:
    """A full-attention layer's keys and values ``(batch, heads, capacity, head_dim)`` of every position."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_prefix(cls, k: torch.Tensor, v: torch.Tensor, capacity: int | None = None) -> KVCache:
        """From ``k``, ``v`` ``(batch, heads, length, dim)``, preallocated for ``capacity`` positions."""
        return cls(*(_preallocate(x, 2, capacity) for x in (k, v)))

    def reserve(self, capacity: int) -> None:
        self.keys, self.values = _grow(self.keys, 2, capacity), _grow(self.values, 2, capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def full_decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Append one position per row and return its causal exact attention ``(batch, heads, 1, head_dim_v)``."""
    cache.reserve(max_length + 1)
    _write_at(cache.keys, 2, lengths, k.to(cache.keys.dtype))
    _write_at(cache.values, 2, lengths, v.to(cache.values.dtype))
    keys, values = cache.keys[:, :, : max_length + 1], cache.values[:, :, : max_length + 1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(keys.dtype), keys.transpose(-1, -2)).to(acc) / math.sqrt(q.shape[-1])
    later = torch.arange(keys.shape[2], device=q.device) > lengths[:, None]
    scores = scores.masked_fill(later[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1).to(values.dtype), values).to(v.dtype)


# ---- model-level prefill and decode ---------------------------------------------------------------


@dataclass
class GenerationCache:
    """Every layer's cache and the number of positions kept per row (``lengths`` ``(batch,)`` int64)."""

    layers: list[LSHCache | LocalCache | KVCache]
    lengths: torch.Tensor
    max_length: int
    n_buckets: int | tuple[int, ...]
    n_hashes: int | None

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (allocated capacity, not just the used part)."""
        return sum(layer.nbytes() for layer in self.layers)


@dataclass
class RunSettings:
    """What a generation run fixes: the LSH bucket count, the rounds and every LSH layer's rotations."""

    n_buckets: int | tuple[int, ...]
    n_hashes: int | None
    rotations: list[torch.Tensor | None] = field(default_factory=list)
    hf_compatible: bool = False


def run_settings(
    model: ReformerLM,
    total_length: int,
    n_hashes: int | None = None,
    n_buckets: int | tuple[int, ...] | None = None,
    hf_compatible: bool = False,
) -> RunSettings:
    """Bucket count and rotations for sequences up to ``total_length``: ``n_buckets`` if given, else the
    config's, else the automatic count for ``total_length`` (padded to the bucket size)."""
    cfg = model.config
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
    return RunSettings(n_buckets, n_hashes, rotations, hf_compatible)


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
    caches: list[LSHCache | LocalCache | KVCache] = []
    hf_hashed, hf_padded = _hf_prompt(model, lengths) if settings.hf_compatible else (None, None)
    for block, rotations in zip(model.layers.blocks, settings.rotations, strict=True):
        attn, h = block.attention, block.attn_norm(y2)
        if isinstance(attn, LSHSelfAttention):
            qk, v = attn.split_heads(attn.to_qk(h)), attn.split_heads(attn.to_v(h))
            out = lsh_attention(
                qk, v, bucket_size=attn.bucket_size, n_hashes=rotations.shape[2],
                n_buckets=settings.n_buckets, causal=True, attention_mask=attention_mask,
                n_chunks_before=attn.n_chunks_before, n_chunks_after=attn.n_chunks_after, rotations=rotations,
            )  # fmt: skip
            if keep_cache:
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
    cache = GenerationCache(
        caches, lengths.clone(), int(lengths.max()), settings.n_buckets, settings.n_hashes
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
    x = model.embeddings(next_ids.view(-1, 1).long(), position_ids=lengths.view(-1, 1))
    y1, y2 = x, x
    for block, layer in zip(model.layers.blocks, cache.layers, strict=True):
        attn, h = block.attention, block.attn_norm(y2)
        if isinstance(attn, LSHSelfAttention):
            qk, v = attn.split_heads(attn.to_qk(h)), attn.split_heads(attn.to_v(h))
            out = lsh_decode_step(layer, qk, v, lengths, max_length)
        else:
            q, k, v = (attn.split_heads(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if isinstance(attn, LocalSelfAttention):
                out = local_decode_step(layer, q, k, v, lengths)
            else:
                out = full_decode_step(layer, q, k, v, lengths, max_length)
        y1 = y1 + attn.output(out)
        y2 = y2 + block.feed_forward(y1)
    cache.lengths = lengths + 1
    cache.max_length = max_length + 1
    return _logits_at(model, y1, y2, torch.zeros_like(lengths))


# ---- sampling -------------------------------------------------------------------------------------


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids ``(batch,)`` int64 from ``logits`` ``(batch, vocab)``.

    ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``, cut to the
    ``top_k`` largest and then to the smallest set whose probability reaches ``top_p`` (nucleus
    sampling; the most likely token always stays), and one id is drawn per row from ``generator``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop = before >= top_p
        logits = logits.scatter(-1, sorted_ids, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] or be None")
    if n_hashes is not None and (not isinstance(n_hashes, int) or n_hashes < 1):
        raise ValueError(f"n_hashes={n_hashes!r} must be a positive integer or None")


def _compact(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front: ``(ids, lengths)``; padding anywhere is dropped."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return input_ids.long(), torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(input_ids.device).bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token (1)")
    order = torch.sort((~mask).long(), dim=1, stable=True).indices
    return input_ids.long().gather(1, order), lengths


@torch.no_grad()
def stream(
    model: ReformerLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    n_hashes: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    n_buckets: int | tuple[int, ...] | None = None,
    hf_compatible: bool = False,
    on_cache=None,
) -> Iterator[torch.Tensor]:
    """Yield the next ids ``(batch,)`` one step at a time (see :func:`generate`); the model is in eval
    mode while the iterator runs. ``on_cache(cache)`` is called once the prompt's cache exists."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes)
    if not model.config.causal:
        raise ValueError("generation needs a causal model (config.causal=True)")
    window = slice(-model.config.max_seq_len, None)  # longer prompts are checked by their last window
    model._check_inputs(input_ids[:, window], None if attention_mask is None else attention_mask[:, window])
    if max_new_tokens == 0:
        return
    cfg = model.config
    ids, lengths = _compact(input_ids, attention_mask)
    total = int(lengths.max()) + max_new_tokens
    if use_cache and total > cfg.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens = {total} exceeds max_seq_len={cfg.max_seq_len}; the cache cannot "
            "slide a window: use use_cache=False, a shorter prompt or fewer new tokens"
        )
    if use_cache and cfg.local_chunks_after and "local" in cfg.attn_layers:
        raise ValueError(
            "cached decoding needs local_chunks_after=0 (a causal model's setting); use use_cache=False"
        )
    was_training = model.training
    model.eval()
    try:
        settings = run_settings(model, min(total, cfg.max_seq_len), n_hashes, n_buckets, hf_compatible)
        if use_cache:
            logits, cache = prefill(model, ids, lengths, settings, capacity=total)
            if on_cache is not None:
                on_cache(cache)
            for step in range(max_new_tokens):
                next_ids = sample_next(logits, temperature, top_k, top_p, generator)
                yield next_ids
                if step + 1 < max_new_tokens:
                    logits = decode_step(model, cache, next_ids)
            return
        tokens = torch.cat([ids, ids.new_zeros(ids.shape[0], max_new_tokens)], dim=1)
        for _ in range(max_new_tokens):
            start = (lengths - cfg.max_seq_len).clamp(min=0)  # slide a window past max_seq_len
            width = int((lengths - start).max())
            window = tokens.gather(
                1, (start[:, None] + torch.arange(width, device=ids.device)).clamp(max=tokens.shape[1] - 1)
            )
            logits, _ = prefill(model, window, lengths - start, settings, keep_cache=False)
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            yield next_ids
            tokens.scatter_(1, lengths[:, None], next_ids[:, None])
            lengths = lengths + 1
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: ReformerLM, input_ids: torch.Tensor, max_new_tokens: int = 100, **options
) -> torch.Tensor:
    """``input_ids`` ``(batch, length)`` followed by ``max_new_tokens`` sampled ids: ``(batch, length +
    max_new_tokens)`` in ``input_ids``'s dtype. ``options`` are :func:`stream`'s; see
    :meth:`reformer.ReformerLM.generate`."""
    new = list(stream(model, input_ids, max_new_tokens, **options))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)


# ---- `reformer generate` --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a model folder (save_pretrained) or a `reformer train` run folder"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (UTF-8)")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this file (bytes as they are)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: probability mass kept")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    parser.add_argument("--n-hashes", type=int, default=None, help="LSH rounds (default: the config's)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    parser.add_argument(
        "--hf-compatible", action="store_true",
        help="cached LSH steps follow HF transformers' rule (for models converted from HF)",
    )  # fmt: skip
    parser.add_argument(
        "--id-offset", type=int, default=None,
        help="token id of byte b is b + offset (default: 2 for a 258-token vocabulary, HF's enwik8, else 0)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .model import ReformerLM

    try:
        model = ReformerLM.from_pretrained(args.checkpoint, map_location=args.device)
        data = args.prompt.encode("utf-8") if args.prompt is not None else args.prompt_file.read_bytes()
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.error(str(err))
    vocab = model.config.vocab_size
    offset = args.id_offset if args.id_offset is not None else (ENWIK8_OFFSET if vocab == ENWIK8_VOCAB else 0)
    if not data:
        parser.error("the prompt is empty; give at least one byte")
    if offset + 255 >= vocab:
        parser.error(
            f"byte ids need vocab_size >= {offset + 256} with --id-offset {offset}; the model has {vocab}"
        )
    ids = torch.tensor([list(data)], dtype=torch.long, device=args.device) + offset
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    info: dict[str, int] = {}
    start, count = time.perf_counter(), 0
    try:
        tokens = stream(
            model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, not args.no_cache,
            args.n_hashes, generator, hf_compatible=args.hf_compatible,
            on_cache=lambda c: info.update(cache_bytes=c.nbytes()),
        )  # fmt: skip
        for next_ids in tokens:
            count += 1
            value = int(next_ids[0]) - offset
            if 0 <= value < 256:
                out.write(decoder.decode(bytes([value])))
                out.flush()
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
    except ValueError as err:
        parser.error(str(err))
    except BrokenPipeError:  # the reader stopped early (`| head`): stop generating, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    elapsed = time.perf_counter() - start
    cache = f", cache {info['cache_bytes'] / 2**20:.1f} MiB" if "cache_bytes" in info else ""
    print(f"[{count} tokens in {elapsed:.2f} s, prompt {len(data)} tokens{cache}]", file=sys.stderr)
    return 0
