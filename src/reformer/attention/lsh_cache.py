"""The LSH layer's decode cache and step: kept keys, values, buckets and sorted orders, and one new
position's attention over exactly the chunks the chunked computation would give it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hashing import hash_vectors, sort_by_bucket, total_buckets
from .cache_buffers import grow, preallocate, write_at
from .chunked import SELF_MASK_VALUE
from .lsh_sort import normalize_keys


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
            keys=preallocate(normalize_keys(qk), 2, capacity), values=preallocate(v, 2, capacity),
            buckets=preallocate(buckets.int(), 3, capacity), order=preallocate(order.int(), 3, capacity),
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
            cache.hf_keys = preallocate(keys, 3, capacity)
        return cache

    def reserve(self, capacity: int) -> None:
        self.keys, self.values = grow(self.keys, 2, capacity), grow(self.values, 2, capacity)
        self.buckets, self.order = grow(self.buckets, 3, capacity), grow(self.order, 3, capacity)
        if self.hf_keys is not None:
            self.hf_keys = grow(self.hf_keys, 3, capacity)

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
    write_at(cache.hf_keys, 3, lengths, key)
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
    write_at(cache.keys, 2, lengths, normalize_keys(qk).to(cache.keys.dtype))
    write_at(cache.values, 2, lengths, v.to(cache.values.dtype))
    write_at(cache.buckets, 3, lengths, bucket.int())

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
