"""Fused LSH attention on the GPU: Triton kernels with the contract of :func:`reformer.lsh_attention`.

The PyTorch path (``lsh.py`` + ``chunked.py``) gathers sorted copies of q/k/v block by block and merges
the hash rounds with ``index_copy_``; on a GPU that is dominated by launch and gather overhead. Here the
whole pipeline is a handful of kernels:

* ``_hash_kernel``: the rotation matmul ``x @ R`` with the ``argmax([xR; -xR])`` of every bucket
  factor in its epilogue; it writes the int64 sort key ``bucket * length + position`` (padding gets the
  extra bucket ``prod(factors)``, so it sorts last) and never the rotated tensor. ``torch.sort`` of the
  keys gives the sort indices (the keys are distinct, so any sort is the stable sort of the PyTorch path).
* ``_fwd_kernel``: one launch per hash round, persistent over ``(slice, chunk)`` tiles. A tile loads its
  query rows through the sort indices, runs an online softmax over the ``before + 1 + after`` neighbour
  chunks (the table of :func:`~reformer.attention.chunked.chunk_neighbours`: chunks wrap across rounds,
  all-padding chunks are skipped) and merges its normalised output and log-sum-exp with those of the
  earlier rounds at the rows' original positions. Within a round a row belongs to one chunk only, so the
  merge needs no atomics; the rounds run one launch after another.
* ``_delta_kernel``, ``_dq_kernel``, ``_dkdv_kernel``: the FlashAttention backward. The rounds' log-sum-exp
  combination is one softmax over every key a query sees in any round, so ``P = 2**(s - LSE_total)`` and
  ``dS = P * (dP - rowsum(dO * O))``. ``_dq_kernel`` walks each query chunk's neighbours; ``_dkdv_kernel``
  walks each key chunk's *inverse* neighbours (the same table with ``before`` and ``after`` swapped), so
  both write their rows without atomics and are deterministic.

No ``(chunk x keys)`` score tensor and no sorted copy of q/k/v exists in memory; the only buffers are the
sort keys/indices (int64, ``rounds x length``), the output, and a float32 log-sum-exp per row.

Scores are float32 in base 2 (``log2(e) * q.k``) with the PyTorch path's constants: causal and padding
keys get ``-1e9``, the query's own key ``-1e5``. For float32 inputs every ``tl.dot`` runs in IEEE float32
(TF32 only where ``torch.get_float32_matmul_precision()`` allows it, as for torch's own matmuls), so
results match the PyTorch path to rounding. For bfloat16/float16 the round merge and the
cross-round gradient sums are stored in the input dtype (float32 inside a tile).

With ``key_rule="own_bucket"`` (truly causal LSH) the kernels also read the sorted bucket ids and mask,
as ``chunked._mask_outside_own_bucket`` does, keys of another bucket, keys more than
``before * bucket_size`` sorted places before the query, and neighbour slots that wrapped around; such
sequences are hashed and run on the kernels even when they fit in one chunk.

Input checks, padding, rotations and the replay of sort indices are :func:`reformer.lsh_attention`'s,
shared with the PyTorch path: with ``backend="triton"`` it hashes with ``hash_sort_indices`` and hands
the padded, sorted problem to :func:`fused_lsh_core`. Not covered by the kernels, and delegated to the
PyTorch path: sequences up to one chunk (exact
attention), attention dropout (its masks come from ``torch.rand``), and float64.

Triton is optional: this module imports without it; :func:`is_available` says whether the kernels can
run and :func:`triton_lsh_attention` raises a clear error otherwise. On CPU tensors the kernels run only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

from __future__ import annotations

import os

import torch

from ..hashing import bucket_factors, total_buckets
from .chunked import LOG2E, MASK_VALUE, SELF_MASK_VALUE, chunk_neighbours

try:  # optional dependency: the `[gpu]` extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# The interpreter setting is read by ``triton.jit`` when the kernels below are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Bucket factors the hash kernel handles (more fall back to the PyTorch hashing).
MAX_FACTORS = 4
# Persistent programs per streaming multiprocessor.
PROGRAMS_PER_SM = 8


def is_available() -> bool:
    """True when triton is importable (the kernels then run on CUDA tensors, or on CPU interpreted)."""
    return triton is not None


def require_triton() -> None:
    """Raise an ImportError naming the fix when triton is missing."""
    if triton is None:
        raise ImportError(
            "backend='triton' needs the triton package: pip install 'reformer[gpu]' (or pip install triton); "
            "use backend='torch' or 'auto' to run without it"
        )


if triton is not None:

    @triton.jit
    def _factor_ids(rot, cols, OFFSET: tl.constexpr, HALF: tl.constexpr):
        """``argmax([x; -x])`` over columns ``OFFSET .. OFFSET + HALF`` of ``rot`` (ties: first index,
        ``x`` before ``-x``, as :func:`reformer.hashing._argmax_of_plus_minus`)."""
        inside = (cols >= OFFSET) & (cols < OFFSET + HALF)
        top_vals = tl.where(inside[None, :], rot, float("-inf"))
        bottom_vals = tl.where(inside[None, :], rot, float("inf"))
        top = tl.max(top_vals, axis=1)
        bottom = tl.min(bottom_vals, axis=1)
        top_idx = tl.argmax(top_vals, axis=1, tie_break_left=True) - OFFSET
        bottom_idx = tl.argmin(bottom_vals, axis=1, tie_break_left=True) - OFFSET
        return tl.where(top >= -bottom, top_idx, bottom_idx + HALF).to(tl.int64)

    @triton.jit
    def _hash_kernel(
        QK, Rot, Valid, Keys,
        heads, length, n_rounds, n_lblocks, pad_bucket,
        s_qb, s_qh, s_ql, s_rh, s_rd, s_rr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
        F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
        HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Sort keys ``bucket * length + position`` of one block of rows in one round.

        Grid: ``(slices * rounds * n_lblocks,)``. ``Keys`` is ``(slices, rounds, length)`` int64.
        """
        tile = tl.program_id(0)
        lblock = tile % n_lblocks
        sr = tile // n_lblocks
        rnd = sr % n_rounds
        s = sr // n_rounds
        b = (s // heads).to(tl.int64)
        h = (s % heads).to(tl.int64)
        rows = lblock * BLOCK_L + tl.arange(0, BLOCK_L)
        row_ok = rows < length
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        cols = tl.arange(0, BLOCK_R)
        x = tl.load(
            QK + b * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_ql + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        n_cols: tl.constexpr = (F0 + F1 + F2 + F3) // 2
        rot = tl.load(
            Rot + h * s_rh + dims[:, None] * s_rd + rnd * s_rr + cols[None, :],
            mask=dim_ok[:, None] & (cols < n_cols)[None, :],
            other=0.0,
        )
        rotated = tl.dot(x, rot, input_precision=PRECISION)  # (BLOCK_L, BLOCK_R), never stored
        bucket = _factor_ids(rotated, cols, 0, F0 // 2)
        if F1 > 0:
            bucket += F0 * _factor_ids(rotated, cols, F0 // 2, F1 // 2)
        if F2 > 0:
            bucket += F0 * F1 * _factor_ids(rotated, cols, (F0 + F1) // 2, F2 // 2)
        if F3 > 0:
            bucket += F0 * F1 * F2 * _factor_ids(rotated, cols, (F0 + F1 + F2) // 2, F3 // 2)
        if HAS_VALID:
            valid = tl.load(Valid + b * length + rows, mask=row_ok, other=0)
            bucket = tl.where(valid != 0, bucket, pad_bucket)
        key = bucket * length + rows
        tl.store(Keys + (s.to(tl.int64) * n_rounds + rnd) * length + rows, key, mask=row_ok)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """``a @ b`` accumulated in float32. ``PRECISION == "upcast"`` multiplies in float32 instead: the
        Triton interpreter (3.x) gets bfloat16 ``tl.dot`` wrong, so it is used there for bfloat16 inputs
        (the operands are rounded to bfloat16 first, so the products are the same)."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _chunk_rows(Idx, s, chunk, length, n_rounds, C: tl.constexpr, offs, ok):
        """Original positions (int64) of the rows of round-concatenated chunk ``chunk`` of slice ``s``."""
        base = Idx + s.to(tl.int64) * n_rounds * length + chunk.to(tl.int64) * C
        return tl.load(base + offs, mask=ok, other=0)

    @triton.jit
    def _masked_scores(
        q, k, qpos, kpos, k_ok, Valid, b, length, mask_value, self_value,
        Bkt, s, qchunk, kchunk, gap, rnd, chunks, n_rounds, window_keys, offs,
        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, C: tl.constexpr,
        OWN_BUCKET: tl.constexpr,
    ):  # fmt: skip
        """Scores ``log2(e) * q.k`` (float32) with the causal, padding and self masks of
        ``chunked._scores``; key columns past the chunk get -inf.

        ``OWN_BUCKET`` adds the masks of ``chunked._outside_own_bucket``: the key chunk must be ``gap``
        chunks before the query chunk in round ``rnd`` (no wrapped slot), in the query's bucket (``Bkt``,
        the sorted buckets), and at most ``window_keys`` sorted places before the query."""
        scores = _dot(q, tl.trans(k), PRECISION) * 1.4426950408889634
        if CAUSAL:
            scores = tl.where(qpos[:, None] < kpos[None, :], mask_value, scores)
        if HAS_VALID:
            valid = tl.load(Valid + b * length + kpos, mask=k_ok, other=0)
            scores = tl.where((valid != 0)[None, :], scores, mask_value)
        scores = tl.where(qpos[:, None] == kpos[None, :], self_value, scores)
        if OWN_BUCKET:
            slot_ok = (qchunk - kchunk == gap) & (qchunk // chunks == rnd) & (kchunk // chunks == rnd)
            qb = _chunk_rows(Bkt, s, qchunk, length, n_rounds, C, offs, k_ok)
            kb = _chunk_rows(Bkt, s, kchunk, length, n_rounds, C, offs, k_ok)
            distance = gap * C + offs[:, None] - offs[None, :]
            seen = (qb[:, None] == kb[None, :]) & (distance >= 0) & (distance <= window_keys) & slot_ok
            scores = tl.where(seen, scores, mask_value)
        return tl.where(k_ok[None, :], scores, float("-inf"))

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Idx, Nbr, Real, Valid, Bkt, Out, Lse,
        rnd, n_tiles, heads, length, chunks, n_rounds, mask_value, self_value, before, after, window_keys,
        s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
        C: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, W: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr,
        OWN_BUCKET: tl.constexpr,
    ):  # fmt: skip
        """Round ``rnd`` of the forward pass, persistent over ``slices * chunks`` query-chunk tiles.

        ``Out`` holds the normalised output of the rounds so far and ``Lse`` (float32, base 2,
        ``(slices, length)``) their log-sum-exp; both are indexed by original position.
        """
        offs = tl.arange(0, BLOCK_C)
        row_ok = offs < C
        dq_offs = tl.arange(0, BLOCK_D)
        dv_offs = tl.arange(0, BLOCK_DV)
        dq_ok = dq_offs < D
        dv_ok = dv_offs < DV
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            s = tile // chunks
            cpos = tile % chunks
            b = (s // heads).to(tl.int64)
            h = (s % heads).to(tl.int64)
            if cpos < tl.load(Real + b):  # chunks made only of padding are skipped
                chunk = rnd * chunks + cpos
                qpos = _chunk_rows(Idx, s, chunk, length, n_rounds, C, offs, row_ok)
                q = tl.load(
                    Q + b * s_qb + h * s_qh + qpos[:, None] * s_ql + dq_offs[None, :],
                    mask=row_ok[:, None] & dq_ok[None, :],
                    other=0.0,
                )
                run_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
                run_sum = tl.zeros([BLOCK_C], tl.float32)
                acc = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
                nbr_base = Nbr + (b * n_rounds * chunks + chunk) * W
                for t in tl.static_range(W):
                    kchunk = tl.load(nbr_base + t)
                    kpos = _chunk_rows(Idx, s, kchunk, length, n_rounds, C, offs, row_ok)
                    k = tl.load(
                        K + b * s_kb + h * s_kh + kpos[:, None] * s_kl + dq_offs[None, :],
                        mask=row_ok[:, None] & dq_ok[None, :],
                        other=0.0,
                    )
                    v = tl.load(
                        V + b * s_vb + h * s_vh + kpos[:, None] * s_vl + dv_offs[None, :],
                        mask=row_ok[:, None] & dv_ok[None, :],
                        other=0.0,
                    )
                    scores = _masked_scores(
                        q, k, qpos, kpos, row_ok, Valid, b, length, mask_value, self_value,
                        Bkt, s, chunk, kchunk, before - t, rnd, chunks, n_rounds, window_keys, offs,
                        CAUSAL, HAS_VALID, PRECISION, C, OWN_BUCKET,
                    )  # fmt: skip
                    new_max = tl.maximum(run_max, tl.max(scores, axis=1))
                    scale = tl.exp2(run_max - new_max)
                    p = tl.exp2(scores - new_max[:, None])
                    run_sum = run_sum * scale + tl.sum(p, axis=1)
                    acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, PRECISION)
                    run_max = new_max
                lse = run_max + tl.log2(run_sum)
                out = acc / run_sum[:, None]
                out_ptr = Out + b * s_ob + h * s_oh + qpos[:, None] * s_ol + dv_offs[None, :]
                out_ok = row_ok[:, None] & dv_ok[None, :]
                lse_ptr = Lse + s.to(tl.int64) * length + qpos
                if not FIRST:  # merge with the earlier rounds (REFERENCE.md step 9), in base 2
                    old_lse = tl.load(lse_ptr, mask=row_ok, other=0.0)
                    old_out = tl.load(out_ptr, mask=out_ok, other=0.0).to(tl.float32)
                    top = tl.maximum(old_lse, lse)
                    w_old = tl.exp2(old_lse - top)
                    w_new = tl.exp2(lse - top)
                    total = w_old + w_new
                    out = (old_out * w_old[:, None] + out * w_new[:, None]) / total[:, None]
                    lse = top + tl.log2(total)
                tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=out_ok)
                tl.store(lse_ptr, lse, mask=row_ok)

    @triton.jit
    def _delta_kernel(
        Out, G, Delta, n_rows, heads, length,
        s_ob, s_oh, s_ol, s_gb, s_gh, s_gl,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """``Delta[s, l] = sum_d O * dO`` in float32, ``(slices, length)``."""
        rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        row_ok = rows < n_rows
        s = (rows // length).to(tl.int64)
        pos = (rows % length).to(tl.int64)
        b = s // heads
        h = s % heads
        dims = tl.arange(0, BLOCK_DV)
        ok = row_ok[:, None] & (dims < DV)[None, :]
        o = tl.load(Out + (b * s_ob + h * s_oh + pos * s_ol)[:, None] + dims[None, :], mask=ok, other=0.0)
        g = tl.load(G + (b * s_gb + h * s_gh + pos * s_gl)[:, None] + dims[None, :], mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
        tl.store(Delta + rows, delta, mask=row_ok)

    @triton.jit
    def _dq_kernel(
        Q, K, V, G, Idx, Nbr, Real, Valid, Bkt, Lse, Delta, DQ,
        rnd, n_tiles, heads, length, chunks, n_rounds, mask_value, self_value, before, after, window_keys,
        s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_gb, s_gh, s_gl, s_db, s_dh, s_dl,
        C: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, W: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, OWN_BUCKET: tl.constexpr,
    ):  # fmt: skip
        """Round ``rnd`` of ``dQ``: every query chunk over its neighbour key chunks; adds into ``DQ``."""
        offs = tl.arange(0, BLOCK_C)
        row_ok = offs < C
        d_offs = tl.arange(0, BLOCK_D)
        dv_offs = tl.arange(0, BLOCK_DV)
        d_ok = d_offs < D
        dv_ok = dv_offs < DV
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            s = tile // chunks
            cpos = tile % chunks
            b = (s // heads).to(tl.int64)
            h = (s % heads).to(tl.int64)
            if cpos < tl.load(Real + b):
                chunk = rnd * chunks + cpos
                qpos = _chunk_rows(Idx, s, chunk, length, n_rounds, C, offs, row_ok)
                q_ok = row_ok[:, None] & d_ok[None, :]
                q = tl.load(
                    Q + b * s_qb + h * s_qh + qpos[:, None] * s_ql + d_offs[None, :], mask=q_ok, other=0.0
                )
                g = tl.load(
                    G + b * s_gb + h * s_gh + qpos[:, None] * s_gl + dv_offs[None, :],
                    mask=row_ok[:, None] & dv_ok[None, :],
                    other=0.0,
                )
                lse = tl.load(Lse + s.to(tl.int64) * length + qpos, mask=row_ok, other=0.0)
                delta = tl.load(Delta + s.to(tl.int64) * length + qpos, mask=row_ok, other=0.0)
                dq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
                nbr_base = Nbr + (b * n_rounds * chunks + chunk) * W
                for t in tl.static_range(W):
                    kchunk = tl.load(nbr_base + t)
                    kpos = _chunk_rows(Idx, s, kchunk, length, n_rounds, C, offs, row_ok)
                    k = tl.load(
                        K + b * s_kb + h * s_kh + kpos[:, None] * s_kl + d_offs[None, :], mask=q_ok, other=0.0
                    )
                    v = tl.load(
                        V + b * s_vb + h * s_vh + kpos[:, None] * s_vl + dv_offs[None, :],
                        mask=row_ok[:, None] & dv_ok[None, :],
                        other=0.0,
                    )
                    scores = _masked_scores(
                        q, k, qpos, kpos, row_ok, Valid, b, length, mask_value, self_value,
                        Bkt, s, chunk, kchunk, before - t, rnd, chunks, n_rounds, window_keys, offs,
                        CAUSAL, HAS_VALID, PRECISION, C, OWN_BUCKET,
                    )  # fmt: skip
                    p = tl.exp2(scores - lse[:, None])
                    dp = _dot(g, tl.trans(v), PRECISION)
                    ds = p * (dp - delta[:, None])
                    dq += _dot(ds.to(k.dtype), k, PRECISION)
                dq_ptr = DQ + b * s_db + h * s_dh + qpos[:, None] * s_dl + d_offs[None, :]
                old = tl.load(dq_ptr, mask=q_ok, other=0.0).to(tl.float32)
                tl.store(dq_ptr, (old + dq).to(DQ.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _dkdv_kernel(
        Q, K, V, G, Idx, Inv, Real, Valid, Bkt, Lse, Delta, DK, DV_,
        rnd, n_tiles, heads, length, chunks, n_rounds, mask_value, self_value, before, after, window_keys,
        s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_gb, s_gh, s_gl,
        s_dkb, s_dkh, s_dkl, s_dvb, s_dvh, s_dvl,
        C: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr, W: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr, OWN_BUCKET: tl.constexpr,
    ):  # fmt: skip
        """Round ``rnd`` of ``dK`` and ``dV``: every key chunk over the query chunks that see it
        (``Inv``); adds into ``DK`` and ``DV_``."""
        offs = tl.arange(0, BLOCK_C)
        row_ok = offs < C
        d_offs = tl.arange(0, BLOCK_D)
        dv_offs = tl.arange(0, BLOCK_DV)
        d_ok = d_offs < D
        dv_ok = dv_offs < DV
        k_ok = row_ok[:, None] & d_ok[None, :]
        v_ok = row_ok[:, None] & dv_ok[None, :]
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            s = tile // chunks
            cpos = tile % chunks
            b = (s // heads).to(tl.int64)
            h = (s % heads).to(tl.int64)
            if cpos < tl.load(Real + b):
                chunk = rnd * chunks + cpos
                kpos = _chunk_rows(Idx, s, chunk, length, n_rounds, C, offs, row_ok)
                k = tl.load(
                    K + b * s_kb + h * s_kh + kpos[:, None] * s_kl + d_offs[None, :], mask=k_ok, other=0.0
                )
                v = tl.load(
                    V + b * s_vb + h * s_vh + kpos[:, None] * s_vl + dv_offs[None, :], mask=v_ok, other=0.0
                )
                dk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
                dv = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
                inv_base = Inv + (b * n_rounds * chunks + chunk) * W
                for t in tl.static_range(W):
                    qchunk = tl.load(inv_base + t)
                    qpos = _chunk_rows(Idx, s, qchunk, length, n_rounds, C, offs, row_ok)
                    q = tl.load(
                        Q + b * s_qb + h * s_qh + qpos[:, None] * s_ql + d_offs[None, :], mask=k_ok, other=0.0
                    )
                    g = tl.load(
                        G + b * s_gb + h * s_gh + qpos[:, None] * s_gl + dv_offs[None, :],
                        mask=v_ok,
                        other=0.0,
                    )
                    lse = tl.load(Lse + s.to(tl.int64) * length + qpos, mask=row_ok, other=0.0)
                    delta = tl.load(Delta + s.to(tl.int64) * length + qpos, mask=row_ok, other=0.0)
                    scores = _masked_scores(
                        q, k, qpos, kpos, row_ok, Valid, b, length, mask_value, self_value,
                        Bkt, s, qchunk, chunk, t - after, rnd, chunks, n_rounds, window_keys, offs,
                        CAUSAL, HAS_VALID, PRECISION, C, OWN_BUCKET,
                    )  # fmt: skip
                    p = tl.where(row_ok[:, None], tl.exp2(scores - lse[:, None]), 0.0)
                    dv += _dot(tl.trans(p.to(g.dtype)), g, PRECISION)
                    dp = _dot(g, tl.trans(v), PRECISION)
                    ds = p * (dp - delta[:, None])
                    dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
                dk_ptr = DK + b * s_dkb + h * s_dkh + kpos[:, None] * s_dkl + d_offs[None, :]
                dv_ptr = DV_ + b * s_dvb + h * s_dvh + kpos[:, None] * s_dvl + dv_offs[None, :]
                old_dk = tl.load(dk_ptr, mask=k_ok, other=0.0).to(tl.float32)
                old_dv = tl.load(dv_ptr, mask=v_ok, other=0.0).to(tl.float32)
                tl.store(dk_ptr, (old_dk + dk).to(DK.dtype.element_ty), mask=k_ok)
                tl.store(dv_ptr, (old_dv + dv).to(DV_.dtype.element_ty), mask=v_ok)


# ---- host side ----------------------------------------------------------------------------------


def _block(n: int) -> int:
    """Power-of-two tile size covering ``n`` (at least 16, the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(n))


def _float32_precision() -> str:
    """IEEE float32 products unless torch allows TF32 for float32 matmuls
    (``torch.set_float32_matmul_precision("high")``), as the PyTorch path's matmuls do."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision of the attention kernels (see ``_dot`` for "upcast")."""
    if dtype == torch.float32:
        return _float32_precision()
    return "upcast" if INTERPRETED and dtype == torch.bfloat16 else "tf32"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and length strides of a ``(batch, heads, length, dim)`` tensor with unit dim stride."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid(n_tiles: int, device: torch.device) -> tuple[int]:
    """Persistent grid: a few programs per SM on a GPU; a small grid under the interpreter (so that the
    persistent loop is exercised there too)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return (max(1, min(n_tiles, sms * PROGRAMS_PER_SM)),)
    return (max(1, min(n_tiles, 3)),)


def check_device(x: torch.Tensor) -> None:
    """Refuse tensors the kernels cannot run on (CPU ones unless interpreted)."""
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (got {x.device.type}); on CPU use backend='torch', or "
            "set TRITON_INTERPRET=1 before importing reformer.attention.triton_lsh to run the kernels "
            "interpreted"
        )


@torch.no_grad()
def hash_sort_indices(
    qk: torch.Tensor,
    rotations: torch.Tensor,
    n_buckets: int | tuple[int, ...],
    key_valid: torch.Tensor | None = None,
    return_buckets: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused hashing: sort indices by (bucket, position) per round, padding last.

    The same result as ``sort_by_bucket(hash_vectors(qk, rotations, n_buckets), key_valid)`` (up to
    float rounding at near-ties of the rotation argmax for non-float32 inputs).

    Args:
        qk: ``(batch, heads, length, head_dim)`` (hashed in float32).
        rotations: ``(heads, head_dim, n_hashes, sum(factors) // 2)``.
        n_buckets: an even integer or up to four even factors.
        key_valid: ``(batch, length)`` bool, True for real tokens, or None.

    Returns:
        ``(batch, heads, n_hashes, length)`` int64 positions (and, with ``return_buckets``, the bucket of
        every sorted entry, padding ``prod(factors)``).
    """
    require_triton()
    check_device(qk)
    factors = bucket_factors(n_buckets)
    if rotations.shape[-1] * 2 != sum(factors) or len(factors) > MAX_FACTORS:
        raise ValueError(
            f"rotations with {rotations.shape[-1]} columns and n_buckets={n_buckets} do not fit the fused "
            f"hash (needs sum(factors) // 2 columns and at most {MAX_FACTORS} factors)"
        )
    batch, heads, length, head_dim = qk.shape
    n_rounds = rotations.shape[2]
    qk = _unit_last(qk)
    rot = rotations.to(device=qk.device, dtype=torch.float32).contiguous()
    keys = torch.empty(batch, heads, n_rounds, length, dtype=torch.int64, device=qk.device)
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else keys
    block_l = 64
    n_lblocks = triton.cdiv(length, block_l)
    f = (*factors, 0, 0, 0)[:MAX_FACTORS]
    _hash_kernel[(batch * heads * n_rounds * n_lblocks,)](
        qk, rot, valid, keys,
        heads, length, n_rounds, n_lblocks, total_buckets(factors),
        *_strides(qk), rot.stride(0), rot.stride(1), rot.stride(2),
        D=head_dim, BLOCK_D=_block(head_dim), BLOCK_L=block_l, BLOCK_R=_block(sum(factors) // 2),
        F0=f[0], F1=f[1], F2=f[2], F3=f[3],
        HAS_VALID=key_valid is not None,
        PRECISION=_float32_precision() if qk.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    sorted_keys, indices = torch.sort(keys, dim=-1)
    return (indices, sorted_keys // length) if return_buckets else indices


class _Plan:
    """Launch settings shared by the forward and backward kernels of one call."""

    def __init__(
        self, sort_indices, neighbours, inverse, real_chunks, key_valid, causal, chunk, window, sorted_buckets
    ):
        batch, heads, n_rounds, length = sort_indices.shape
        self.sort_indices, self.neighbours, self.inverse = sort_indices, neighbours, inverse
        self.before, self.after = window
        self.sorted_buckets = sorted_buckets
        self.real_chunks, self.key_valid, self.causal, self.chunk = real_chunks, key_valid, causal, chunk
        self.heads, self.length, self.n_rounds = heads, length, n_rounds
        self.chunks = length // chunk
        self.n_tiles = batch * heads * self.chunks
        self.window = neighbours.shape[-1]

    def common(self, rnd: int) -> tuple:
        return (
            rnd, self.n_tiles, self.heads, self.length, self.chunks, self.n_rounds,
            MASK_VALUE * LOG2E, SELF_MASK_VALUE * LOG2E, self.before, self.after, self.before * self.chunk,
        )  # fmt: skip

    def meta(self, q: torch.Tensor, v: torch.Tensor) -> dict:
        return dict(
            C=self.chunk, BLOCK_C=_block(self.chunk), D=q.shape[-1], BLOCK_D=_block(q.shape[-1]),
            DV=v.shape[-1], BLOCK_DV=_block(v.shape[-1]), W=self.window,
            CAUSAL=self.causal, HAS_VALID=self.key_valid is not None, PRECISION=_precision(q.dtype),
            OWN_BUCKET=self.sorted_buckets is not None,
        )  # fmt: skip

    @property
    def valid(self) -> torch.Tensor:
        return self.key_valid if self.key_valid is not None else self.real_chunks

    @property
    def bucket_ids(self) -> torch.Tensor:
        return self.sorted_buckets if self.sorted_buckets is not None else self.sort_indices


class _TritonLSHAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        batch, heads, length, _ = q.shape
        # The output is laid out (batch, length, heads, dim), so merging the heads afterwards is a view.
        out = torch.zeros(batch, length, heads, v.shape[-1], dtype=v.dtype, device=v.device).transpose(1, 2)
        lse = torch.full((batch, heads, length), float("-inf"), dtype=torch.float32, device=q.device)
        grid, meta = _grid(plan.n_tiles, q.device), plan.meta(q, v)
        for rnd in range(plan.n_rounds):
            _fwd_kernel[grid](
                q, k, v, plan.sort_indices, plan.neighbours, plan.real_chunks, plan.valid, plan.bucket_ids,
                out, lse,
                *plan.common(rnd),
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                FIRST=rnd == 0, **meta,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        grad_out = _unit_last(grad_out)
        batch, heads, length, _ = q.shape
        delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
        n_rows, block_l = batch * heads * length, 64
        _delta_kernel[(triton.cdiv(n_rows, block_l),)](
            out, grad_out, delta, n_rows, heads, length, *_strides(out), *_strides(grad_out),
            DV=v.shape[-1], BLOCK_DV=_block(v.shape[-1]), BLOCK_L=block_l,
        )  # fmt: skip
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grid, meta = _grid(plan.n_tiles, q.device), plan.meta(q, v)
        for rnd in range(plan.n_rounds):
            _dq_kernel[grid](
                q, k, v, grad_out, plan.sort_indices, plan.neighbours, plan.real_chunks, plan.valid,
                plan.bucket_ids, lse, delta, dq, *plan.common(rnd),
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), **meta,
            )  # fmt: skip
            _dkdv_kernel[grid](
                q, k, v, grad_out, plan.sort_indices, plan.inverse, plan.real_chunks, plan.valid,
                plan.bucket_ids, lse, delta, dk, dv, *plan.common(rnd),
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                **meta,
            )  # fmt: skip
        return dq, dk, dv, None


def triton_lsh_attention(qk: torch.Tensor, v: torch.Tensor, **kwargs):
    """:func:`reformer.lsh_attention` with ``backend="triton"``: same arguments, same results.

    ``qk`` ``(batch, heads, length, head_dim)``, ``v`` ``(batch, heads, length, head_dim_v)`` (float32,
    bfloat16 or float16) -> ``(batch, heads, length, head_dim_v)`` in ``v``'s dtype. The outputs of padding
    positions that fall in chunks made only of padding are zero here (the PyTorch path computes values
    there that nothing should use). Sequences up to ``bucket_size``, attention dropout and float64 run on
    the PyTorch path.
    """
    from .lsh import lsh_attention

    return lsh_attention(qk, v, backend="triton", **kwargs)


def fused_lsh_core(
    qk: torch.Tensor,
    keys: torch.Tensor,
    v: torch.Tensor,
    sort_indices: torch.Tensor,
    real_chunks: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    *,
    bucket_size: int,
    causal: bool,
    window: tuple[int, int],
    sorted_buckets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention over sorted chunks, fused; :func:`reformer.lsh_attention` prepares its inputs.

    Args:
        qk, keys: ``(batch, heads, padded_length, head_dim)`` queries and normalised keys, padded to a
            multiple of ``bucket_size``; v: ``(batch, heads, padded_length, head_dim_v)``.
        sort_indices: ``(batch, heads, n_hashes, padded_length)`` int64.
        real_chunks: ``(batch,)`` chunks per round holding real tokens (None: all of them).
        key_valid: ``(batch, padded_length)`` bool, False for padding, or None.
        window: how many chunks before and after its own each query chunk attends to.
        sorted_buckets: ``(batch, heads, n_hashes, padded_length)`` int64 bucket of every sorted entry:
            when given, the ``own_bucket`` rule (a query sees the last ``before * bucket_size`` earlier
            keys of its own bucket; see :func:`reformer.lsh_attention`).

    Returns:
        ``(batch, heads, padded_length, head_dim_v)`` in ``v``'s dtype.
    """
    batch, _, n_hashes, padded = sort_indices.shape
    chunks = padded // bucket_size
    layout = (real_chunks, batch, n_hashes, chunks)
    neighbours = chunk_neighbours(*layout, *window, qk.device)
    # The query chunks that see each key chunk: the same map with the window reflected.
    inverse = chunk_neighbours(*layout, *reversed(window), qk.device)
    if real_chunks is None:
        real_chunks = torch.full((batch,), chunks, device=qk.device)
    plan = _Plan(
        sort_indices=sort_indices.contiguous(),
        neighbours=neighbours.to(torch.int32).contiguous(),
        inverse=inverse.to(torch.int32).contiguous(),
        real_chunks=real_chunks.clamp(1, chunks).to(torch.int32),
        key_valid=None if key_valid is None else key_valid.to(torch.int8).contiguous(),
        causal=causal,
        chunk=bucket_size,
        window=window,
        sorted_buckets=None if sorted_buckets is None else sorted_buckets.contiguous(),
    )
    return _TritonLSHAttention.apply(_unit_last(qk), _unit_last(keys), _unit_last(v), plan)
