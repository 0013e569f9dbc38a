"""Hashing and sorting for LSH attention: the shared-QK key normalisation and the sort of every round
by (bucket, position), with the automatic bucket count per row's own length."""

from __future__ import annotations

import math

import torch

from ..hashing import (
    auto_bucket_factors,
    auto_hash_width,
    auto_n_buckets,
    bucket_factors,
    draw_column_rotations,
    draw_rotations,
    hash_vectors,
    hash_vectors_per_row,
    sort_by_bucket,
    total_buckets,
)


def normalize_keys(qk: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Shared-QK keys: unit RMS over the head dimension, then divided by sqrt(head_dim) (trax/HF)."""
    keys = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps)
    return keys / math.sqrt(qk.shape[-1])


def lsh_sort_indices(
    qk: torch.Tensor,
    *,
    n_hashes: int,
    n_buckets: int | tuple[int, ...],
    key_padding_mask: torch.Tensor | None = None,
    rotations: torch.Tensor | None = None,
    seed: int | None = None,
    fused: bool = False,
    return_buckets: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hash ``qk`` and sort every round by (bucket, position).

    Args:
        qk: ``(batch, heads, length, head_dim)``.
        key_padding_mask: ``(batch, length)`` bool, True for real tokens; padding sorts last.
        rotations: ``(heads, head_dim, n_hashes, sum(factors) // 2)``; drawn (from ``seed`` if given)
            when None.
        fused: hash with the Triton kernel (argmax in the matmul's epilogue) where it applies.
        return_buckets: also return the bucket of every sorted entry (padding: ``prod(factors)``).

    Returns:
        ``(batch, heads, n_hashes, length)`` int64 positions (and the sorted buckets, same shape).
    """
    _, heads, _, head_dim = qk.shape
    if rotations is None:
        rotations = draw_rotations(heads, head_dim, n_hashes, n_buckets, seed=seed, device=qk.device)
    if fused:
        from . import triton_lsh

        if len(bucket_factors(n_buckets)) <= triton_lsh.MAX_FACTORS:
            return triton_lsh.hash_sort_indices(
                qk.detach(), rotations, n_buckets, key_padding_mask, return_buckets=return_buckets
            )
    buckets = hash_vectors(qk.detach(), rotations, n_buckets)
    indices = sort_by_bucket(buckets, key_padding_mask)
    if not return_buckets:
        return indices
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(~key_padding_mask[:, None, None, :], total_buckets(n_buckets))
    return indices, buckets.gather(-1, indices)


def sort_indices_by_own_length(
    qk_p, key_valid, user_valid, bucket_size, n_hashes, seed, fused, want_buckets
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sort indices ``(batch, heads, n_hashes, padded)`` (and sorted buckets if ``want_buckets``) with
    every row hashed into the automatic bucket count of its own real length, so padding never changes
    a row's buckets.

    The rotations' column ``j`` comes from its own seed (:func:`draw_column_rotations`), so a row uses
    the same columns whatever the batch draws. Without ``user_valid`` every row has the count of the
    padded length (the Triton hash applies when ``fused``); with it, all rows are hashed in one pass over
    the widest count a row of this length can have (:func:`hash_vectors_per_row`, PyTorch on every
    backend), with no host sync.
    """
    batch, heads, padded, head_dim = qk_p.shape
    if user_valid is None:
        n_buckets = auto_n_buckets(padded, bucket_size)
        width = sum(bucket_factors(n_buckets)) // 2
        rotations = draw_column_rotations(heads, head_dim, n_hashes, width, seed=seed, device=qk_p.device)
        sorted_ = lsh_sort_indices(
            qk_p, n_hashes=n_hashes, n_buckets=n_buckets, key_padding_mask=key_valid, rotations=rotations,
            fused=fused, return_buckets=want_buckets,
        )  # fmt: skip
        return sorted_ if isinstance(sorted_, tuple) else (sorted_, None)
    width = auto_hash_width(padded, bucket_size)
    rotations = draw_column_rotations(heads, head_dim, n_hashes, width, seed=seed, device=qk_p.device)
    f1, f2 = auto_bucket_factors(user_valid.sum(-1), bucket_size)
    factorised = isinstance(auto_n_buckets(padded, bucket_size), tuple)  # else every f2 is 1
    buckets = hash_vectors_per_row(qk_p.detach(), rotations, (f1, f2) if factorised else (f1,))
    sort_indices = sort_by_bucket(buckets, key_valid)
    if not want_buckets:
        return sort_indices, None
    padding_bucket = (f1 * f2).view(batch, 1, 1, 1)
    buckets = torch.where(key_valid[:, None, None, :], buckets, padding_bucket)
    return sort_indices, buckets.gather(-1, sort_indices)
