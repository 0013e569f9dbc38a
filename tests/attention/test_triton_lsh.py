"""The fused Triton LSH attention equals the PyTorch path: sort indices, outputs and gradients.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before the
kernel module is imported: ``triton.jit`` reads it when the kernels are defined), on small CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from reformer.attention import lsh as lsh_module  # noqa: E402
from reformer.attention import triton_lsh  # noqa: E402
from reformer.attention.lsh import LSHSelfAttention, lsh_attention, lsh_sort_indices  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not triton_lsh.INTERPRETED:
    pytest.skip(
        "reformer.attention.triton_lsh was imported before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )


def _inputs(batch, heads, length, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, length, dim, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    v = torch.randn(batch, heads, length, dim, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    return qk, v


def _padding_mask(batch, length, n_pad, left=False):
    mask = torch.ones(batch, length, dtype=torch.bool)
    if n_pad:
        if left:
            mask[-1, :n_pad] = False
        else:
            mask[-1, length - n_pad :] = False
    return mask.to(DEVICE)


def _compare(qk, v, mask, **kw):
    """Run both paths on the same buckets; check outputs and gradients at real positions."""
    kw.setdefault("key_rule", "chunks")
    ref, sort_indices = lsh_attention(
        qk, v, attention_mask=mask, backend="torch", return_sort_indices=True, **kw
    )
    out = lsh_attention(qk, v, backend="triton", attention_mask=mask, sort_indices=sort_indices, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    real = torch.ones(qk.shape[0], qk.shape[2], dtype=torch.bool, device=DEVICE) if mask is None else mask
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    weight = weight * real[:, None, :, None]  # padding outputs are not part of the contract
    keep = real[:, None, :, None]
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-4, rtol=1e-4)
    grads_ref = torch.autograd.grad((ref * weight).sum(), (qk, v))
    grads = torch.autograd.grad((out * weight).sum(), (qk, v))
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return sort_indices


@pytest.mark.parametrize(
    ("n_buckets", "padding"),
    [(6, False), ((4, 6), True), ((2, 4, 2), False), ((2, 2, 2, 4), True)],
)
def test_fused_hash_gives_the_sort_indices_of_the_torch_path(n_buckets, padding):
    qk, _ = _inputs(2, 2, 50, 16, seed=1)
    mask = _padding_mask(2, 50, 13) if padding else None
    rotations = torch.randn(2, 16, 3, sum(triton_lsh.bucket_factors(n_buckets)) // 2).to(DEVICE)
    want = lsh_sort_indices(
        qk.detach(), n_hashes=3, n_buckets=n_buckets, key_padding_mask=mask, rotations=rotations
    )
    got = triton_lsh.hash_sort_indices(qk.detach(), rotations, n_buckets, mask)
    assert got.dtype == torch.int64 and got.shape == (2, 2, 3, 50)
    assert torch.equal(got, want)
    if padding:  # the 13 padding positions of the last row sort last in every round, by position
        assert torch.equal(got[-1, :, :, -13:], torch.arange(37, 50, device=DEVICE).expand(2, 3, 13))


@pytest.mark.parametrize(
    ("length", "bucket", "n_hashes", "causal", "n_pad"),
    [
        (40, 8, 1, True, 0),
        (40, 8, 2, False, 0),
        (45, 8, 3, True, 0),  # not a multiple of the bucket: padded internally
        (37, 8, 2, True, 11),  # user padding on top: all-padding chunks are skipped
        (48, 16, 4, False, 20),
    ],
)
def test_outputs_and_gradients_equal_the_torch_path(length, bucket, n_hashes, causal, n_pad):
    qk, v = _inputs(2, 2, length, 16, seed=length + n_hashes)
    mask = _padding_mask(2, length, n_pad) if n_pad else None
    _compare(qk, v, mask, bucket_size=bucket, n_hashes=n_hashes, causal=causal, n_buckets=4, hash_seed=5)


def test_windows_after_and_before_and_a_bucket_that_is_not_a_power_of_two():
    qk, v = _inputs(1, 2, 50, 12, seed=3)
    mask = _padding_mask(1, 50, 9, left=True)  # left padding: padding rows are not the last positions
    kw = dict(bucket_size=6, n_hashes=2, n_buckets=6, causal=False, n_chunks_before=2, n_chunks_after=1)
    _compare(qk, v, mask, hash_seed=2, **kw)


def test_window_wider_than_the_real_chunks_counts_repeated_chunks_like_the_torch_path():
    # One real chunk per round and two rounds: the window of 3 chunks holds chunks twice.
    qk, v = _inputs(2, 1, 40, 16, seed=4)
    mask = _padding_mask(2, 40, 34)
    _compare(qk, v, mask, bucket_size=8, n_hashes=2, n_buckets=4, causal=True, n_chunks_before=2, hash_seed=1)


def test_own_hashing_and_sort_indices_replay():
    qk, v = _inputs(1, 2, 44, 16, seed=6)
    kw = dict(bucket_size=8, n_hashes=2, n_buckets=(2, 4), causal=True, key_rule="chunks", hash_seed=11)
    ref, idx_ref = lsh_attention(qk, v, backend="torch", return_sort_indices=True, **kw)
    out, idx = lsh_attention(qk, v, backend="triton", return_sort_indices=True, **kw)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    replayed = lsh_attention(qk, v, backend="triton", sort_indices=idx, **{**kw, "hash_seed": 99})
    torch.testing.assert_close(replayed, out, atol=0, rtol=0)


def test_short_sequences_and_dropout_take_the_torch_path():
    qk, v = _inputs(1, 2, 8, 16, seed=8)
    kw = dict(bucket_size=8, causal=True, key_rule="chunks")
    short = lsh_attention(qk, v, backend="triton", **kw)
    torch.testing.assert_close(short, lsh_attention(qk, v, backend="torch", **kw))
    qk, v = _inputs(1, 2, 24, 16, seed=9)
    kw = dict(bucket_size=8, n_hashes=2, causal=True, key_rule="chunks", hash_seed=1, dropout_p=0.3)
    kw["dropout_seed"] = 4
    dropped = lsh_attention(qk, v, backend="triton", **kw)
    torch.testing.assert_close(dropped, lsh_attention(qk, v, backend="torch", **kw), atol=0, rtol=0)


def test_module_backend_setting():
    torch.manual_seed(0)
    kw = dict(bucket_size=8, n_hashes=2, causal=True)
    fused = LSHSelfAttention(32, 2, backend="triton", **kw).to(DEVICE).eval()
    plain = LSHSelfAttention(32, 2, backend="torch", **kw).to(DEVICE).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 30, 32).to(DEVICE)
    torch.testing.assert_close(fused(x), plain(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        LSHSelfAttention(32, 2, backend="cuda")
    assert lsh_module.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert lsh_module.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_lsh, "triton", None)
    assert not triton_lsh.is_available()
    with pytest.raises(ImportError, match=r"reformer\[gpu\]"):
        LSHSelfAttention(32, 2, backend="triton")
    qk, v = _inputs(1, 1, 16, 8)
    with pytest.raises(ImportError, match="backend='torch'"):
        lsh_attention(qk, v, backend="triton", bucket_size=8)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter-only check")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(triton_lsh, "INTERPRETED", False)
    qk, v = _inputs(1, 1, 32, 8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        lsh_attention(qk, v, backend="triton", bucket_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("n_hashes", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_larger_sweep(n_hashes, causal):
    qk, v = _inputs(2, 2, 200, 32, seed=n_hashes)
    mask = _padding_mask(2, 200, 57)
    _compare(qk, v, mask, bucket_size=16, n_hashes=n_hashes, causal=causal, hash_seed=n_hashes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_accurate_as_the_torch_path(dtype):
    qk, v = _inputs(1, 2, 40, 16, seed=12, dtype=dtype)
    kw = dict(bucket_size=8, n_hashes=3, n_buckets=4, causal=True, key_rule="chunks")
    half, idx = lsh_attention(qk, v, backend="torch", hash_seed=1, return_sort_indices=True, **kw)
    fused = lsh_attention(qk, v, backend="triton", sort_indices=idx, **kw)
    assert fused.dtype == dtype
    qk32, v32 = (t.detach().float().requires_grad_(True) for t in (qk, v))
    exact = lsh_attention(qk32, v32, backend="torch", sort_indices=idx, **kw)
    weight = torch.randn(exact.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads_exact = torch.autograd.grad((exact * weight).sum(), (qk32, v32))
    grads_half = torch.autograd.grad((half * weight.to(dtype)).sum(), (qk, v))
    grads_fused = torch.autograd.grad((fused * weight.to(dtype)).sum(), (qk, v))
    pairs = [(fused, half, exact), *zip(grads_fused, grads_half, grads_exact, strict=True)]
    for got, torch_half, want in pairs:
        err_fused = (got.float() - want).abs().max().item()
        err_torch = (torch_half.float() - want).abs().max().item()
        assert err_fused <= 2 * err_torch + 1e-2 * want.abs().max().item(), (err_fused, err_torch)


@pytest.mark.parametrize(
    ("length", "bucket", "n_hashes", "n_buckets", "before", "n_pad"),
    [
        # these two catch a dropped bucket, distance or wrapped-slot mask and a wrong dK/dV slot gap
        (37, 8, 3, (2, 4), 1, 5),
        (6, 8, 2, 4, 1, 0),
        pytest.param(40, 8, 2, 4, 1, 0, marks=pytest.mark.slow),
        pytest.param(44, 4, 2, 2, 2, 3, marks=pytest.mark.slow),
    ],
)
def test_own_bucket_rule_equals_the_torch_path(length, bucket, n_hashes, n_buckets, before, n_pad):
    """key_rule='own_bucket': the kernels' same-bucket, sorted-distance and unwrapped-slot masks."""
    qk, v = _inputs(2, 2, length, 16, seed=length)
    mask = _padding_mask(2, length, n_pad)
    kw = dict(
        bucket_size=bucket, n_hashes=n_hashes, n_buckets=n_buckets, causal=True, key_rule="own_bucket",
        n_chunks_before=before, attention_mask=mask, hash_seed=3,
    )  # fmt: skip
    ref, idx_ref, buckets_ref = lsh_attention(
        qk, v, backend="torch", return_sort_indices=True, return_sorted_buckets=True, **kw
    )
    out, idx, buckets = lsh_attention(
        qk, v, backend="triton", return_sort_indices=True, return_sorted_buckets=True, **kw
    )
    assert torch.equal(idx, idx_ref) and torch.equal(buckets, buckets_ref)  # the fused hash's buckets
    keep = mask[:, None, :, None]
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-4, rtol=1e-4)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) * keep
    grads_ref = torch.autograd.grad((ref * weight).sum(), (qk, v))
    grads = torch.autograd.grad((out * weight).sum(), (qk, v))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
