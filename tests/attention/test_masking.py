"""Masked attention as a function: gradcheck over every output, queries with no allowed key, and
double backward (not supported; it must say so)."""

import pytest
import torch

import reformer
from reformer import ReformerConfig, ReformerLM


def _qkv(length, seed=0, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, length, dim, generator=g, dtype=torch.float64) for _ in range(3)]


def _masks(length):
    """Left padding (row 0), holes and trailing padding (row 1): some padding queries see only padding."""
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, :9] = False
    mask[1, 3:10] = False
    mask[1, -3:] = False
    return mask


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_gradcheck_over_all_outputs_with_padding(causal):
    q, k, v = (t.requires_grad_(True) for t in _qkv(19))
    mask = _masks(19)

    def fn(q, k, v):
        return reformer.local_attention(q, k, v, chunk_size=4, causal=causal, attention_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6)


def test_local_attention_query_with_no_allowed_key_outputs_zeros():
    q, k, v = _qkv(16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, :8] = False  # chunks 0 and 1 hold only padding: their queries see no real key
    out = reformer.local_attention(q, k, v, chunk_size=4, causal=True, attention_mask=mask)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    assert out[:, :, 8:].abs().amin() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_lsh_attention_gradcheck_over_all_outputs_with_left_padding_and_holes(causal):
    qk, v, _ = _qkv(21, seed=1)
    mask = _masks(21)
    _, order = reformer.lsh_attention(
        qk, v, bucket_size=4, n_hashes=2, n_buckets=4, causal=causal, key_rule="chunks",
        attention_mask=mask, hash_seed=2,
        return_sort_indices=True,
    )  # fmt: skip
    qk.requires_grad_(True)
    v.requires_grad_(True)

    def fn(qk, v):
        return reformer.lsh_attention(
            qk,
            v,
            bucket_size=4,
            n_hashes=2,
            causal=causal,
            key_rule="chunks",
            attention_mask=mask,
            sort_indices=order,
        )

    assert torch.autograd.gradcheck(fn, (qk, v), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_gradcheck_over_all_outputs_with_padding(causal):
    q, k, v = (t.requires_grad_(True) for t in _qkv(13, heads=1, dim=2))
    mask = _masks(13)

    def fn(q, k, v):
        return reformer.full_attention(q, k, v, causal=causal, attention_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6)


def _second_backward(loss, params):
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()


def test_double_backward_of_chunked_attention_raises_a_clear_error():
    q, k, v = (t.requires_grad_(True) for t in _qkv(16))
    out = reformer.local_attention(q, k, v, chunk_size=4)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        _second_backward(out.pow(2).sum(), [q, k, v])


@pytest.mark.parametrize("reversible", [True, False])
def test_double_backward_of_the_model_raises_a_clear_error(reversible):
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, bucket_size=4, n_hashes=2,
        max_seq_len=64, attn_layers=("lsh", "local"), local_chunk_size=8, reversible=reversible,
    )  # fmt: skip
    model = ReformerLM(cfg)
    ids = torch.randint(0, 32, (1, 20))
    with pytest.raises(RuntimeError, match="differentiate twice"):
        _second_backward(model.loss(ids, ids.roll(-1, 1)), list(model.parameters()))
