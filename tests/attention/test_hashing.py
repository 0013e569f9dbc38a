import pytest
import torch

from reformer.hashing import (
    auto_bucket_factors,
    auto_hash_width,
    auto_n_buckets,
    draw_column_rotations,
    draw_rotations,
    hash_vectors,
    hash_vectors_per_row,
    sort_by_bucket,
)


def test_buckets_are_argmax_over_plus_minus_rotations():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, 8)
    rotations = draw_rotations(3, 8, 2, 6, seed=1)
    buckets = hash_vectors(x, rotations, 6)
    rotated = torch.einsum("bhld,hdrk->bhrlk", x, rotations)
    expected = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
    assert torch.equal(buckets, expected)
    assert buckets.shape == (2, 3, 2, 50) and buckets.max() < 6


def test_factorised_buckets_combine_factors():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 40, 8)
    rotations = draw_rotations(2, 8, 3, (4, 6), seed=2)
    buckets = hash_vectors(x, rotations, (4, 6))
    rotated = torch.einsum("bhld,hdrk->bhrlk", x, rotations)
    first = torch.cat([rotated[..., :2], -rotated[..., :2]], -1).argmax(-1)
    second = torch.cat([rotated[..., 2:5], -rotated[..., 2:5]], -1).argmax(-1)
    assert torch.equal(buckets, first + 4 * second)
    assert buckets.max() < 24


def test_seeded_rotations_are_reproducible_and_match_global_seeding():
    a = draw_rotations(4, 16, 2, 8, seed=123)
    b = draw_rotations(4, 16, 2, 8, seed=123)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    torch.manual_seed(123)  # what HF transformers does inside its layers
    hf_style = torch.randn((4, 16, 2, 4))
    torch.set_rng_state(state)
    assert torch.equal(a, hf_style)


def test_sort_is_stable_by_bucket_then_position_with_padding_last():
    buckets = torch.tensor([[[[3, 1, 3, 0, 1, 0]]]])
    valid = torch.tensor([[True, True, False, True, True, True]])
    order = sort_by_bucket(buckets, valid)
    assert order.tolist() == [[[[3, 5, 1, 4, 0, 2]]]]


@pytest.mark.parametrize(("length", "expected"), [(64, 2), (4096, 128), (16384, (16, 32)), (100, 4)])
def test_auto_n_buckets_two_per_chunk(length, expected):
    assert auto_n_buckets(length, 64) == expected


# ---- per-row automatic bucket counts ------------------------------------------------------------------


def _own_factors(length: int, bucket_size: int) -> tuple[int, int]:
    """The automatic count of a row of ``length`` real tokens alone, as (f1, f2) with f2 = 1 if single."""
    count = auto_n_buckets(-(-max(length, 1) // bucket_size) * bucket_size, bucket_size)
    return count if isinstance(count, tuple) else (count, 1)


@pytest.mark.parametrize("bucket_size", [1, 2, 8, 64])
def test_auto_bucket_factors_are_each_rows_own_count(bucket_size):
    lengths = torch.arange(0, 3000 * bucket_size + 1, max(1, bucket_size // 4))
    f1, f2 = auto_bucket_factors(lengths, bucket_size)
    expected = [_own_factors(n, bucket_size) for n in lengths.tolist()]
    assert list(zip(f1.tolist(), f2.tolist(), strict=True)) == expected


@pytest.mark.parametrize("bucket_size", [2, 8])
def test_auto_hash_width_covers_the_widest_count_of_any_shorter_row(bucket_size):
    for chunks in range(1, 400):
        widest = max(sum(_own_factors(n * bucket_size, bucket_size)) // 2 for n in range(1, chunks + 1))
        assert auto_hash_width(chunks * bucket_size, bucket_size) == widest


def test_column_rotations_do_not_depend_on_the_width_drawn():
    wide = draw_column_rotations(2, 8, 3, 40, seed=11)
    assert wide.shape == (2, 8, 3, 40) and wide.dtype == torch.float32
    for width in (1, 7, 39):
        assert torch.equal(draw_column_rotations(2, 8, 3, width, seed=11), wide[..., :width])
    assert not torch.equal(draw_column_rotations(2, 8, 3, 40, seed=12), wide)
    assert not torch.equal(wide[..., 0], wide[..., 1])


def _plus_minus_argmax(values: list[float]) -> int:
    """Index of the largest entry of [x; -x], the first one on ties."""
    candidates = values + [-v for v in values]
    return candidates.index(max(candidates))


def _hash_row_alone(x: torch.Tensor, rotations: torch.Tensor, f1: int, f2: int) -> torch.Tensor:
    """Oracle, plain loops: x ``(heads, length, dim)``, rotations ``(heads, dim, rounds, >= f1/2 + f2/2)``."""
    heads, length, _ = x.shape
    rounds = rotations.shape[2]
    out = torch.empty(heads, rounds, length, dtype=torch.long)
    for h in range(heads):
        for r in range(rounds):
            rotated = (x[h] @ rotations[h, :, r]).tolist()
            for i in range(length):
                b1 = _plus_minus_argmax(rotated[i][: f1 // 2])
                b2 = _plus_minus_argmax(rotated[i][f1 // 2 : f1 // 2 + f2 // 2]) if f2 > 1 else 0
                out[h, r, i] = b1 + f1 * b2
    return out


def _quantise(rotations: torch.Tensor) -> torch.Tensor:
    return (rotations * 4).round().clamp(-8, 8) / 4


def test_per_row_hashing_equals_each_row_hashed_alone_with_its_own_count():
    """Rows of lengths giving single counts (2 ... 128) and factorised ones ((8, 16), (16, 16), (16, 32)),
    hashed in one pass, equal each row hashed alone with its own count and only as many column-seeded
    rotation columns as that count needs. Values are multiples of 1/4 (exact float32 sums in any order),
    so the many ties and the zero vectors test the first-index, x-before-minus-x rule."""
    bucket_size, heads, dim, rounds, seed = 2, 2, 4, 2, 5
    lengths = [1, 3, 50, 128, 130, 180, 300, 400]
    padded = max(lengths)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (len(lengths), heads, padded, dim), generator=g).float()
    x[:, :, ::7] = 0.0  # zero vectors: every column ties
    width = auto_hash_width(padded, bucket_size)
    rotations = _quantise(draw_column_rotations(heads, dim, rounds, width, seed=seed))
    factors = auto_bucket_factors(torch.tensor(lengths), bucket_size)

    buckets = hash_vectors_per_row(x, rotations, factors)

    assert buckets.shape == (len(lengths), heads, rounds, padded)
    seen = set()
    for b, length in enumerate(lengths):
        f1, f2 = _own_factors(length, bucket_size)
        seen.add((f1, f2))
        own = _quantise(draw_column_rotations(heads, dim, rounds, f1 // 2 + f2 // 2, seed=seed))
        assert torch.equal(buckets[b], _hash_row_alone(x[b], own, f1, f2)), (length, f1, f2)
        count = f1 if f2 == 1 else (f1, f2)
        assert torch.equal(buckets[b : b + 1], hash_vectors(x[b : b + 1], own, count))
    assert {(2, 1), (128, 1), (8, 16), (16, 16), (16, 32)} <= seen
    single = factors[1] == 1  # rows with one factor: the one-factor form gives the same buckets
    assert torch.equal(hash_vectors_per_row(x[single], rotations, (factors[0][single],)), buckets[single])
    assert (buckets[:, :, :, ::7] == 0).all()  # zero vectors: first column of x, in both factors
