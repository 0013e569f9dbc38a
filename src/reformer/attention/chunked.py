"""Attention over chunks of a permuted sequence: the memory-lean core shared by LSH and local attention.

Every query chunk attends to a few neighbouring key chunks. Which rows form a chunk is given by row
indices, so the same code serves LSH attention (rows sorted by bucket, one run per hash round) and
local attention (rows in order, one run). The hash rounds of a query are combined by their
log-sum-exp weights, which is the same as one softmax over all the keys a query sees in all rounds;
the backward pass uses that identity and recomputes the scores block by block, as FlashAttention
does, so memory stays O(length): no (chunk x keys) score tensor outlives one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

# The trax/HF mask constants (docs/architecture.md, "The math", step 7). Scores are kept in float32
# (float64 for float64 inputs) whatever the input dtype, so the float32 constants serve every dtype,
# float16 included.
MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5
# Scores are kept in base 2 (scaled by log2(e)): exp2 is fast everywhere, while exp slows down ~10x on
# CPU for arguments below -87, which masked entries always are.
LOG2E = 1.4426950408889634
# A query whose every key is masked has a log-sum-exp near MASK_VALUE * LOG2E (real scores never come
# within orders of magnitude of it): such a query gets a zero output and passes no gradient.
EMPTY_LSE = MASK_VALUE * LOG2E / 2
# Scores held at once: (chunks in a block) x chunk x keys. 2**20 float32 values is 4 MiB: smaller
# blocks stay in cache (measured faster than 16 MiB) and keep the temporaries small.
BLOCK_SCORES = 2**20


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

    def blocks(self) -> list[torch.Tensor]:
        """Query chunk ids in processing order, grouped so that each block stays within one round.

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
            blocks.extend(ids.split(per_block))
        return blocks


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


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics and accumulators: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scores(q, k, plan: ChunkPlan, q_rows, k_rows, block) -> torch.Tensor:
    """Masked scores ``(n, chunk, window*chunk)`` in base 2 (``log2(e) * q.k``), at least float32.

    Masked entries are constants, and in the backward pass their gradient vanishes without being
    masked again: their probability is exactly zero (``2**(-1.4e9 - lse)``), except where a query sees
    only itself, and there ``dP - D = g.v_self - g.v_self`` is zero.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_acc_dtype(q)).mul_(LOG2E)
    own_bucket = plan.bucket_ids is not None
    if plan.causal and not own_bucket:  # own_bucket implies it: a bucket is sorted by position
        scores.masked_fill_(q_rows[:, :, None] < k_rows[:, None, :], MASK_VALUE * LOG2E)
    if plan.key_valid is not None:
        scores.masked_fill_(~_take(plan.key_valid, k_rows)[:, None, :], MASK_VALUE * LOG2E)
    if own_bucket:
        return _mask_outside_own_bucket(scores, plan, block)
    if plan.self_mask:
        scores.masked_fill_(q_rows[:, :, None] == k_rows[:, None, :], SELF_MASK_VALUE * LOG2E)
    return scores


def _mask_outside_own_bucket(scores: torch.Tensor, plan: ChunkPlan, block: torch.Tensor) -> torch.Tensor:
    """The self mask and the ``own_bucket`` rule on the scores ``(n, chunk, window * chunk)`` of the
    chunks in ``block``: keys of another bucket, later or more than ``bucket_window`` sorted places
    earlier, or in a neighbour slot that wrapped around (to another round, or onto a later chunk) get
    the mask value."""
    n, chunk = block.shape[0], plan.chunk_rows.shape[1]
    window = plan.neighbours.shape[1]
    per_slice = plan.chunk_rows.shape[0] // plan.slices
    k_chunks = plan.neighbours.index_select(0, block) + (block - block % per_slice)[:, None]
    q_bucket = plan.bucket_ids.index_select(0, block)
    k_bucket = plan.bucket_ids.index_select(0, k_chunks.reshape(-1)).view(n, window, chunk)
    k_bucket = k_bucket.masked_fill(~plan.slot_ok.index_select(0, block)[..., None], -1).view(n, -1)
    # Sorted distance from query i to key j of slot s (unwrapped): i - j + (before - s) * chunk; the
    # query's own key is the one at distance 0.
    offset = torch.arange(chunk, device=block.device)
    slot_start = (plan.before - torch.arange(window, device=block.device)) * chunk
    distance = (offset[:, None, None] - offset + slot_start[:, None]).view(chunk, window * chunk)
    if plan.self_mask:
        scores.masked_fill_(distance == 0, SELF_MASK_VALUE * LOG2E)
    hidden = (q_bucket[:, :, None] != k_bucket[:, None, :]) | (
        (distance < 0) | (distance > plan.bucket_window)
    )
    return scores.masked_fill_(hidden, MASK_VALUE * LOG2E)


def _block_rows(plan: ChunkPlan, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows ``(n, chunk)`` and key rows ``(n, window * chunk)`` of the chunks in ``block``."""
    n, window = block.shape[0], plan.neighbours.shape[1]
    q_rows = plan.chunk_rows.index_select(0, block)
    per_slice = plan.chunk_rows.shape[0] // plan.slices
    slice_base = block - block % per_slice
    k_chunks = plan.neighbours.index_select(0, block) + slice_base[:, None]
    k_rows = plan.chunk_rows.index_select(0, k_chunks.reshape(-1)).view(n, window * plan.chunk_rows.shape[1])
    return q_rows, k_rows


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, length, dim)`` -> ``(batch * heads * length, dim)``: the rows a plan addresses."""
    return x.reshape(-1, x.shape[-1])


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for 2-D ``rows`` ``(n, m)``: ``(n, m, ...)``, through the faster index_select."""
    return x.index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[1:])


