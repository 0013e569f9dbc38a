"""The Triton device code of the fused LSH attention; :mod:`reformer.attention.triton_lsh` launches it.

* ``hash_kernel``: the rotation matmul ``x @ R`` with the ``argmax([xR; -xR])`` of every bucket
  factor in its epilogue; it writes the int64 sort key ``bucket * length + position`` (padding gets the
  extra bucket ``prod(factors)``, so it sorts last) and never the rotated tensor. ``torch.sort`` of the
  keys gives the sort indices (the keys are distinct, so any sort is the stable sort of the PyTorch path).
* ``fwd_kernel``: one launch per hash round, persistent over ``(slice, chunk)`` tiles. A tile loads its
  query rows through the sort indices, runs an online softmax over the ``before + 1 + after`` neighbour
  chunks (the table of :func:`~reformer.attention.chunked.chunk_neighbours`: chunks wrap across rounds,
  all-padding chunks are skipped) and merges its normalised output and log-sum-exp with those of the
  earlier rounds at the rows' original positions. Within a round a row belongs to one chunk only, so the
  merge needs no atomics; the rounds run one launch after another.
* ``delta_kernel``, ``dq_kernel``, ``dkdv_kernel``: the FlashAttention backward. The rounds' log-sum-exp
  combination is one softmax over every key a query sees in any round, so ``P = 2**(s - LSE_total)`` and
  ``dS = P * (dP - rowsum(dO * O))``. ``dq_kernel`` walks each query chunk's neighbours; ``dkdv_kernel``
  walks each key chunk's *inverse* neighbours (the same table with ``before`` and ``after`` swapped), so
  both write their rows without atomics and are deterministic.

Scores are float32 in base 2 (``log2(e) * q.k``); the host passes the PyTorch path's mask constants in
that scale. Defined only when triton is importable; ``triton.jit`` reads ``TRITON_INTERPRET`` here, when
the kernels are defined.
"""

from __future__ import annotations

try:  # optional dependency: the `[gpu]` extra
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


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
    def hash_kernel(
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
        ``chunked.ChunkPlan.mask_scores``; key columns past the chunk get -inf.

        ``OWN_BUCKET`` adds the masks of ``chunked.ChunkPlan._mask_outside_own_bucket``: the key chunk
        must be ``gap`` chunks before the query chunk in round ``rnd`` (no wrapped slot), in the query's
        bucket (``Bkt``, the sorted buckets), and at most ``window_keys`` sorted places before the
        query."""
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
    def fwd_kernel(
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
                if not FIRST:  # merge with the earlier rounds (docs/architecture.md step 9), base 2
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
    def delta_kernel(
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
    def dq_kernel(
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
    def dkdv_kernel(
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
