"""Attention over chunks of a permuted sequence: the plans of LSH and local attention for the blocked core.

Every query chunk attends to a few neighbouring key chunks. Which rows form a chunk is given by row
indices, so the same plan serves LSH attention (rows sorted by bucket, one run per hash round) and
local attention (rows in order, one run). The hash rounds of a query are combined by their
log-sum-exp weights, which is the same as one softmax over all the keys a query sees in all rounds;
:mod:`.blocked` computes that and recomputes the scores block by block in the backward pass, so memory
stays O(length): no (chunk x keys) score tensor outlives one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocked import HIDDEN, LOG2E, blocked_attention, register_plan, take

# A query's own key under the shared-QK rule (trax/HF; docs/architecture.md, "The math", step 7): the
# low score -1e5, so it is seen only when nothing else is.
SELF_MASK_VALUE = -1e5
# Scores held at once: (chunks in a block) x chunk x keys. 2**20 float32 values is 4 MiB: smaller
# blocks stay in cache (measured faster than 16 MiB) and keep the temporaries small.
BLOCK_SCORES = 2**20


@register_plan
@dataclass
class ChunkPlan:
    """Which rows attend to which, for ``slices`` independent (batch, head) slices.

    Attributes:
        chunk_rows: ``(slices * rounds * chunks, chunk)`` int64 rows of the flattened
            ``(slices * length, dim)`` inputs, round-major within a slice.
        neighbours: ``(slices * rounds * chunks, window)`` int64 indices into ``chunk_rows`` of the key
            chunks each query chunk attends to, in order.
        key_valid: ``(slices * length,)`` bool, False for padding keys, or None.
        rounds: hash rounds per slice (1 for local and exact attention).
        causal: mask keys at later positions than the query.
        self_mask: give a query's own key the low score -1e5 (shared-QK attention).
        bucket_ids: ``(slices * rounds * chunks, chunk)`` int64 bucket of every entry of ``chunk_rows``,
            or None. When given (the ``own_bucket`` rule of causal LSH attention), a query sees only keys
            of its own bucket at most ``bucket_window`` sorted places before it, in its own round and
            through unwrapped neighbour slots (``slot_ok``): keys that depend only on earlier positions.
        slot_ok: ``(slices * rounds * chunks, window)`` bool, True where neighbour slot ``s`` of a
            query chunk holds the chunk ``s - before`` places after it in the same round (no wrap).
        bucket_window: W, the sorted distance limit of ``bucket_ids`` (queries see W earlier keys).
        before: neighbour chunks before a query chunk (the sorted distance of slot ``s`` is
            ``(before - s) * chunk`` plus the in-chunk offsets).
    """

    chunk_rows: torch.Tensor
    neighbours: torch.Tensor
    key_valid: torch.Tensor | None
    slices: int
    rounds: int
    causal: bool
    self_mask: bool
    bucket_ids: torch.Tensor | None = None
    slot_ok: torch.Tensor | None = None
    bucket_window: int = 0
    before: int = 0

    @classmethod
    def shared_by_heads(
        cls,
        chunk_rows: torch.Tensor,
        neighbours: torch.Tensor,
        key_valid: torch.Tensor | None,
        heads: int,
        rounds: int,
        causal: bool,
        self_mask: bool,
    ) -> ChunkPlan:
        """A plan whose ``neighbours`` ``(batch, chunks per slice, window)`` and ``key_valid``
        ``(batch, length)`` are given per batch row and shared by that row's ``heads`` slices."""
        batch, _, window = neighbours.shape
        return cls(
            chunk_rows=chunk_rows,
            neighbours=neighbours[:, None].expand(batch, heads, -1, -1).reshape(-1, window),
            key_valid=None if key_valid is None else key_valid[:, None].expand(batch, heads, -1).reshape(-1),
            slices=batch * heads,
            rounds=rounds,
            causal=causal,
            self_mask=self_mask,
        )

    def blocks(self) -> list[tuple[torch.Tensor, bool]]:
        """Query chunk ids in processing order, grouped so that each block stays within one round, each
        with whether it is in the first round (its rows' first visit).

        A row appears once per round, so inside a block every query row is distinct.
        """
        n_chunks, chunk = self.chunk_rows.shape
        window = self.neighbours.shape[1]
        per_round = n_chunks // (self.slices * self.rounds)
        per_block = max(1, BLOCK_SCORES // (chunk * chunk * window))
        device = self.chunk_rows.device
        slice_start = torch.arange(self.slices, device=device)[:, None] * (self.rounds * per_round)
        within = torch.arange(per_round, device=device)[None, :]
        blocks = []
        for r in range(self.rounds):
            ids = (slice_start + r * per_round + within).reshape(-1)
            blocks.extend((block, r == 0) for block in ids.split(per_block))
        return blocks

    def block_rows(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows ``(n, chunk)`` and key rows ``(n, window * chunk)`` of the chunks in ``block``."""
        q_rows = self.chunk_rows.index_select(0, block)
        k_chunks = self.neighbours.index_select(0, block) + self._slice_base(block)[:, None]
        return q_rows, take(self.chunk_rows, k_chunks).view(block.shape[0], -1)

    def mask_scores(
        self, scores: torch.Tensor, block: torch.Tensor, q_rows: torch.Tensor, k_rows: torch.Tensor
    ) -> torch.Tensor:
        """The causal, padding and self masks on the scores ``(n, chunk, window * chunk)`` of ``block``.

        Rows of one slice are numbered in position order, so the causal mask compares rows.
        """
        own_bucket = self.bucket_ids is not None
        if self.causal and not own_bucket:  # own_bucket implies it: a bucket is sorted by position
            scores.masked_fill_(q_rows[:, :, None] < k_rows[:, None, :], HIDDEN)
        if self.key_valid is not None:
            scores.masked_fill_(~take(self.key_valid, k_rows)[:, None, :], HIDDEN)
        if own_bucket:
            return self._mask_outside_own_bucket(scores, block)
        if self.self_mask:
            scores.masked_fill_(q_rows[:, :, None] == k_rows[:, None, :], SELF_MASK_VALUE * LOG2E)
        return scores

    def _slice_base(self, block: torch.Tensor) -> torch.Tensor:
        """The first chunk id of each block chunk's slice (neighbour ids are within a slice)."""
        per_slice = self.chunk_rows.shape[0] // self.slices
        return block - block % per_slice

    def _mask_outside_own_bucket(self, scores: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """The self mask and the ``own_bucket`` rule on the scores ``(n, chunk, window * chunk)`` of the
        chunks in ``block``: keys of another bucket, later or more than ``bucket_window`` sorted places
        earlier, or in a neighbour slot that wrapped around (to another round, or onto a later chunk) get
        the hidden score."""
        n, chunk = block.shape[0], self.chunk_rows.shape[1]
        window = self.neighbours.shape[1]
        k_chunks = self.neighbours.index_select(0, block) + self._slice_base(block)[:, None]
        q_bucket = self.bucket_ids.index_select(0, block)
        k_bucket = self.bucket_ids.index_select(0, k_chunks.reshape(-1)).view(n, window, chunk)
        k_bucket = k_bucket.masked_fill(~self.slot_ok.index_select(0, block)[..., None], -1).view(n, -1)
        # Sorted distance from query i to key j of slot s (unwrapped): i - j + (before - s) * chunk; the
        # query's own key is the one at distance 0.
        offset = torch.arange(chunk, device=block.device)
        slot_start = (self.before - torch.arange(window, device=block.device)) * chunk
        distance = (offset[:, None, None] - offset + slot_start[:, None]).view(chunk, window * chunk)
        if self.self_mask:
            scores.masked_fill_(distance == 0, SELF_MASK_VALUE * LOG2E)
        hidden = (q_bucket[:, :, None] != k_bucket[:, None, :]) | (
            (distance < 0) | (distance > self.bucket_window)
        )
        return scores.masked_fill_(hidden, HIDDEN)


def chunk_neighbours(
    real_chunks: torch.Tensor | None,
    batch: int,
    rounds: int,
    chunks: int,
    before: int,
    after: int,
    device: torch.device,
) -> torch.Tensor:
    """Neighbour chunk ids ``(batch, rounds * chunks, before + 1 + after)`` within one slice.

    Chunk ``i`` of the round-concatenated sequence looks at ``i - before .. i + after``, wrapping
    around at the ends (trax and HF do the same; causal masking makes the wrap harmless for decoders).
    Chunks made only of padding are skipped over: ``real_chunks`` ``(batch,)`` says how many chunks
    of each round hold real tokens (padding sorts last), so the keys a real token sees do not depend
    on how much padding follows it.
    """
    ids = torch.arange(rounds * chunks, device=device)
    deltas = torch.arange(-before, after + 1, device=device)
    plain = (ids[:, None] + deltas) % (rounds * chunks)
    if real_chunks is None:
        return plain.expand(batch, -1, -1)
    m = real_chunks.clamp(1, chunks).view(batch, 1, 1)
    rnd, pos = ids // chunks, ids % chunks
    compact = (rnd * m.squeeze(-1) + pos)[..., None] + deltas  # (batch, rounds*chunks, window)
    compact = compact % (rounds * m)
    mapped = (compact // m) * chunks + compact % m
    is_real = (pos[None, :] < m.view(batch, 1))[..., None]
    return torch.where(is_real, mapped, plain)


def unwrapped_slots(neighbours: torch.Tensor, chunks: int, before: int) -> torch.Tensor:
    """Bool ``(batch, rounds * chunks, window)``: True where slot ``s`` of chunk ``i`` of
    :func:`chunk_neighbours`' table holds chunk ``i + s - before`` of the same round, i.e. where the
    window did not wrap around a round's end (nor skip padding chunks)."""
    _, n, window = neighbours.shape
    ids = torch.arange(n, device=neighbours.device)
    rnd, pos = ids // chunks, ids % chunks
    wanted = pos[:, None] + torch.arange(-before, window - before, device=neighbours.device)
    in_round = (wanted >= 0) & (wanted < chunks)
    return in_round & (neighbours == (rnd * chunks)[:, None] + wanted)


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, length, dim)`` -> ``(batch * heads * length, dim)``: the rows a plan addresses."""
    return x.reshape(-1, x.shape[-1])


def draw_call_seed() -> int:
    """A 62-bit seed from the default CPU generator (follows ``torch.manual_seed``; no device sync).

    Under torch.compile it is drawn eagerly (one graph break), not by the compiled graph's own random
    number generator: compiled and eager calls then hash and drop out alike."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_draw_call_seed)()
    return _draw_call_seed()


def _draw_call_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ChunkPlan,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Attention of every query chunk over its neighbour chunks, rounds combined by log-sum-exp.

    Args:
        q, k: ``(slices * length, dim)`` queries and keys, rows addressed by ``plan``.
        v: ``(slices * length, dim_v)``.
        plan: the chunking (see :class:`ChunkPlan`).
        dropout_p: attention-probability dropout; needs ``seed`` so the backward replays the masks.

    Returns:
        ``(slices * length, dim_v)`` in ``v``'s dtype; zeros for a query whose every key is masked
        (and no gradient through it). The backward pass is not differentiable again.
    """
    return blocked_attention(q, k, v, plan, dropout_p=dropout_p, seed=seed)
