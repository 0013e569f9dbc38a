"""LSH cross-attention: decoder queries over the encoder keys that hash near them.

The rule, per (batch row, head, hash round), for ``L_dec`` queries and ``L_enc`` keys:

1. Queries and keys are hashed by the same random rotations (angular LSH of the normalised vectors:
   ``argmax([xR; -xR])``). Padding (``query_mask`` / ``key_mask`` False) gets the bucket
   ``n_buckets``, one past the last, so it sorts last.
2. Queries and keys are each sorted by (bucket, position); ``n_real_k`` is the row's count of real keys.
3. The sorted queries (padded with padding queries to a multiple of ``chunk_size``) are cut into chunks
   of ``chunk_size``. A chunk spans the buckets ``[lo, hi]`` of its first and last real query; the keys
   of those buckets are the contiguous sorted range ``[start, end)`` (``searchsorted``).
4. The chunk attends to the ``window`` sorted keys ``[a, a + window)`` centred on that range and moved
   inside the real keys: ``a = min(max((start + end - window) // 2, 0), max(n_real_k - window, 0))``;
   keys of that window beyond ``n_real_k`` (only when ``n_real_k < window``) are masked. So a chunk sees
   its buckets' keys when they number at most ``window``, the central ``window`` of them otherwise, and
   the sorted neighbours on either side when they are fewer (the "neighbour window").
5. A query's output is one softmax over all the (round, key) pairs it sees (a key seen in two rounds
   counts twice), computed as per-round softmaxes merged by their log-sum-exp weights. Padding
   queries, and queries of a row without real keys, get zeros.

Time is O((L_dec + L_enc) log) for the sorts plus ``L_dec x window x n_hashes`` for the scores; with
``L_enc <= window`` every chunk sees every key and the result is exact cross-attention. A real query's
output depends neither on how many padding queries nor on how many padding keys its row has.
The scores are computed block by block and recomputed in the backward pass from the saved log-sum-exp
(memory O(n_hashes x (L_dec + L_enc)) besides one block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hashing import auto_n_buckets, draw_rotations, hash_vectors, total_buckets
from .blocked import HIDDEN, blocked_attention, register_plan
from .chunked import draw_call_seed
from .cross import CrossAttention, check_cross_inputs
from .lsh_cross_cache import LSHCrossCache

# Scores held at once: (chunks in a block) x chunk_size x window.
BLOCK_SCORES = 2**21


@register_plan
@dataclass
class CrossPlan:
    """Which flat rows attend to which, per hash round.

    Attributes:
        q_rows: ``(rounds, n, chunk_size)`` int64 rows of the flattened ``(slices * L_dec_padded, dim)``
            queries; within a round every row appears once.
        k_rows: ``(rounds, n, window)`` int64 rows of the flattened ``(slices * L_enc, dim)`` keys.
        k_ok: ``(rounds, n, window)`` bool, False for masked window entries.
    """

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    k_ok: torch.Tensor

    def blocks(self) -> list[tuple[tuple[int, torch.Tensor], bool]]:
        """``(round, chunk ids)`` blocks, round by round (a round visits every query row once)."""
        rounds, n, chunk = self.q_rows.shape
        per_block = max(1, BLOCK_SCORES // (chunk * self.k_rows.shape[-1]))
        ids = torch.arange(n, device=self.q_rows.device)
        return [((r, block), r == 0) for r in range(rounds) for block in ids.split(per_block)]

    def block_rows(self, block: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        r, chunks = block
        return self.q_rows[r].index_select(0, chunks), self.k_rows[r].index_select(0, chunks)

    def mask_scores(self, scores, block, q_rows, k_rows) -> torch.Tensor:
        r, chunks = block
        return scores.masked_fill_(~self.k_ok[r].index_select(0, chunks)[:, None, :], HIDDEN)


@torch.no_grad()
def lsh_cross_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    rotations: torch.Tensor,
    n_buckets: int | tuple[int, ...],
    chunk_size: int,
    window: int,
    query_valid: torch.Tensor | None,
    key_valid: torch.Tensor | None,
) -> CrossPlan:
    """The rows each query chunk attends to under the module docstring's rule (``q`` already padded to a
    multiple of ``chunk_size``, ``query_valid`` ``(batch, L_dec_padded)`` marking the added rows)."""
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    total = total_buckets(n_buckets)
    q_buckets = hash_vectors(q, rotations, n_buckets)  # (batch, heads, rounds, lq)
    k_buckets = hash_vectors(k, rotations, n_buckets)
    if query_valid is not None:
        q_buckets.masked_fill_(~query_valid[:, None, None, :], total)
    if key_valid is not None:
        k_buckets.masked_fill_(~key_valid[:, None, None, :], total)
    q_sorted, q_order = torch.sort(q_buckets, dim=-1, stable=True)
    k_sorted, k_order = torch.sort(k_buckets, dim=-1, stable=True)
    rounds, chunks = q_buckets.shape[2], lq // chunk_size
    q_sorted = q_sorted.view(batch, heads, rounds, chunks, chunk_size)
    lo = q_sorted[..., 0].contiguous()
    hi = q_sorted.masked_fill(q_sorted == total, -1).amax(-1)
    start = torch.searchsorted(k_sorted, lo, right=False)
    end = torch.searchsorted(k_sorted, hi, right=True)
    n_real = torch.full((batch,), lk, device=q.device) if key_valid is None else key_valid.sum(-1)
    n_real = n_real.view(batch, 1, 1, 1)
    first = torch.minimum(((start + end - window) // 2).clamp(min=0), (n_real - window).clamp(min=0))
    places = first[..., None] + torch.arange(
        window, device=q.device
    )  # (batch, heads, rounds, chunks, window)
    k_ok = places < n_real[..., None]
    k_pos = k_order.gather(-1, places.clamp(max=lk - 1).flatten(-2)).view_as(places)
    slices = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1)
    q_rows = (q_order + slices * lq).view(batch, heads, rounds, chunks, chunk_size)
    k_rows = k_pos + (slices * lk)[..., None]

    def round_major(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(2, 0).reshape(rounds, batch * heads * chunks, t.shape[-1])

    return CrossPlan(round_major(q_rows), round_major(k_rows), round_major(k_ok))


def lsh_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_buckets: int | tuple[int, ...],
    n_hashes: int = 2,
    chunk_size: int = 64,
    window: int | None = None,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    rotations: torch.Tensor | None = None,
    hash_seed: int | None = None,
    plan: CrossPlan | None = None,
    return_plan: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CrossPlan]:
    """LSH cross-attention of decoder queries over encoder keys (the rule of the module docstring).

    Args:
        q: ``(batch, heads, L_dec, head_dim)``; k: ``(batch, heads, L_enc, head_dim)``;
            v: ``(batch, heads, L_enc, head_dim_v)``.
        n_buckets: an even integer or even factors (e.g. ``auto_n_buckets(L_enc, chunk_size)``).
        window: keys per query chunk; default ``2 * chunk_size * ceil(L_enc / L_dec)``, so that the keys
            of the buckets a chunk spans (about ``chunk_size * L_enc / L_dec``) fit when the lengths
            differ, and the scores cost ``2 * chunk_size * max(L_dec, L_enc)`` per round. Give it
            explicitly for outputs that do not depend on the padded lengths.
        query_mask: ``(batch, L_dec)``, False for padding queries (zero output).
        key_mask: ``(batch, L_enc)``, False for padding keys.
        rotations: ``(heads, head_dim, n_hashes, sum(factors) // 2)``; else drawn from ``hash_seed``
            (else from the default generator).
        plan: a plan from an earlier call (``return_plan=True``) to replay its buckets exactly.

    Returns:
        ``(batch, heads, L_dec, head_dim_v)`` in ``v``'s dtype (and the plan if asked).
    """
    key_valid = check_cross_inputs(q, k, v, key_mask)
    batch, heads, lq, head_dim = q.shape
    if query_mask is not None and query_mask.shape != (batch, lq):
        raise ValueError(
            f"query_mask has shape {tuple(query_mask.shape)}, expected (batch, L_dec) = {(batch, lq)}"
        )
    if window is None:
        window = 2 * chunk_size * max(1, -(-k.shape[2] // lq))
    if chunk_size < 1 or window < 1 or n_hashes < 1:
        raise ValueError(f"chunk_size={chunk_size}, window={window} and n_hashes={n_hashes} must be positive")
    window = min(window, k.shape[2])  # wider windows start at 0 and mask the rest: the same outputs
    padded = -(-lq // chunk_size) * chunk_size
    query_valid = None if query_mask is None else query_mask.to(device=q.device, dtype=torch.bool)
    if padded != lq:
        tail = torch.zeros(batch, padded - lq, dtype=torch.bool, device=q.device)
        head = (
            torch.ones(batch, lq, dtype=torch.bool, device=q.device) if query_valid is None else query_valid
        )
        query_valid = torch.cat([head, tail], 1)
    q_p = torch.nn.functional.pad(q, (0, 0, 0, padded - lq))
    if plan is None:
        if rotations is None:
            seed = draw_call_seed() if hash_seed is None else hash_seed
            rotations = draw_rotations(heads, head_dim, n_hashes, n_buckets, seed=seed, device=q.device)
        plan = lsh_cross_plan(q_p, k, rotations, n_buckets, chunk_size, window, query_valid, key_valid)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    out = blocked_attention(flat(q_p), flat(k), flat(v), plan, scale=1.0 / math.sqrt(head_dim))
    out = out.view(batch, heads, padded, v.shape[-1])
    out = out[:, :, :lq]
    if query_mask is not None:
        out = out.masked_fill(~query_valid[:, None, :lq, None], 0.0)
    return (out, plan) if return_plan else out


class LSHCrossAttention(CrossAttention):
    """LSH cross-attention with its projections (same parameters and call as :class:`CrossAttention`).

    ``n_buckets=None`` picks :func:`~reformer.hashing.auto_n_buckets` of the (padded) source length and
    ``chunk_size``, ``window=None`` the default of :func:`lsh_cross_attention`; pass both to make
    outputs independent of padding. In training the
    rotations are fresh on every call (unless ``hash_seed`` is set); in eval mode they come from
    ``eval_hash_seed``. The ``replay`` record keeps the plan so that a recomputation (reversible
    backward) sees the forward's buckets exactly.
    """

    def __init__(
        self,
        d_model: int,
        d_memory: int,
        n_heads: int,
        *,
        d_head: int | None = None,
        dropout: float = 0.0,
        chunk_size: int = 64,
        window: int | None = None,
        n_hashes: int = 2,
        n_buckets: int | tuple[int, ...] | None = None,
        hash_seed: int | None = None,
        eval_hash_seed: int = 0,
    ) -> None:
        super().__init__(d_model, d_memory, n_heads, d_head=d_head, dropout=dropout)
        self.chunk_size, self.n_hashes, self.n_buckets = chunk_size, n_hashes, n_buckets
        self.window = window
        self.hash_seed, self.eval_hash_seed = hash_seed, eval_hash_seed

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None = None,
        *,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_hashes: int | None = None,
        replay: dict | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        q = self.split_heads(self.to_q(x))
        replay = {} if replay is None else replay
        seed = self.hash_seed
        if seed is None:
            seed = draw_call_seed() if self.training else self.eval_hash_seed
        n_buckets = self.n_buckets or auto_n_buckets(k.shape[2], self.chunk_size)
        out, replay["cross_plan"] = lsh_cross_attention(
            q, k, v, n_buckets=n_buckets, n_hashes=n_hashes or self.n_hashes, chunk_size=self.chunk_size,
            window=self.window, query_mask=query_mask, key_mask=memory_mask, hash_seed=seed,
            plan=replay.get("cross_plan"), return_plan=True,
        )  # fmt: skip
        return self.output(out)

    def prefill_memory(
        self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None, n_hashes: int | None = None
    ) -> LSHCrossCache:
        """The decoding cache of ``memory`` ``(batch, L_enc, d_memory)``: keys and values sorted by bucket in
        every round (eval or fixed seed, ``n_hashes`` rounds, default the layer's)."""
        return LSHCrossCache.build(self, memory, memory_mask, n_hashes)

    def step(self, cache: LSHCrossCache, x_t: torch.Tensor) -> torch.Tensor:
        """One query per row, ``x_t`` ``(batch, 1, d_model)``: its attention ``(batch, 1, d_model)`` by the
        rule of :func:`lsh_cross_attention` for a query chunk holding only itself."""
        return self.output(cache.attend(self.split_heads(self.to_q(x_t))))
