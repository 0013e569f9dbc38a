import math

import pytest
import torch

import reformer
from reformer.attention.lsh import normalize_keys
from reformer.hashing import draw_rotations
from tests.reference import exact_shared_qk_attention, naive_chunked_attention


def _pad(x, length):
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def _inputs(batch=2, heads=2, length=48, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    return qk, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 2, 3])
@pytest.mark.parametrize(("length", "pad_from"), [(48, None), (45, None), (48, [30, 48]), (41, [13, 41])])
def test_core_equals_naive_dense_reference(causal, n_hashes, length, pad_from):
    bucket = 8
    qk, v = _inputs(length=length)
    mask = None
    if pad_from is not None:
        mask = torch.arange(length)[None, :] < torch.tensor(pad_from)[:, None]
    out, order = reformer.lsh_attention(
        qk, v, bucket_size=bucket, n_hashes=n_hashes, n_buckets=4, causal=causal, key_rule="chunks",
        attention_mask=mask,
        hash_seed=3, return_sort_indices=True,
    )  # fmt: skip
    padded = order.shape[-1]
    assert padded == math.ceil(length / bucket) * bucket
    key_valid = torch.ones(2, padded, dtype=torch.bool)
    key_valid[:, length:] = False
    if mask is not None:
        key_valid[:, :length] &= mask
    ref = naive_chunked_attention(
        _pad(qk, padded), _pad(normalize_keys(qk), padded), _pad(v, padded), order, bucket, causal,
        None if key_valid.all() else key_valid,
    )[:, :, :length]  # fmt: skip
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask
    assert torch.allclose(
        out[real[:, None].expand(-1, 2, -1)], ref[real[:, None].expand(-1, 2, -1)], atol=1e-10
    )


def test_core_with_wider_window_equals_naive():
    qk, v = _inputs(length=64)
    out, order = reformer.lsh_attention(
        qk, v, bucket_size=8, n_hashes=2, n_buckets=8, n_chunks_before=2, n_chunks_after=1,
        hash_seed=5, return_sort_indices=True,
    )  # fmt: skip
    ref = naive_chunked_attention(qk, normalize_keys(qk), v, order, 8, False, None, before=2, after=1)
    assert torch.allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_is_exact_shared_qk_attention(causal):
    qk, v = _inputs(length=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    out = reformer.lsh_attention(
        qk, v, bucket_size=32, n_hashes=4, causal=causal, key_rule="chunks", attention_mask=mask
    )
    ref = exact_shared_qk_attention(qk, v, causal, mask)
    assert torch.allclose(out[0], ref[0], atol=1e-10)
    assert torch.allclose(out[1, :, :20], ref[1, :, :20], atol=1e-10)


def test_two_chunks_one_round_causal_covers_everything():
    """With one round and two chunks each looking one back (wrapping), every query sees every key
    once; with causal masking that is exact causal attention whatever the hash."""
    qk, v = _inputs(length=64)
    out = reformer.lsh_attention(
        qk, v, bucket_size=32, n_hashes=1, n_buckets=2, causal=True, key_rule="chunks", hash_seed=0
    )
    assert torch.allclose(out, exact_shared_qk_attention(qk, v, causal=True), atol=1e-10)


def test_first_token_attends_to_itself_only_when_nothing_else_is_allowed():
    qk, v = _inputs(length=40)
    out = reformer.lsh_attention(
        qk, v, bucket_size=8, n_hashes=2, n_buckets=4, causal=True, key_rule="chunks", hash_seed=0
    )
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    qk, v = _inputs(batch=1, heads=2, length=21, dim=4, seed=1)
    mask = torch.ones(1, 21, dtype=torch.bool)
    mask[0, 17:] = False
    _, order = reformer.lsh_attention(
        qk, v, bucket_size=4, n_hashes=2, n_buckets=4, causal=causal, key_rule="chunks",
        attention_mask=mask, hash_seed=2,
        return_sort_indices=True,
    )  # fmt: skip
    qk.requires_grad_(True)
    v.requires_grad_(True)

    def fn(qk, v):
        return reformer.lsh_attention(
            qk, v, bucket_size=4, n_hashes=2, causal=causal, key_rule="chunks",
            attention_mask=mask, sort_indices=order,
            dropout_p=0.2, dropout_seed=7,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (qk, v), atol=1e-6)


def test_gradcheck_local_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 19, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    mask = torch.ones(1, 19, dtype=torch.bool)
    mask[0, 15:] = False

    def fn(q, k, v):
        return reformer.local_attention(q, k, v, chunk_size=4, causal=True, attention_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6)


def test_local_attention_equals_dense_windowed_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 24, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = reformer.local_attention(q, k, v, chunk_size=8, causal=True)
    pos = torch.arange(24)
    allowed = (pos[:, None] >= pos[None, :]) & (pos[:, None] // 8 - pos[None, :] // 8 <= 1)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~allowed, float("-inf"))
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-10)


def test_module_equals_functional_core_with_its_projections():
    torch.manual_seed(0)
    attn = reformer.LSHSelfAttention(
        d_model=32, n_heads=4, bucket_size=8, n_hashes=2, n_buckets=4, causal=True, key_rule="chunks"
    )
    attn.eval()
    x = torch.randn(2, 37, 32)
    replay: dict = {}
    y = attn(x, replay=replay)
    qk = attn.to_qk(x).view(2, 37, 4, 8).transpose(1, 2).double()
    v = attn.to_v(x).view(2, 37, 4, 8).transpose(1, 2).double()
    order = replay["sort_indices"]
    padded = order.shape[-1]
    key_valid = (torch.arange(padded) < 37)[None].expand(2, -1)
    ref = naive_chunked_attention(
        _pad(qk, padded), _pad(normalize_keys(qk), padded), _pad(v, padded), order, 8, True, key_valid
    )[:, :, :37]
    ref = attn.to_out(ref.transpose(1, 2).reshape(2, 37, 32).float())
    assert torch.allclose(y, ref, atol=1e-5)


def test_eval_is_deterministic_and_training_draws_fresh_rotations():
    torch.manual_seed(0)
    attn = reformer.LSHSelfAttention(
        d_model=32, n_heads=2, bucket_size=8, n_hashes=1, causal=False, key_rule="chunks"
    )
    x = torch.randn(1, 64, 32)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))
    torch.manual_seed(1)
    first = attn(x)
    torch.manual_seed(1)
    assert torch.equal(first, attn(x))  # training follows torch.manual_seed


