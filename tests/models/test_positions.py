"""Sinusoidal position embeddings (``position_embedding="sinusoidal"``): the values against the formula
written out here, the mirror relation a linear map expresses, checkpoints, HF export refused, old configs
kept axial, and the encoder-decoder's cached decoding with them."""

import json
import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.embeddings import SinusoidalPositionEmbedding
from reformer.hf import config_to_hf_dict
from reformer.models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig


def _formula(length: int, d: int, amplitude: float) -> torch.Tensor:
    """Vaswani et al.'s table, one value at a time: sines in the first half, cosines in the second."""
    half = d // 2
    table = torch.zeros(length, d, dtype=torch.float64)
    for p in range(length):
        for k in range(half):
            w = 10000.0 ** (-k / half)
            table[p, k] = amplitude * math.sin(p * w)
            table[p, half + k] = amplitude * math.cos(p * w)
    return table


@pytest.mark.parametrize("d", [8, 7])
def test_values_follow_the_formula(d):
    module = SinusoidalPositionEmbedding(d, amplitude=0.3)
    positions = torch.arange(50)
    torch.testing.assert_close(module(positions, torch.float64), _formula(50, d, 0.3), rtol=1e-12, atol=1e-12)
    batched = module(positions.expand(3, 50))
    assert batched.shape == (3, 50, d) and batched.dtype == torch.float32
    torch.testing.assert_close(batched[2], _formula(50, d, 0.3).float())


def test_the_mirror_position_is_one_linear_map():
    """One matrix M gives PE(c - p) = PE(p) M for every p: what lets attention find the mirror position.
    Per frequency w: sin(w(c-p)) = sin(wc)cos(wp) - cos(wc)sin(wp), cos(w(c-p)) = cos(wc)cos(wp) +
    sin(wc)sin(wp)."""
    d, c = 16, 63
    half = d // 2
    table = SinusoidalPositionEmbedding(d)(torch.arange(c + 1), torch.float64)
    m = torch.zeros(d, d, dtype=torch.float64)
    for k in range(half):
        w = 10000.0 ** (-k / half)
        m[k, k], m[half + k, k] = -math.cos(w * c), math.sin(w * c)  # the sine of the mirror
        m[k, half + k], m[half + k, half + k] = math.sin(w * c), math.cos(w * c)  # its cosine
    torch.testing.assert_close(table @ m, table.flip(0), rtol=1e-10, atol=1e-10)


def _lm_config(**changes) -> ReformerConfig:
    settings = dict(vocab_size=19, d_model=16, n_heads=2, n_layers=2, d_ff=32, attn_layers=("local", "full"),
                    local_chunk_size=8, max_seq_len=32, initializer_range=0.2)  # fmt: skip
    return ReformerConfig(**{**settings, **changes})


def test_model_has_no_position_parameters_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(_lm_config(position_embedding="sinusoidal")).eval()
    assert not any("positions" in name for name in model.state_dict())
    amplitude = model.embeddings.positions.amplitude
    assert amplitude == pytest.approx(math.sqrt(2) * 0.2)
    ids = torch.randint(0, 19, (2, 20))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["position_embedding"] == "sinusoidal"
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # The positions reach the logits: shifting them changes the output.
    shifted = model.embeddings(ids, torch.arange(1, 21))
    assert not torch.allclose(shifted, model.embeddings(ids))


def test_configs_without_the_field_stay_axial_and_bad_values_are_named():
    data = _lm_config().to_dict()
    del data["position_embedding"]
    assert ReformerConfig.from_dict(data).position_embedding == "axial"
    with pytest.raises(ValueError, match="position_embedding='alibi'"):
        _lm_config(position_embedding="alibi")


def test_hf_export_refuses_sinusoidal_positions():
    exportable = dict(attn_layers=("local", "lsh"), lsh_key_rule="chunks")
    config_to_hf_dict(_lm_config(**exportable))
    with pytest.raises(ValueError, match="only axial position embeddings"):
        config_to_hf_dict(_lm_config(**exportable, position_embedding="sinusoidal"))


def _seq2seq(position_embedding: str) -> ReformerEncoderDecoder:
    common = dict(d_model=32, n_heads=2, d_ff=48, max_seq_len=64, n_layers=2, local_chunk_size=8,
                  initializer_range=0.2, position_embedding=position_embedding)  # fmt: skip
    enc = ReformerConfig(vocab_size=23, attn_layers=("local", "full"), causal=False, **common)
    dec = ReformerConfig(vocab_size=23, attn_layers=("full", "full"), causal=True, **common)
    return ReformerEncoderDecoder(Seq2SeqConfig(enc, dec, share_embeddings=True))


def test_seq2seq_cached_decoding_uses_absolute_positions(tmp_path):
    """Cached decoding feeds one token at a time; its logits must equal the teacher-forced forward, which
    fails if the single token is embedded at position 0."""
    torch.manual_seed(0)
    model = _seq2seq("sinusoidal").double().eval()
    src = torch.randint(1, 23, (2, 29))
    cached = model.generate(src, max_new_tokens=10, temperature=0)
    assert torch.equal(cached, model.generate(src, max_new_tokens=10, temperature=0, use_cache=False))
    from reformer.generation.seq2seq import _cached_step, _DecoderCache

    memory, memory_mask = model.encode(src)
    cache = _DecoderCache(model, memory, memory_mask)
    inputs = torch.cat([torch.zeros(2, 1, dtype=torch.long), cached], 1)
    full = model(src, inputs)
    for t in range(inputs.shape[1]):
        step = _cached_step(model, cache, inputs[:, t : t + 1], t, memory_mask)
        torch.testing.assert_close(step, full[:, t], rtol=1e-10, atol=1e-10)
    model.save_pretrained(tmp_path)
    loaded = ReformerEncoderDecoder.from_pretrained(tmp_path).double().eval()
    torch.testing.assert_close(loaded(src, inputs), full, rtol=0, atol=0)


def test_train_command_builds_both_stacks_with_the_chosen_positions(tmp_path):
    from reformer.cli import main

    out = tmp_path / "run"
    assert main([
        "train", "--task", "reverse", "--seq-len", "16", "--steps", "1", "--d-model", "32", "--n-heads", "2",
        "--d-ff", "64", "--batch-size", "2", "--position-embedding", "sinusoidal", "--out", str(out),
        "--no-progress", "--no-sample",
    ]) == 0  # fmt: skip
    model = ReformerEncoderDecoder.from_pretrained(out)
    assert model.config.encoder.position_embedding == model.config.decoder.position_embedding == "sinusoidal"
    assert isinstance(model.embeddings.positions, SinusoidalPositionEmbedding)
    assert isinstance(model.encoder.embeddings.positions, SinusoidalPositionEmbedding)
