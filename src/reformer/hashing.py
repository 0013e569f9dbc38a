"""Random-rotation locality-sensitive hashing (Reformer paper, section 2.1).

A vector ``x`` falls into bucket ``argmax([xR; -xR])`` for a random Gaussian matrix ``R``; with
factorised bucket counts ``[f1, f2, ...]`` each factor hashes its own slice of ``xR`` and the ids are
combined as ``b1 + f1 * b2 + f1 * f2 * b3 + ...``. Every hash round draws its own rotations.

The automatic count (``n_buckets=None``) is a row's own: :func:`hash_vectors_per_row` hashes every row
into the count of its real length in one vectorised pass (no host sync, no grouping), with rotations
whose column ``j`` comes from its own seed (:func:`draw_column_rotations`), so the columns a row uses do
not depend on how many columns the batch drew.
"""

from __future__ import annotations

import contextlib
import math

import torch

MAX_UNFACTORISED_BUCKETS = 128

# (total heads, first head) while a sequence-parallel rank hashes its slice of the heads. A plain global
# (not a ContextVar): torch.compile traces reading it without a graph break.
_rotation_heads: tuple[int, int] | None = None


@contextlib.contextmanager
def rotation_heads(total_heads: int, first_head: int):
    """Within this context :func:`draw_rotations` draws the rotations of all ``total_heads`` heads and
    returns those of heads ``first_head .. first_head + n_heads``: a sequence-parallel rank holding a slice
    of the heads hashes them exactly as one process holding all of them does."""
    global _rotation_heads
    previous, _rotation_heads = _rotation_heads, (total_heads, first_head)
    try:
        yield
    finally:
        _rotation_heads = previous


