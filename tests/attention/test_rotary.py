"""Rotary positions (``position_embedding="rotary"``): the rotation against complex multiplication written
out here, scores that depend on offsets only (also near position 2**20), the local and exact layers
against a dense brute force with the rotation, a model whose outputs do not move when its input is
shifted, cached decoding equal to recomputation, and the errors that name the scheme to use."""

import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention import FullSelfAttention, LocalSelfAttention
from reformer.attention.rotary import rotate_queries_keys
from reformer.hf import config_to_hf_dict


def _complex_rotation(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Pairs (x[i], x[i + d/2]) as complex numbers x[i] + i x[i + d/2], times exp(i p w_k), one by one."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for t, p in enumerate(positions.tolist()):
        for k in range(half):
            w = base ** (-k / half)
            z = complex(1.0, 0.0) * torch.complex(x[..., t, k], x[..., t, half + k])
            z = z * complex(math.cos(p * w), math.sin(p * w))
            out[..., t, k], out[..., t, half + k] = z.real, z.imag
    return out


def test_rotation_is_complex_multiplication():
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 1000, 123456])
    rq, rk = rotate_queries_keys(q, k, positions)
    # Angles near 1e5 rad: one ulp of a frequency moves them by ~1e-11.
    torch.testing.assert_close(rq, _complex_rotation(q, positions), rtol=0, atol=1e-9)
    torch.testing.assert_close(rk, _complex_rotation(k, positions), rtol=0, atol=1e-9)


@pytest.mark.parametrize("shift", [1, 977, 2**20 - 64])
def test_scores_depend_on_offsets_only(shift):
    """float32 at positions near 2**20: the angles are formed in float64, so the shift moves the scores by
    float32 rounding only."""
    q, k = torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32)
    positions = torch.arange(16)
    rq, rk = rotate_queries_keys(q, k, positions)
    sq, sk = rotate_queries_keys(q, k, positions + shift)
    torch.testing.assert_close(sq @ sk.transpose(-1, -2), rq @ rk.transpose(-1, -2), rtol=1e-4, atol=1e-4)


def _dense_reference(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("kind", ["local", "full"])
def test_layer_equals_dense_attention_over_rotated_queries_and_keys(kind):
    """The window of causal local attention written as a mask: chunk c of 4 sees chunks c - 1 and c."""
    torch.manual_seed(0)
    length, chunk = 12, 4
    if kind == "local":
        layer = LocalSelfAttention(16, 2, chunk_size=chunk, causal=True, rotary_base=10000.0)
    else:
        layer = FullSelfAttention(16, 2, causal=True, rotary_base=10000.0)
    layer = layer.double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, length, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = (layer.split_heads(proj(x)) for proj in (layer.to_q, layer.to_k, layer.to_v))
    positions = torch.arange(length)
    q, k = _complex_rotation(q, positions), _complex_rotation(k, positions)
    i, j = positions[:, None], positions[None, :]
    allowed = j <= i
    if kind == "local":
        allowed = allowed & (j // chunk >= i // chunk - 1)
    expected = layer.output(_dense_reference(q, k, v, allowed))
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


def _rotary_config(**changes) -> ReformerConfig:
    settings = dict(
        vocab_size=23, d_model=32, n_heads=2, n_layers=3, d_ff=64, attn_layers=("local", "lsh", "full"),
        local_chunk_size=8, bucket_size=8, n_hashes=2, max_seq_len=256, position_embedding="rotary",
        initializer_range=0.2,
    )  # fmt: skip
    return ReformerConfig(**{**settings, **changes})


def test_local_model_outputs_do_not_move_when_the_input_is_shifted():
    """Local layers only, causal: a token's output depends on the last two chunks of tokens and their
    offsets, not on where they stand. Dropping the first ``c`` tokens (a multiple of the chunk) leaves
    every output from ``c + 2 * chunk`` on unchanged; learned positions would move them all."""
    torch.manual_seed(1)
    model = ReformerLM(_rotary_config(attn_layers=("local", "local"), n_layers=2)).eval()
    ids = torch.randint(0, 23, (1, 96))
    c, window = 40, 16
    with torch.no_grad():
        whole, tail = model(ids), model(ids[:, c:])
    torch.testing.assert_close(tail[:, window:], whole[:, c + window :], rtol=1e-5, atol=1e-5)
    axial = ReformerLM(_rotary_config(attn_layers=("local", "local"), n_layers=2, position_embedding="axial"))
    with torch.no_grad():
        moved = axial.eval()(ids[:, c:])[:, window:] - axial(ids)[:, c + window :]
    assert moved.abs().max() > 1e-3


def test_model_has_no_position_parameters_and_no_length_table():
    model = ReformerLM(_rotary_config(max_seq_len=2**20))
    assert not any("position" in name for name, _ in model.named_parameters())
    assert model.embeddings.positions is None
    with pytest.raises(ValueError, match="no parameters depend on it"):
        ReformerLM(_rotary_config(max_seq_len=16))(torch.zeros(1, 17, dtype=torch.long))


def test_learned_positions_name_the_schemes_that_run_longer():
    with pytest.raises(ValueError, match="position_embedding='rotary'"):
        model = ReformerLM(_rotary_config(position_embedding="axial", max_seq_len=16))
        model(torch.zeros(1, 17, dtype=torch.long))


def test_cached_decoding_equals_recomputation():
    torch.manual_seed(2)
    model = ReformerLM(_rotary_config()).eval()
    prompt = torch.randint(0, 23, (2, 19))
    cached = model.generate(prompt, max_new_tokens=20, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        logits = model(cached)
    assert torch.equal(logits[:, 18:-1].argmax(-1), cached[:, 19:])


def test_odd_head_dimension_and_hf_export_are_refused():
    with pytest.raises(ValueError, match="even d_head"):
        _rotary_config(d_model=30, n_heads=2)
    with pytest.raises(ValueError, match="only axial"):
        config_to_hf_dict(_rotary_config(attn_layers=("local", "lsh", "local"), lsh_key_rule="chunks"))
