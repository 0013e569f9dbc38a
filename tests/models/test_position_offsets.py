"""Position offsets of the encoder-decoder (``source_offset`` / ``target_offset``): learned positions
against a model whose position table is shifted by the offset (so offset 0 computes the same), the fixed
sinusoidal embeddings against the formula at the shifted positions, padding holes, and the errors."""

import math

import pytest
import torch

from reformer import ReformerConfig
from reformer.models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig

MAX_LEN = 40


def _model(position_embedding: str = "axial", cross: str = "full") -> ReformerEncoderDecoder:
    common = dict(d_model=16, n_heads=2, d_ff=32, max_seq_len=MAX_LEN, n_layers=2, local_chunk_size=8,
                  initializer_range=0.3, position_embedding=position_embedding, axial_pos_shape=(MAX_LEN,),
                  axial_pos_dims=(16,))  # fmt: skip
    enc = ReformerConfig(vocab_size=23, attn_layers=("local", "full"), causal=False, **common)
    dec = ReformerConfig(vocab_size=23, attn_layers=("full", "local"), causal=True, **common)
    config = Seq2SeqConfig(enc, dec, cross_attention=cross, cross_chunk_size=4, share_embeddings=True)
    return ReformerEncoderDecoder(config).double().eval()


def _shifted_table(model: ReformerEncoderDecoder, source_offset: int, target_offset: int):
    """A copy of ``model`` whose learned position p holds the original's position p + offset."""
    shifted = _model()
    shifted.load_state_dict(model.state_dict())
    for stack, offset in ((shifted.encoder, source_offset), (shifted.embeddings, target_offset)):
        positions = stack.embeddings.positions if stack is shifted.encoder else stack.positions
        table = positions.weights[0]  # (MAX_LEN, d_model): one axis, plain learned positions
        with torch.no_grad():
            table[: MAX_LEN - offset] = table[offset:].clone()
    return shifted.eval()


@pytest.mark.parametrize("cross", ["full", "lsh"])
def test_learned_positions_at_an_offset_equal_a_shifted_table(cross):
    torch.manual_seed(0)
    model = _model(cross=cross)
    src, tgt = torch.randint(1, 23, (2, 13)), torch.randint(1, 23, (2, 9))
    for so, to in ((5, 5), (27, 0), (0, 31), (3, 17)):
        expected = _shifted_table(model, so, to)(src, tgt)
        got = model(src, tgt, source_offset=so, target_offset=to)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, model(src, tgt), atol=1e-6)  # the offsets reach the logits
        loss = model.loss(src, tgt, source_offset=so, target_offset=to)
        torch.testing.assert_close(loss, _shifted_table(model, so, to).loss(src, tgt), rtol=1e-12, atol=1e-12)


def test_padding_holes_keep_the_offset_positions_of_the_real_tokens():
    """The encoder moves a row's real tokens to the front: they take offset, offset + 1, ... whatever the
    padding, so a row with holes gives the real tokens' outputs of the row without them."""
    torch.manual_seed(1)
    model = _model()
    src, tgt = torch.randint(1, 23, (1, 10)), torch.randint(1, 23, (1, 6))
    holes = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0]])
    dense = src[holes.bool()][None]
    torch.testing.assert_close(
        model(src, tgt, holes, source_offset=7, target_offset=4),
        model(dense, tgt, source_offset=7, target_offset=4),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip


def _sinusoid(positions: list[int], d: int, amplitude: float) -> torch.Tensor:
    half = d // 2
    rows = []
    for p in positions:
        w = [10000.0 ** (-k / half) for k in range(half)]
        rows.append([amplitude * math.sin(p * x) for x in w] + [amplitude * math.cos(p * x) for x in w])
    return torch.tensor(rows, dtype=torch.float64)


def test_sinusoidal_positions_at_an_offset_follow_the_formula():
    torch.manual_seed(2)
    model = _model("sinusoidal")
    seen = {}
    model.encoder.embeddings.register_forward_hook(lambda m, i, o: seen.__setitem__("source", o))
    model.embeddings.register_forward_hook(lambda m, i, o: seen.__setitem__("target", o))
    src, tgt = torch.randint(1, 23, (2, 11)), torch.randint(1, 23, (2, 8))
    model(src, tgt, source_offset=29, target_offset=13)
    amplitude = math.sqrt(2) * 0.3
    tokens = model.embeddings.tokens.weight
    torch.testing.assert_close(seen["source"], tokens[src] + _sinusoid(range(29, 40), 16, amplitude))
    torch.testing.assert_close(seen["target"], tokens[tgt] + _sinusoid(range(13, 21), 16, amplitude))


def test_bad_offsets_are_named():
    model = _model("sinusoidal")
    src, tgt = torch.randint(1, 23, (1, 10)), torch.randint(1, 23, (1, 8))
    model(src, tgt, source_offset=MAX_LEN - 10, target_offset=MAX_LEN - 8)  # the last positions fit
    with pytest.raises(ValueError, match="offset 31 \\+ length 10 exceeds max_seq_len=40"):
        model(src, tgt, source_offset=31)
    with pytest.raises(ValueError, match="offset 33 \\+ length 8 exceeds max_seq_len=40"):
        model(src, tgt, target_offset=33)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"position offset {bad!r} must be a non-negative integer"):
            model.loss(src, tgt, source_offset=bad)


def test_generation_at_offsets_equals_the_teacher_forced_forward():
    """Cached decoding (exact self- and cross-attention) embeds each new token at target_offset + t: its
    greedy tokens are the argmax of the teacher-forced logits at the same offsets, and recomputation
    gives the same tokens."""
    torch.manual_seed(3)
    common = dict(d_model=16, n_heads=2, d_ff=32, max_seq_len=MAX_LEN, n_layers=2, initializer_range=0.3,
                  position_embedding="sinusoidal")  # fmt: skip
    enc = ReformerConfig(vocab_size=23, attn_layers=("full", "full"), causal=False, **common)
    dec = ReformerConfig(vocab_size=23, attn_layers=("full", "full"), causal=True, **common)
    model = ReformerEncoderDecoder(Seq2SeqConfig(enc, dec, share_embeddings=True)).double().eval()
    src = torch.randint(1, 23, (2, 12))
    offsets = dict(source_offset=14, target_offset=30)
    cached = model.generate(src, max_new_tokens=10, temperature=0, **offsets)
    assert torch.equal(
        cached, model.generate(src, max_new_tokens=10, temperature=0, use_cache=False, **offsets)
    )
    assert not torch.equal(cached, model.generate(src, max_new_tokens=10, temperature=0))
    inputs = torch.cat([torch.zeros(2, 1, dtype=torch.long), cached[:, :-1]], 1)
    assert torch.equal(model(src, inputs, **offsets).argmax(-1), cached)
    with pytest.raises(ValueError, match="max_new_tokens=11 exceeds the decoder's max_seq_len=40 less"):
        model.generate(src, max_new_tokens=11, **offsets)
    with pytest.raises(ValueError, match="position offset -2 must be"):
        model.generate(src, max_new_tokens=1, target_offset=-2)
