"""The decode cache and step of an LSH layer under the ``own_bucket`` key rule: per round and bucket a
ring of the last ``W`` positions, and one new position's attention over at most ``rounds * W`` keys.

Under this rule (docs/causal_lsh.md) a query sees, in each hash round, the last ``W = n_chunks_before *
bucket_size`` earlier positions of its own bucket, and its own key only when nothing else is allowed
(self score ``SELF_MASK_VALUE``); the rounds are combined by log-sum-exp. None of this depends on later
positions, so the states the cache keeps are final and a cached step equals recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hashing import hash_vectors, sort_by_bucket, total_buckets
from .cache_buffers import grow, preallocate, write_at
from .chunked import SELF_MASK_VALUE
from .lsh_sort import normalize_keys


@dataclass
class OwnBucketCache:
    """What one ``own_bucket`` LSH layer keeps of a prefix, per batch row (rows may hold different lengths).

    Attributes:
        keys: ``(batch, heads, capacity, head_dim)`` normalised shared-QK keys, by position.
        values: ``(batch, heads, capacity, head_dim_v)``, by position.
        rings: ``(batch, heads, rounds, total_buckets, window)`` int32: the last ``window`` positions of
            every bucket in every round; the ``c``-th position to enter a bucket sits in slot
            ``c % window``; -1 marks an empty slot.
        counts: ``(batch, heads, rounds, total_buckets)`` int64 positions that have entered each bucket.
        rotations: ``(heads, head_dim, rounds, sum(factors) // 2)`` float32, fixed for the run.
        n_buckets: the layer's fixed bucket count.
    """

    keys: torch.Tensor
    values: torch.Tensor
    rings: torch.Tensor
    counts: torch.Tensor
    rotations: torch.Tensor
    n_buckets: int | tuple[int, ...]

    @property
    def window(self) -> int:
        return self.rings.shape[-1]

    @classmethod
    def from_prefix(
        cls,
        qk: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        rotations: torch.Tensor,
        n_buckets: int | tuple[int, ...],
        window: int,
        capacity: int | None = None,
    ) -> OwnBucketCache:
        """Cache of ``qk``/``v`` ``(batch, heads, length, dim)`` whose row ``b`` holds ``lengths[b]`` real
        positions followed by padding; ``window`` is ``n_chunks_before * bucket_size``."""
        if window < 1:
            raise ValueError(
                f"window={window} (n_chunks_before * bucket_size) must be at least 1 for the own_bucket "
                "cache; use lsh_chunks_before >= 1, or generate with use_cache=False"
            )
        batch, heads, length, _ = qk.shape
        n_total = total_buckets(n_buckets)
        valid = torch.arange(length, device=qk.device) < lengths[:, None]  # (batch, length)
        buckets = hash_vectors(qk, rotations, n_buckets)  # (batch, heads, rounds, length)
        rounds = buckets.shape[2]
        counts = torch.zeros(batch, heads, rounds, n_total, dtype=torch.long, device=qk.device)
        counts.scatter_add_(-1, buckets, valid[:, None, None, :].expand_as(buckets).long())

        # Rank of every position within its bucket: its place in the (bucket, position) order minus
        # the number of positions in lower buckets. Padding sorts last and is dropped.
        order = sort_by_bucket(buckets, valid)
        sorted_buckets = buckets.gather(-1, order)
        starts = counts.cumsum(-1) - counts
        rank = torch.arange(length, device=qk.device) - starts.gather(-1, sorted_buckets)
        total = counts.gather(-1, sorted_buckets)
        real = rank < total  # padding sorts after every real position: its rank is past its bucket's count
        keep = real & (rank >= total - window)
        slot = torch.where(keep, sorted_buckets * window + rank % window, n_total * window)
        rings = torch.full(
            (batch, heads, rounds, n_total * window + 1), -1, dtype=torch.int32, device=qk.device
        )
        rings.scatter_(-1, slot, order.int())
        rings = rings[..., :-1].reshape(batch, heads, rounds, n_total, window).contiguous()
        return cls(
            keys=preallocate(normalize_keys(qk), 2, capacity), values=preallocate(v, 2, capacity),
            rings=rings, counts=counts, rotations=rotations, n_buckets=n_buckets,
        )  # fmt: skip

    def reserve(self, capacity: int) -> None:
        self.keys, self.values = grow(self.keys, 2, capacity), grow(self.values, 2, capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.rings, self.counts))


def own_bucket_decode_step(
    cache: OwnBucketCache,
    qk: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int | None = None,
) -> torch.Tensor:
    """Append one position per row and return its ``own_bucket`` causal LSH attention output.

    The new position of row ``b`` is ``lengths[b]``. In each round it is hashed with the cache's
    rotations and scored against the at most ``window`` positions in its bucket's ring; its own key
    gets ``SELF_MASK_VALUE`` in every round. One softmax over the rounds' candidates together is the
    log-sum-exp combination of the rounds. Then it enters its bucket's ring. Cost
    ``O(rounds * window * head_dim)`` per row and head, whatever the prefix length.

    Args:
        qk, v: ``(batch, heads, 1, head_dim)`` the new position's shared query/key and value.
        lengths: ``(batch,)`` int64 positions already kept per row.
        max_length: ``int(lengths.max())`` if the caller knows it (saves a device sync).

    Returns:
        ``(batch, heads, 1, head_dim_v)`` in ``v``'s dtype.
    """
    batch, heads, _, head_dim = qk.shape
    max_length = int(lengths.max()) if max_length is None else max_length
    cache.reserve(max_length + 1)
    bucket = hash_vectors(qk, cache.rotations, cache.n_buckets)  # (batch, heads, rounds, 1)
    rounds, window = bucket.shape[2], cache.window
    ring = cache.rings.gather(3, bucket[..., None].expand(-1, -1, -1, 1, window)).view(
        batch, heads, rounds * window
    )
    occupied = ring >= 0
    positions = ring.long().clamp(min=0)
    keys = cache.keys.gather(2, positions[..., None].expand(-1, -1, -1, head_dim))
    values = cache.values.gather(2, positions[..., None].expand(-1, -1, -1, cache.values.shape[-1]))

    acc = torch.float64 if qk.dtype == torch.float64 else torch.float32
    scores = torch.matmul(qk.to(keys.dtype), keys.transpose(-1, -2)).to(acc)  # (batch, heads, 1, r * w)
    scores = scores.masked_fill(~occupied[:, :, None], float("-inf"))
    # The own key, once per round at SELF_MASK_VALUE, as one entry of weight `rounds`.
    self_score = scores.new_full((batch, heads, 1, 1), SELF_MASK_VALUE + math.log(rounds))
    probs = torch.cat([scores, self_score], dim=-1).softmax(-1).to(values.dtype)
    values = torch.cat([values, v.to(values.dtype)], dim=2)
    out = torch.matmul(probs, values).to(v.dtype)

    # Enter the new position: keys/values at its position, its number in its bucket's ring.
    write_at(cache.keys, 2, lengths, normalize_keys(qk).to(cache.keys.dtype))
    write_at(cache.values, 2, lengths, v.to(cache.values.dtype))
    count = cache.counts.gather(-1, bucket)  # (batch, heads, rounds, 1)
    flat = cache.rings.view(batch, heads, rounds, -1)
    slot = bucket * window + count % window
    flat.scatter_(-1, slot, lengths.view(batch, 1, 1, 1).expand_as(slot).to(flat.dtype))
    cache.counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    return out