def auto_n_buckets(length: int, bucket_size: int) -> int | tuple[int, int]:
    """About two buckets per chunk of ``bucket_size`` (the paper's choice), at least 2.

    Above 128 buckets the count is rounded to a power of two and factorised into two factors so that
    the rotated vectors stay small: 512 -> (16, 32).
    """
    n_buckets = 2 * max(1, -(-length // bucket_size))
    if n_buckets <= MAX_UNFACTORISED_BUCKETS:
        return n_buckets
    exponent = round(math.log2(n_buckets))
    return 2 ** (exponent // 2), 2 ** (exponent - exponent // 2)


def auto_bucket_factors(real_lengths: torch.Tensor, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row :func:`auto_n_buckets` of each row's real length rounded up to ``bucket_size``, as tensors.

    Args:
        real_lengths: ``(batch,)`` integer real lengths (0 counts as 1).

    Returns:
        ``(f1, f2)``, each ``(batch,)`` int64: ``(n, 1)`` for an unfactorised count ``n``.
    """
    n = 2 * ((real_lengths.long().clamp(min=1) + bucket_size - 1) // bucket_size)
    # round(log2(n)) in exact integer arithmetic: the number of k >= 1 with n > 2**(k - 1/2).
    k = torch.arange(1, 32, device=n.device)
    exponent = (n[:, None] * n[:, None] > 2 ** (2 * k - 1)).sum(-1)
    large = n > MAX_UNFACTORISED_BUCKETS
    f1 = torch.where(large, 2 ** (exponent // 2), n)
    f2 = torch.where(large, 2 ** (exponent - exponent // 2), torch.ones_like(n))
    return f1, f2


def auto_hash_width(length: int, bucket_size: int) -> int:
    """Rotation columns that cover the automatic count of every row of at most ``length`` real tokens:
    the widest of them (64 columns for 128 buckets, fewer for small or factorised counts)."""
    unfactorised = min(length, MAX_UNFACTORISED_BUCKETS // 2 * bucket_size)
    return max(sum(bucket_factors(auto_n_buckets(n, bucket_size))) // 2 for n in (length, unfactorised))


def bucket_factors(n_buckets: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(n_buckets) if isinstance(n_buckets, (tuple, list)) else (int(n_buckets),)


def total_buckets(n_buckets: int | tuple[int, ...] | list[int]) -> int:
    return math.prod(bucket_factors(n_buckets))


def rotation_shape(
    n_heads: int, head_dim: int, n_hashes: int, n_buckets: int | tuple[int, ...]
) -> tuple[int, int, int, int]:
    """Shape of the rotations: ``(n_heads, head_dim, n_hashes, sum(factors) // 2)`` (HF's layout)."""
    return n_heads, head_dim, n_hashes, sum(bucket_factors(n_buckets)) // 2


def draw_rotations(
    n_heads: int,
    head_dim: int,
    n_hashes: int,
    n_buckets: int | tuple[int, ...],
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian rotations, float32, shape ``(n_heads, head_dim, n_hashes, sum(factors) // 2)``.

    With ``seed`` they come from a private CPU generator (the same numbers on every device, and the
    same numbers HF transformers draws after ``torch.manual_seed(seed)``); without it from the default
    generator of ``device``, i.e. fresh ones that follow the user's ``torch.manual_seed``. Inside
    :func:`rotation_heads` they are a slice of the rotations of all heads.
    """
    total, first = _drawn_heads(n_heads)
    shape = rotation_shape(total, head_dim, n_hashes, n_buckets)
    if seed is None:
        rotations = torch.randn(shape, device=device, dtype=torch.float32)
    else:
        rotations = seeded_randn(seed, list(shape)).to(device)
    return rotations[first : first + n_heads]


def _drawn_heads(n_heads: int) -> tuple[int, int]:
    """(heads to draw, first head to keep): all heads, or inside :func:`rotation_heads` this rank's slice."""
    total, first = _rotation_heads if _rotation_heads is not None else (n_heads, 0)
    if first + n_heads > total:
        raise ValueError(f"heads {first}..{first + n_heads - 1} lie outside the {total} heads being drawn")
    return total, first


def seeded_randn(seed: int, shape: list[int]) -> torch.Tensor:
    """Standard normal float32 CPU tensor of ``shape`` from a private generator seeded with ``seed``:
    the numbers ``torch.manual_seed(seed); torch.randn(shape)`` gives, without touching the default
    generator."""
    if torch.compiler.is_compiling():
        return _seeded_randn_op(seed, shape)
    return _seeded_randn(seed, shape)


def _seeded_randn(seed: int, shape: list[int]) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# Custom ops rather than plain code under torch.compile: it cannot trace a private torch.Generator (it
# would break the graph there), but it records an opaque op call, so compiled models draw the same
# rotations as eager. Eager calls bypass the op: its first call imports torch._dynamo (over a second).
@torch.library.custom_op("reformer::seeded_randn", mutates_args=())
def _seeded_randn_op(seed: int, shape: list[int]) -> torch.Tensor:
    return _seeded_randn(seed, shape)


@_seeded_randn_op.register_fake
def _seeded_randn_fake(seed: int, shape: list[int]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


def draw_column_rotations(
    n_heads: int,
    head_dim: int,
    n_hashes: int,
    width: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian rotations ``(n_heads, head_dim, n_hashes, width)`` float32 whose column ``j`` is drawn
    from its own seed derived from ``(seed, j)``: the first ``k`` columns are the same for every
    ``width >= k``. (Not the numbers of :func:`draw_rotations`, which stays HF's draw.) Inside
    :func:`rotation_heads` they are a slice of the rotations of all heads."""
    total, first = _drawn_heads(n_heads)
    return column_seeded_randn(seed, [total, head_dim, n_hashes], width)[first : first + n_heads].to(device)


def column_seed(seed: int, column: int) -> int:
    """A 63-bit seed for ``column`` of a draw seeded with ``seed`` (SplitMix64's mixer)."""
    mask = 2**64 - 1
    z = (seed + (column + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def column_seeded_randn(seed: int, shape: list[int], width: int) -> torch.Tensor:
    """Standard normal float32 CPU tensor ``(*shape, width)``; column ``j`` is ``torch.randn(shape)``
    from a private generator seeded with ``column_seed(seed, j)``."""
    if torch.compiler.is_compiling():
        return _column_seeded_randn_op(seed, shape, width)
    return _column_seeded_randn(seed, shape, width)


def _column_seeded_randn(seed: int, shape: list[int], width: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    out = torch.empty([width, *shape], dtype=torch.float32)
    for j in range(width):
        out[j] = torch.randn(shape, generator=generator.manual_seed(column_seed(seed, j)))
    return out.movedim(0, -1).contiguous()


@torch.library.custom_op("reformer::column_seeded_randn", mutates_args=())
def _column_seeded_randn_op(seed: int, shape: list[int], width: int) -> torch.Tensor:
    return _column_seeded_randn(seed, shape, width)


@_column_seeded_randn_op.register_fake
def _column_seeded_randn_fake(seed: int, shape: list[int], width: int) -> torch.Tensor:
    return torch.empty([*shape, width], dtype=torch.float32)


def _argmax_of_plus_minus(rotated: torch.Tensor) -> torch.Tensor:
    """``argmax(cat([x, -x], -1), -1)`` without materialising the concatenation (same tie-breaking)."""
    top, top_idx = rotated.max(dim=-1)
    bottom, bottom_idx = rotated.min(dim=-1)
    return torch.where(top >= -bottom, top_idx, bottom_idx + rotated.shape[-1])


@torch.no_grad()
def hash_vectors(
    vectors: torch.Tensor, rotations: torch.Tensor, n_buckets: int | tuple[int, ...]
) -> torch.Tensor:
    """Bucket ids of ``vectors`` under ``rotations``.

    Args:
        vectors: ``(batch, heads, length, head_dim)``, any float dtype (hashed in float32).
        rotations: ``(heads, head_dim, n_hashes, sum(factors) // 2)`` float.
        n_buckets: an even integer or a tuple of even factors.

    Returns:
        ``(batch, heads, n_hashes, length)`` int64 ids in ``[0, prod(factors))``.
    """
    factors = bucket_factors(n_buckets)
    if rotations.shape[-1] * 2 != sum(factors):
        raise ValueError(
            f"rotations have {rotations.shape[-1]} columns but n_buckets={n_buckets} needs "
            f"{sum(factors) // 2}"
        )
    vectors = vectors.float()
    rotations = rotations.to(device=vectors.device, dtype=torch.float32)
    rounds = []
    for r in range(rotations.shape[2]):  # one round at a time: (B, H, L, n_rot/2) stays small
        rotated = torch.einsum("bhld,hdk->bhlk", vectors, rotations[:, :, r])
        buckets, start, stride = None, 0, 1
        for factor in factors:
            ids = _argmax_of_plus_minus(rotated[..., start : start + factor // 2])
            buckets = ids if buckets is None else buckets + stride * ids
            start += factor // 2
            stride *= factor
        rounds.append(buckets)
    return torch.stack(rounds, dim=2)


def _argmax_of_plus_minus_within(
    rotated: torch.Tensor, start: torch.Tensor, size: torch.Tensor
) -> torch.Tensor:
    """:func:`_argmax_of_plus_minus` of ``rotated[..., start:start + size]`` with per-row ``start`` and
    ``size`` (broadcast against ``rotated[..., 0]``); the columns outside are masked out, so ties go to
    the first index, x before -x. Rows with ``size == 0`` get 0."""
    column = torch.arange(rotated.shape[-1], device=rotated.device)
    outside = (column < start[..., None]) | (column >= (start + size)[..., None])
    top, top_idx = rotated.masked_fill(outside, -math.inf).max(dim=-1)
    bottom, bottom_idx = rotated.masked_fill(outside, math.inf).min(dim=-1)
    ids = torch.where(top >= -bottom, top_idx - start, bottom_idx - start + size)
    return torch.where(size > 0, ids, torch.zeros_like(ids))


@torch.no_grad()
def hash_vectors_per_row(
    vectors: torch.Tensor, rotations: torch.Tensor, factors: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Bucket ids with a bucket count per row, in one pass over all rows.

    Row ``b`` with factors ``(f1, f2)`` gets ``hash_vectors(vectors[b:b+1], rotations[..., :k], (f1, f2))``
    with ``k = f1 // 2 + f2 // 2`` (``n_buckets=f1`` when ``f2 == 1``): factor 1 takes the argmax of
    ``[x; -x]`` over columns ``[0, f1/2)``, factor 2 over ``[f1/2, k)``, and the id is ``b1 + f1 * b2``.

    Args:
        vectors: ``(batch, heads, length, head_dim)``, any float dtype (hashed in float32).
        rotations: ``(heads, head_dim, n_hashes, width)`` float, ``width >= max(k)``.
        factors: ``(f1, f2)``, each ``(batch,)`` int64, even ``f1``, even ``f2`` or 1 (e.g. from
            :func:`auto_bucket_factors`); or ``(f1,)`` when no row is factorised (hashes half as much).

    Returns:
        ``(batch, heads, n_hashes, length)`` int64 ids in ``[0, f1 * f2)`` of each row.
    """
    halves = [f.to(vectors.device).view(-1, 1, 1) // 2 for f in factors]  # (batch, 1, 1) each
    vectors = vectors.float()
    rotations = rotations.to(device=vectors.device, dtype=torch.float32)
    rounds = []
    for r in range(rotations.shape[2]):
        rotated = torch.einsum("bhld,hdk->bhlk", vectors, rotations[:, :, r])
        buckets = _argmax_of_plus_minus_within(rotated, torch.zeros_like(halves[0]), halves[0])
        if len(halves) == 2:
            second = _argmax_of_plus_minus_within(rotated, halves[0], halves[1])
            buckets = buckets + 2 * halves[0] * second
        rounds.append(buckets)
    return torch.stack(rounds, dim=2)


@torch.no_grad()
def sort_by_bucket(buckets: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions sorted by (bucket, position) in every round; padding sorts last.

    Args:
        buckets: ``(batch, heads, n_hashes, length)`` int64 bucket ids.
        key_padding_mask: ``(batch, length)`` bool, True for real tokens, or None.

    Returns:
        ``(batch, heads, n_hashes, length)`` int64 positions: round ``r`` lists ``0..length-1`` in
        bucket order, ties broken by position (the sort is stable).
    """
    if key_padding_mask is not None:
        # The paper's extra bucket for padding: one past the largest id, so padding sorts last.
        pad_bucket = torch.iinfo(torch.int64).max
        buckets = buckets.masked_fill(~key_padding_mask[:, None, None, :], pad_bucket)
    return torch.sort(buckets, dim=-1, stable=True).indices