def _dropout_mask(shape, p: float, generator: torch.Generator, device, dtype) -> torch.Tensor:
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype).div_(1.0 - p)


def merge_round(acc, run_max, run_sum, rows, out, lse, first: bool, base2: bool) -> None:
    """Fold one round's attention into the running results (online log-sum-exp; docs/architecture.md,
    "The math", step 9).

    ``out`` ``(n, dim)`` is the round's normalised output for the query ``rows`` ``(n,)`` (distinct) and
    ``lse`` ``(n,)`` its log-sum-exp, in base 2 if ``base2`` else base e. ``acc`` ``(rows, dim)``,
    ``run_max`` and ``run_sum`` ``(rows,)`` are updated in place: the output so far, the largest LSE and
    the sum of ``exp(lse - run_max)``. The first round just writes.
    """
    if first:
        acc.index_copy_(0, rows, out)
        run_max.index_copy_(0, rows, lse)
        run_sum.index_fill_(0, rows, 1.0)
        return
    exp_ = torch.Tensor.exp2_ if base2 else torch.Tensor.exp_
    old_max = run_max[rows]
    new_max = torch.maximum(old_max, lse)
    old_scale, new_scale = exp_(old_max - new_max), exp_(lse - new_max)
    acc.index_copy_(0, rows, acc[rows] * old_scale[:, None] + out * new_scale[:, None])
    run_sum.index_copy_(0, rows, run_sum[rows] * old_scale + new_scale)
    run_max.index_copy_(0, rows, new_max)


