"""Fused LSH attention on the GPU: Triton kernels with the contract of :func:`reformer.lsh_attention`.

The PyTorch path (``lsh.py`` + ``chunked.py``) gathers sorted copies of q/k/v block by block and merges
the hash rounds with ``index_copy_``; on a GPU that is dominated by launch and gather overhead. Here the
whole pipeline is a handful of kernels, whose device code is :mod:`reformer.attention.triton_kernels`:
hashing straight into sort keys, one persistent forward launch per round that merges the rounds by their
log-sum-exp, and the FlashAttention backward (``dq`` over each query chunk's neighbours, ``dk``/``dv``
over each key chunk's inverse neighbours, deterministic, without atomics). This module is the host side:
checks, launches and the autograd function.

No ``(chunk x keys)`` score tensor and no sorted copy of q/k/v exists in memory; the only buffers are the
sort keys/indices (int64, ``rounds x length``), the output, and a float32 log-sum-exp per row.

Scores are float32 in base 2 (``log2(e) * q.k``) with the PyTorch path's constants: causal and padding
keys get ``-1e9``, the query's own key ``-1e5``. For float32 inputs every ``tl.dot`` runs in IEEE float32
(TF32 only where ``torch.get_float32_matmul_precision()`` allows it, as for torch's own matmuls), so
results match the PyTorch path to rounding. For bfloat16/float16 the round merge and the
cross-round gradient sums are stored in the input dtype (float32 inside a tile).

With ``key_rule="own_bucket"`` (truly causal LSH) the kernels also read the sorted bucket ids and mask,
as ``chunked.ChunkPlan._mask_outside_own_bucket`` does, keys of another bucket, keys more than
``before * bucket_size`` sorted places before the query, and neighbour slots that wrapped around; such
sequences are hashed and run on the kernels even when they fit in one chunk.

Input checks, padding, rotations and the replay of sort indices are :func:`reformer.lsh_attention`'s,
shared with the PyTorch path: with ``backend="triton"`` it hashes with ``hash_sort_indices`` and hands
the padded, sorted problem to :func:`fused_lsh_core`. Not covered by the kernels, and delegated to the
PyTorch path: sequences up to one chunk (exact
attention), attention dropout (its masks come from ``torch.rand``), and float64.

Triton is optional: this module imports without it; :func:`is_available` says whether the kernels can
run and ``lsh_attention(..., backend="triton")`` raises a clear error otherwise. On CPU tensors the
kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from ..hashing import bucket_factors, total_buckets
from . import triton_kernels as kernels
from .blocked import LOG2E, MASK_VALUE
from .chunked import SELF_MASK_VALUE, chunk_neighbours

triton = kernels.triton
# The interpreter setting, read by ``triton.jit`` when the kernels were defined.
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
    kernels.hash_kernel[(batch * heads * n_rounds * n_lblocks,)](
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
            kernels.fwd_kernel[grid](
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
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        grad_out = _unit_last(grad_out)
        batch, heads, length, _ = q.shape
        delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
        n_rows, block_l = batch * heads * length, 64
        kernels.delta_kernel[(triton.cdiv(n_rows, block_l),)](
            out, grad_out, delta, n_rows, heads, length, *_strides(out), *_strides(grad_out),
            DV=v.shape[-1], BLOCK_DV=_block(v.shape[-1]), BLOCK_L=block_l,
        )  # fmt: skip
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grid, meta = _grid(plan.n_tiles, q.device), plan.meta(q, v)
        for rnd in range(plan.n_rounds):
            kernels.dq_kernel[grid](
                q, k, v, grad_out, plan.sort_indices, plan.neighbours, plan.real_chunks, plan.valid,
                plan.bucket_ids, lse, delta, dq, *plan.common(rnd),
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), **meta,
            )  # fmt: skip
            kernels.dkdv_kernel[grid](
                q, k, v, grad_out, plan.sort_indices, plan.inverse, plan.real_chunks, plan.valid,
                plan.bucket_ids, lse, delta, dk, dv, *plan.common(rnd),
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                **meta,
            )  # fmt: skip
        return dq, dk, dv, None


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
