"""Exact cross-attention (``reformer.attention.cross``) against dense softmax attention written from the
definition, in float64: outputs, gradients (autograd through the dense oracle), gradcheck, padding on
the encoder side, blocking (tiny blocks force many query and key blocks), and bad input."""

import math

import pytest
import torch

from reformer.attention.cross import CrossAttention, cross_attention


def dense_cross(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d)) v over real keys; rows with no real key are zero."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), -math.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


def _inputs(lq, lk, batch=2, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * 1.5  # noqa: E731
    return make(lq), make(lk), make(lk)


@pytest.mark.parametrize("block_scores", [2**22, 7 * 5])
@pytest.mark.parametrize("lq,lk", [(1, 1), (13, 29), (40, 3), (5, 2100)])
def test_matches_dense_with_gradients(lq, lk, block_scores):
    q, k, v = _inputs(lq, lk)
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, lk // 2 + 1 :] = False
    grad = torch.randn(2, 3, lq, 8, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cross_attention(*ours, key_mask=mask, block_scores=block_scores)
    expected = dense_cross(*ref, key_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_blocked_and_padded():
    q, k, v = (t.requires_grad_() for t in _inputs(6, 11, batch=2, heads=2, dim=4))
    mask = torch.tensor([[1] * 11, [1] * 4 + [0] * 7])
    fn = lambda q, k, v: cross_attention(q, k, v, key_mask=mask, block_scores=6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_all_padding_source_row_is_zero_without_gradient():
    q, k, v = (t.requires_grad_() for t in _inputs(4, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    out = cross_attention(q, k, v, key_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))


def test_padding_does_not_change_real_outputs():
    q, k, v = _inputs(7, 9)
    extra = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 5)], 1).long()
    padded = cross_attention(q, torch.cat([k, extra], 2), torch.cat([v, extra], 2), key_mask=mask)
    torch.testing.assert_close(padded, cross_attention(q, k, v), rtol=1e-13, atol=1e-13)


def test_float32_and_bfloat16_close_to_float64():
    q, k, v = _inputs(33, 70)
    expected = dense_cross(q, k, v)
    torch.testing.assert_close(
        cross_attention(q.float(), k.float(), v.float()).double(), expected, atol=1e-5, rtol=1e-5
    )
    low = cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_scores=64)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), expected, atol=5e-2, rtol=5e-2)


def test_module_matches_dense_and_takes_cached_memory():
    torch.manual_seed(0)
    module = CrossAttention(16, 24, 4).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, memory = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    out = module(x, memory, mask)
    q = module.to_q(x).view(2, 5, 4, 4).transpose(1, 2)
    k = module.to_k(memory).view(2, 9, 4, 4).transpose(1, 2)
    v = module.to_v(memory).view(2, 9, 4, 4).transpose(1, 2)
    expected = module.to_out(dense_cross(q, k, v, mask).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    cached = module(x, None, mask, memory_kv=module.project_memory(memory))
    torch.testing.assert_close(cached, out, rtol=0, atol=0)


def test_bad_inputs_are_named():
    q, k, v = _inputs(3, 4)
    with pytest.raises(ValueError, match="empty"):
        cross_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="key_mask has shape"):
        cross_attention(q, k, v, key_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="not float"):
        cross_attention(q, k, v, key_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="share batch"):
        cross_attention(q, k[:1], v[:1])