def merged_output(acc, run_max, run_sum, dtype, empty_lse: float, base2: bool):
    """The output ``(rows, dim)`` in ``dtype`` and the total log-sum-exp ``(rows,)`` of the merged rounds.

    Queries with no allowed key (LSE below ``empty_lse``) get a zero output and an infinite LSE, which
    makes their backward probabilities exactly zero, consistent with an output that does not depend on
    q, k or v.
    """
    total_lse = run_max + (run_sum.log2() if base2 else run_sum.log())
    empty = total_lse < empty_lse
    out = (acc / run_sum[:, None]).masked_fill_(empty[:, None], 0.0).to(dtype)
    return out, total_lse.masked_fill_(empty, float("inf"))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: ChunkPlan, dropout_p: float, seed: int | None):
        rows, acc_dtype = q.shape[0], _acc_dtype(q)
        acc = torch.zeros(rows, v.shape[1], dtype=acc_dtype, device=q.device)
        run_max = torch.full((rows,), float("-inf"), dtype=acc_dtype, device=q.device)
        run_sum = torch.zeros(rows, dtype=acc_dtype, device=q.device)
        generator = _generator(seed, q.device)
        blocks = plan.blocks()
        per_round = len(blocks) // plan.rounds
        for i, block in enumerate(blocks):
            q_rows, k_rows = _block_rows(plan, block)
            scores = _scores(_take(q, q_rows), _take(k, k_rows), plan, q_rows, k_rows, block)
            # Softmax with a single exp pass; the 1/sum is applied to the (smaller) output.
            row_max = scores.amax(dim=-1, keepdim=True)
            weights = scores.sub_(row_max).exp2_()
            row_sum = weights.sum(dim=-1)
            if dropout_p > 0.0:
                weights.mul_(_dropout_mask(weights.shape, dropout_p, generator, q.device, acc_dtype))
            out = torch.matmul(weights.to(v.dtype), _take(v, k_rows)).to(acc_dtype)
            out = out.div_(row_sum[..., None]).flatten(0, 1)
            lse = (row_max.squeeze(-1) + row_sum.log2()).reshape(-1)
            merge_round(acc, run_max, run_sum, q_rows.reshape(-1), out, lse, i < per_round, base2=True)
        out, total_lse = merged_output(acc, run_max, run_sum, v.dtype, EMPTY_LSE, base2=True)
        ctx.save_for_backward(q, k, v, out, total_lse)
        ctx.plan, ctx.dropout_p, ctx.seed = plan, dropout_p, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, total_lse = ctx.saved_tensors
        plan, dropout_p = ctx.plan, ctx.dropout_p
        grad_out, acc_dtype = grad_out.contiguous(), _acc_dtype(q)
        delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
        generator = _generator(ctx.seed, q.device)
        for block in plan.blocks():
            q_rows, k_rows = _block_rows(plan, block)
            q_blk, k_blk, v_blk = _take(q, q_rows), _take(k, k_rows), _take(v, k_rows)
            g_blk = _take(grad_out, q_rows)
            scores = _scores(q_blk, k_blk, plan, q_rows, k_rows, block)
            # One softmax over all rounds: P = 2**(s - LSE_total), all in base 2.
            probs = scores.sub_(_take(total_lse, q_rows)[..., None]).exp2_()
            grad_probs = torch.matmul(g_blk, v_blk.transpose(-1, -2)).to(acc_dtype)
            if dropout_p > 0.0:
                keep = _dropout_mask(probs.shape, dropout_p, generator, q.device, acc_dtype)
                dv_blk = torch.matmul((probs * keep).transpose(-1, -2).to(g_blk.dtype), g_blk)
                grad_probs.mul_(keep)
            else:
                dv_blk = torch.matmul(probs.transpose(-1, -2).to(g_blk.dtype), g_blk)
            grad_scores = probs.mul_(grad_probs.sub_(_take(delta, q_rows)[..., None])).to(q.dtype)
            flat_q, flat_k = q_rows.reshape(-1), k_rows.reshape(-1)
            dq.index_add_(0, flat_q, torch.matmul(grad_scores, k_blk).to(acc_dtype).flatten(0, 1))
            dk.index_add_(
                0, flat_k, torch.matmul(grad_scores.transpose(-1, -2), q_blk).to(acc_dtype).flatten(0, 1)
            )
            dv.index_add_(0, flat_k, dv_blk.to(acc_dtype).flatten(0, 1))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def draw_call_seed() -> int:
    """A 62-bit seed from the default CPU generator (follows ``torch.manual_seed``; no device sync)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


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
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention dropout needs a seed so that the backward pass can replay its masks")
    return _ChunkedAttention.apply(q, k, v, plan, dropout_p, seed)