def test_n_hashes_can_be_overridden_per_call():
    torch.manual_seed(0)
    attn = reformer.LSHSelfAttention(d_model=32, n_heads=2, bucket_size=8, n_hashes=1).eval()
    x = torch.randn(1, 64, 32)
    replay: dict = {}
    attn(x, n_hashes=4, replay=replay)
    assert replay["sort_indices"].shape == (1, 2, 4, 64)


def test_matches_hf_transformers_lsh_layer():
    """HF's own layer as the oracle (non-causal: in causal mode HF combines rounds of tokens that see only
    themselves in float32 at -1e5, where the weights lose ~0.2%; we subtract the max first)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    config = transformers.ReformerConfig(
        hidden_size=32, num_attention_heads=2, attention_head_size=16, lsh_attn_chunk_length=8,
        num_hashes=3, num_buckets=[2, 4], is_decoder=False, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        hash_seed=11, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )  # fmt: skip
    hf = HFLSH(config).eval()
    ours = reformer.LSHSelfAttention(
        d_model=32,
        n_heads=2,
        d_head=16,
        bucket_size=8,
        n_hashes=3,
        n_buckets=(2, 4),
        causal=False,
        key_rule="chunks",
        hash_seed=11,
    ).eval()
    ours.to_qk.weight.data.copy_(hf.query_key.weight.data)
    ours.to_v.weight.data.copy_(hf.value.weight.data)
    ours.to_out.weight.data.copy_(torch.eye(32))
    x = torch.randn(2, 64, 32)
    state = torch.get_rng_state()
    expected = hf(hidden_states=x).hidden_states
    torch.set_rng_state(state)
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_bad_inputs_are_named():
    qk, v = _inputs()
    with pytest.raises(ValueError, match="batch, heads, length"):
        reformer.lsh_attention(qk[0], v[0])
    with pytest.raises(ValueError, match="differ"):
        reformer.lsh_attention(qk, v[:, :, :10])
    with pytest.raises(TypeError, match="floating point"):
        reformer.lsh_attention(qk.long(), v)
    with pytest.raises(ValueError, match="attention_mask"):
        reformer.lsh_attention(qk, v, attention_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_buckets"):
        reformer.lsh_attention(qk, v, n_buckets=3)
    with pytest.raises(ValueError, match="seed"):
        reformer.lsh_attention(qk, v, bucket_size=8, dropout_p=0.1)


def test_bfloat16_runs_close_to_float32():
    torch.manual_seed(0)
    attn = reformer.LSHSelfAttention(
        d_model=64, n_heads=2, bucket_size=16, n_hashes=2, causal=True, key_rule="chunks"
    ).eval()
    x = torch.randn(1, 100, 64)
    replay: dict = {}  # the same buckets: bf16 rounding may move a few tokens to other buckets
    ref = attn(x, replay=replay)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, replay=replay)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_rotations_helper_shape():
    assert draw_rotations(2, 8, 3, (4, 6), seed=0).shape == (2, 8, 3, 5)
