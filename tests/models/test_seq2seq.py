"""The encoder-decoder Reformer: the reversible decoder against a non-reversible build with the same
weights (float64, every parameter's gradient and the encoder output's), activation memory flat in
depth, padding, checkpoints, cached == uncached generation, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reformer.config import ReformerConfig
from reformer.models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig
from reformer.reversible import ReversibleSequence


def _config(self_kinds=("full", "lsh"), cross="full", vocab=(23, 23), reversible=True, dropout=0.0, **extra):
    common = dict(d_model=32, n_heads=2, d_ff=48, max_seq_len=64, bucket_size=8, local_chunk_size=8,
                  initializer_range=0.2, dropout=dropout, reversible=reversible)  # fmt: skip
    enc = ReformerConfig(vocab_size=vocab[0], n_layers=2, attn_layers=("lsh", "full"), causal=False, **common)
    dec = ReformerConfig(
        vocab_size=vocab[1], n_layers=len(self_kinds), attn_layers=self_kinds, causal=True, **common
    )
    return Seq2SeqConfig(enc, dec, cross_attention=cross, cross_chunk_size=4, cross_window=8, **extra)


def _batch(seed=0, ls=29, lt=21, vocab=23):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (2, ls), generator=g), torch.randint(1, vocab, (2, lt), generator=g)


def _grads(model, src, tgt, **kw):
    model.zero_grad()
    model.loss(src, tgt, **kw).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "self_kinds,cross,train",
    [
        (("full", "lsh"), "full", False),
        (("local", "lsh", "full"), "lsh", False),
        (("full", "local"), "lsh", True),
    ],
)
def test_reversible_matches_plain_residuals(self_kinds, cross, train):
    torch.manual_seed(0)
    dropout = 0.1 if train else 0.0
    rev = ReformerEncoderDecoder(_config(self_kinds, cross, dropout=dropout)).double()
    plain = ReformerEncoderDecoder(_config(self_kinds, cross, reversible=False, dropout=dropout)).double()
    plain.load_state_dict(rev.state_dict())
    rev.train(train)
    plain.train(train)
    src, tgt = _batch()
    mask = torch.ones_like(src)
    mask[1, 20:] = 0
    tmask = torch.ones_like(tgt)
    tmask[0, 15:] = 0
    kw = dict(source_mask=mask, target_mask=tmask)
    torch.manual_seed(1)
    g_rev = _grads(rev, src, tgt, **kw)
    torch.manual_seed(1)
    g_plain = _grads(plain, src, tgt, **kw)
    assert g_rev.keys() == g_plain.keys()
    assert any(n.startswith("encoder.") for n in g_rev)  # through the memory gradient
    for name in g_rev:
        torch.testing.assert_close(g_rev[name], g_plain[name], rtol=1e-9, atol=1e-11, msg=name)


def test_memory_gradient_accumulates_over_every_decoder_layer():
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(("full", "local", "lsh"), "lsh")).double().eval()
    decoders = [model.decoder.layers, ReversibleSequence(list(model.decoder.blocks), reversible=False)]
    x = torch.randn(2, 12, 32, dtype=torch.float64, requires_grad=True)
    grads = []
    for decoder in decoders:
        memory = torch.randn(2, 17, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        memory.requires_grad_(True)
        a, b = decoder(x, x, memory=memory)
        (a.pow(2).sum() + b.sin().sum()).backward()
        grads.append(memory.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # A planted bug (counting only the last layer's contribution) would differ from the one-layer sum.
    assert grads[0].abs().sum() > 0


def _saved_bytes(model, src, tgt) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(src, tgt)
    return total


def test_activation_memory_is_flat_in_decoder_depth():
    src, tgt = _batch()
    sizes = [_saved_bytes(ReformerEncoderDecoder(_config(("full",) * n, "lsh")), src, tgt) for n in (1, 4)]
    assert sizes[0] == sizes[1]
    plain = _saved_bytes(ReformerEncoderDecoder(_config(("full",) * 4, "lsh", reversible=False)), src, tgt)
    assert plain > sizes[1]  # the check sees activations at all


def test_source_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(("full", "full"), "full")).double().eval()
    src, tgt = _batch()
    padded = torch.cat([src, torch.randint(1, 23, (2, 9))], 1)
    mask = torch.cat([torch.ones_like(src), torch.zeros(2, 9, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, tgt, source_mask=mask), model(src, tgt), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("share", [False, True])
def test_save_and_load_round_trip(tmp_path, share):
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(cross="lsh", share_embeddings=share, eos_id=3)).eval()
    model.save_pretrained(tmp_path)
    loaded = ReformerEncoderDecoder.from_pretrained(tmp_path).eval()
    src, tgt = _batch()
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)
    assert loaded.config.to_dict() == model.config.to_dict()
    if share:
        assert loaded.embeddings.tokens is loaded.encoder.embeddings.tokens


def test_a_model_saved_in_the_top_level_decoder_layout_loads(tmp_path):
    """Weights named ``embeddings.*``, ``decoder.blocks.*`` and ``final_norm.*`` (the decoder's parts at the
    top level, shared token embeddings stored once) load, give the logits recorded when they were saved,
    and round-trip in today's layout."""
    folder = Path(__file__).parent.parent / "fixtures" / "encoder_decoder_top_level_layout"
    assert any(name.startswith("decoder.blocks.") for name in load_file(folder / "model.safetensors"))
    model = ReformerEncoderDecoder.from_pretrained(folder).eval()
    recorded = json.loads((folder / "expected.json").read_text())
    src, tgt = torch.tensor(recorded["source_ids"]), torch.tensor(recorded["decoder_input_ids"])
    expected = torch.tensor(recorded["logits"], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt).double(), expected, rtol=1e-6, atol=1e-7)
        model.save_pretrained(tmp_path)
        again = ReformerEncoderDecoder.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(src, tgt).double(), expected, rtol=1e-6, atol=1e-7)
    assert again.embeddings.tokens is again.encoder.embeddings.tokens
    assert not any(name.startswith("decoder.blocks.") for name in load_file(tmp_path / "model.safetensors"))


