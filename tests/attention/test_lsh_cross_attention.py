"""LSH cross-attention (``reformer.attention.lsh_cross``) against the brute-force oracle of its rule in
``tests/oracle_lsh_cross.py`` (float64 outputs and gradients), gradcheck, exactness when the window holds
every key, independence from padding on both sides, and plan replay."""

import math

import pytest
import torch

from reformer.attention.cross import cross_attention
from reformer.attention.lsh_cross import LSHCrossAttention, lsh_cross_attention
from tests.oracle_lsh_cross import lsh_cross_oracle


def _inputs(lq, lk, batch=2, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # float32-representable values: the library hashes in float32, so both see the same buckets.
    make = lambda n: torch.randn(batch, heads, n, dim, generator=g).double()  # noqa: E731
    q, k, v = make(lq), make(lk), make(lk)
    k[:, :, 1] = 0.0  # an exact argmax tie
    return q, k, v


def _rotations(heads, dim, rounds, n_buckets, seed=1):
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, dim, rounds, sum(factors) // 2, generator=g)


def _masks(kind, batch, lq, lk):
    if kind is None:
        return None, None
    qm, km = torch.ones(batch, lq, dtype=torch.bool), torch.ones(batch, lk, dtype=torch.bool)
    qm[1, lq - 5 :] = False
    km[1, lk // 2 :] = False
    km[0, 3:6] = False  # holes
    qm[0, 2] = False
    return qm, km


# lq, lk, chunk_size, window, rounds, n_buckets, masks
CASES = {
    "equal-lengths": (32, 32, 8, 16, 2, 4, None),
    "short-decoder": (12, 60, 4, 12, 3, 8, None),
    "long-decoder": (45, 20, 8, 8, 2, 4, None),
    "ragged-chunks-padding": (27, 50, 8, 16, 3, 8, "both"),
    "factorised": (30, 64, 8, 16, 2, (2, 4), "both"),
    "window-narrow": (24, 80, 4, 5, 4, 4, None),
    "window-beyond-keys": (20, 10, 8, 16, 2, 4, "both"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle_with_gradients(case):
    lq, lk, chunk, window, rounds, n_buckets, masks = CASES[case]
    q, k, v = _inputs(lq, lk)
    qm, km = _masks(masks, 2, lq, lk)
    rot = _rotations(2, 8, rounds, n_buckets)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lsh_cross_attention(
        *ours, n_buckets=n_buckets, n_hashes=rounds, chunk_size=chunk, window=window, query_mask=qm,
        key_mask=km, rotations=rot,
    )  # fmt: skip
    expected = lsh_cross_oracle(*ref, rot, n_buckets, chunk, window, qm, km)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    q, k, v = (t.requires_grad_() for t in _inputs(10, 17, heads=1, dim=4))
    rot = _rotations(1, 4, 2, 4)
    qm, km = torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 17, dtype=torch.bool)
    km[1, 9:] = False
    settings = dict(n_buckets=4, n_hashes=2, chunk_size=4, window=6, query_mask=qm, key_mask=km)
    _, plan = lsh_cross_attention(q, k, v, rotations=rot, return_plan=True, **settings)
    # With the plan fixed (as the reversible backward replays it) the function is smooth; hashing
    # afresh, finite differences would move the zero key across a bucket boundary.
    fn = lambda q, k, v: lsh_cross_attention(q, k, v, plan=plan, **settings)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_window_holding_every_key_is_exact_cross_attention():
    q, k, v = _inputs(30, 16)
    km = torch.ones(2, 16, dtype=torch.bool)
    km[0, 10:] = False
    out = lsh_cross_attention(
        q, k, v, n_buckets=8, n_hashes=3, chunk_size=8, window=16, key_mask=km, hash_seed=3
    )
    torch.testing.assert_close(out, cross_attention(q, k, v, key_mask=km), rtol=1e-12, atol=1e-12)


def test_padding_on_both_sides_does_not_change_real_outputs():
    q, k, v = _inputs(21, 40)
    rot = _rotations(2, 8, 3, 8)
    settings = dict(n_buckets=8, n_hashes=3, chunk_size=4, window=8, rotations=rot)
    plain = lsh_cross_attention(q, k, v, **settings)
    g = torch.Generator().manual_seed(5)
    extra_q, extra_k = (
        torch.randn(2, 2, 7, 8, generator=g).double(),
        torch.randn(2, 2, 13, 8, generator=g).double(),
    )
    qm = torch.cat([torch.ones(2, 21), torch.zeros(2, 7)], 1).bool()
    km = torch.cat([torch.ones(2, 40), torch.zeros(2, 13)], 1).bool()
    padded = lsh_cross_attention(
        torch.cat([q, extra_q], 2), torch.cat([k, extra_k], 2), torch.cat([v, extra_k], 2),
        query_mask=qm, key_mask=km, **settings,
    )  # fmt: skip
    torch.testing.assert_close(padded[:, :, :21], plain, rtol=1e-13, atol=1e-13)
    assert torch.equal(padded[:, :, 21:], torch.zeros_like(padded[:, :, 21:]))


def test_module_replays_its_plan_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    module = LSHCrossAttention(16, 24, 2, chunk_size=4, n_hashes=2).double()
    x, memory = torch.randn(2, 10, 16, dtype=torch.float64), torch.randn(2, 33, 24, dtype=torch.float64)
    replay = {}
    first = module(x, memory, replay=replay)
    assert "cross_plan" in replay
    moved = x + 1e-3 * torch.randn_like(x)  # would move some buckets if hashed again
    torch.testing.assert_close(
        module(moved, memory, replay=replay),
        module(moved, memory, replay={"cross_plan": replay["cross_plan"]}),
        rtol=0, atol=0,
    )  # fmt: skip
    module.eval()
    torch.testing.assert_close(module(x, memory), module(x, memory), rtol=0, atol=0)
    assert first.shape == (2, 10, 16)


def test_lsh_finds_the_matching_key():
    """A query equal to one key's direction (scaled up) attends almost only to it, at any source length."""
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 512, 16, generator=g, dtype=torch.float64), dim=-1)
    v = torch.eye(512, dtype=torch.float64)[None, None]
    targets = torch.randint(0, 512, (64,), generator=g)
    q = 40.0 * k[:, :, targets]
    out = lsh_cross_attention(q * math.sqrt(16), k, v, n_buckets=32, n_hashes=4, chunk_size=8, hash_seed=0)
    assert (out[0, 0].argmax(-1) == targets).float().mean() > 0.95
