import pytest
import torch

from reformer.hashing import auto_n_buckets, draw_rotations, hash_vectors, sort_by_bucket


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