def test_cached_generation_equals_recomputation():
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(("full", "full", "full"), "full")).double().eval()
    src, _ = _batch()
    mask = torch.ones_like(src)
    mask[0, 17:] = 0
    cached = model.generate(
        src, mask, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(4)
    )
    plain = model.generate(
        src,
        mask,
        max_new_tokens=12,
        temperature=1.0,
        generator=torch.Generator().manual_seed(4),
        use_cache=False,
    )
    assert torch.equal(cached, plain)
    # And the logits of the uncached decoder agree with the forward pass on the generated targets.
    from reformer.generation.seq2seq import _cached_step, _DecoderCache

    memory, memory_mask = model.encode(src, mask)
    cache = _DecoderCache(model, memory, memory_mask)
    inputs = torch.cat([torch.zeros(2, 1, dtype=torch.long), cached], 1)
    full = model(src, inputs, source_mask=mask)
    for t in range(inputs.shape[1]):
        step = _cached_step(model, cache, inputs[:, t : t + 1], t, memory_mask)
        torch.testing.assert_close(step, full[:, t], rtol=1e-10, atol=1e-10)


def test_generation_with_lsh_layers_runs_and_stops_at_eos():
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(("lsh", "local"), "lsh", eos_id=5))
    src, _ = _batch()
    out = model.generate(src, max_new_tokens=6, temperature=0)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 6


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one vocabulary"):
        _config(vocab=(23, 30), share_embeddings=True)
    with pytest.raises(ValueError, match="causal=False"):
        Seq2SeqConfig(ReformerConfig(causal=True), ReformerConfig(causal=True))
    model = ReformerEncoderDecoder(_config())
    src, tgt = _batch()
    with pytest.raises(ValueError, match="source is empty"):
        model.loss(src[:, :0], tgt)
    with pytest.raises(ValueError, match="exceeds the encoder's max_seq_len=64"):
        model.loss(torch.ones(1, 65, dtype=torch.long), tgt[:1])
    with pytest.raises(ValueError, match=r"source rows \[1\] have no real token"):
        model.loss(src, tgt, source_mask=torch.tensor([[1] * 29, [0] * 29]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.loss(src + 100, tgt)
    with pytest.raises(ValueError, match="decoder token ids"):
        model(src, tgt + 100)
    with pytest.raises(ValueError, match="decoder length 65 exceeds"):
        model(src, torch.ones(2, 65, dtype=torch.long))


@pytest.mark.parametrize("cross", ["full", "lsh"])
def test_bfloat16_autocast_with_backward_outside(cross):
    torch.manual_seed(0)
    rev = ReformerEncoderDecoder(_config(("full", "local"), cross)).eval()
    plain = ReformerEncoderDecoder(_config(("full", "local"), cross, reversible=False)).eval()
    plain.load_state_dict(rev.state_dict())
    src, tgt = _batch()
    grads = []
    for model in (rev, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(src, tgt)
        loss.backward()  # outside the autocast block: the reversible backward re-enters it
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[0]).all()
    # Measured 0.002-0.003; rebuilding the layers in float32 (autocast not re-entered) gives 0.02-0.04.
    assert (grads[0] - grads[1]).norm() < 0.01 * grads[1].norm()


@pytest.mark.parametrize("window", [None, 6])
def test_lsh_cross_decoding_cache_follows_the_rule_for_one_query(window):
    from reformer.attention import LSHCrossAttention, lsh_cross_attention
    from reformer.generation.seq2seq import LSHCrossCache

    torch.manual_seed(0)
    layer = LSHCrossAttention(16, 24, 2, chunk_size=4, window=window, n_hashes=3, n_buckets=4).double().eval()
    memory = torch.randn(2, 23, 24, dtype=torch.float64)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    cache = LSHCrossCache.build(layer, memory, mask, None)
    q = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    k, v = layer.project_memory(memory)
    expected = lsh_cross_attention(
        q,
        k,
        v,
        n_buckets=4,
        n_hashes=3,
        chunk_size=4,
        window=window,
        key_mask=mask,
        rotations=cache.rotations,
    )
    torch.testing.assert_close(cache.attend(q), expected, rtol=1e-12, atol=1e-12)


def test_cached_generation_with_lsh_cross_attention_runs():
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(_config(("full", "full"), "lsh", eos_id=5)).eval()
    src, _ = _batch()
    out = model.generate(src, max_new_tokens=6, temperature=0)
    assert 1 <= out.shape[1] <= 6
