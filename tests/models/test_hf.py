import json

import pytest
import torch

import reformer
from reformer import ReformerLM
from reformer.hf import decode_enwik8, encode_enwik8, name_map

transformers = pytest.importorskip("transformers")


def hf_model(layers=("lsh", "lsh"), num_buckets=4, num_hashes=2, **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=list(layers), axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=64, feed_forward_size=64,
        lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=num_buckets, num_hashes=num_hashes,
        is_decoder=True, hash_seed=3, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=None, hidden_act="gelu",
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**kwargs))


CASES = [
    (("lsh", "lsh"), 4, 1),
    (("lsh", "lsh"), 4, 4),
    (("lsh", "local", "lsh"), 4, 2),
    (("local", "lsh"), [2, 4], 3),
]


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
@pytest.mark.parametrize("length", [64, 45, 61])
def test_eval_logits_equal_hf(layers, num_buckets, num_hashes, length):
    hf = hf_model(layers, num_buckets, num_hashes).eval()
    ours = ReformerLM.from_hf(hf).eval()
    ids = torch.randint(1, 40, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES[1:])
def test_training_loss_and_gradient_norm_equal_hf(layers, num_buckets, num_hashes):
    hf = hf_model(layers, num_buckets, num_hashes).train()
    ours = ReformerLM.from_hf(hf).train()
    ids = torch.randint(1, 40, (2, 64), generator=torch.Generator().manual_seed(2))
    hf_loss = hf(input_ids=ids, labels=ids).loss
    hf_loss.backward()
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    loss = ours.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 1e-5

    def grad_norm(model):
        return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))

    assert abs(grad_norm(ours) / grad_norm(hf) - 1) < 1e-4


@pytest.fixture
def hf_float32_rotations(monkeypatch):
    """HF draws its rotations in the model dtype, we draw float32 ones (and hash in float32): in float64
    comparisons HF gets the float32 draw too, so both hash with the same rotations."""
    randn = torch.randn

    def float32_randn(*args, dtype=None, **kwargs):
        if dtype == torch.float64:
            return randn(*args, dtype=torch.float32, **kwargs).double()
        return randn(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "randn", float32_randn)


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
def test_float64_logits_and_every_parameter_gradient_equal_hf_at_init_std_0_2(
    layers, num_buckets, num_hashes, hf_float32_rotations
):
    """At init std 0.2 attention shapes the logits (at 0.02 a 5% error in an attention projection
    hides below float32 noise); float64 removes HF's float32 merge error for tokens that see only
    themselves, so logits and the gradient of every named parameter agree to ~1e-12."""
    hf = hf_model(layers, num_buckets, num_hashes, initializer_range=0.2).double().train()
    ours = ReformerLM.from_hf(hf).double().train()
    ids = torch.randint(1, 40, (2, 64), generator=torch.Generator().manual_seed(2))
    hf_out = hf(input_ids=ids, labels=ids)
    hf_out.loss.backward()
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    logits = ours(ids)
    assert logits.std() > 1.0  # the test is only as strong as the attention's share of the logits
    assert (logits - hf_out.logits).abs().max() < 1e-9
    loss = ours.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - hf_out.loss.item()) < 1e-10
    theirs = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    mapping = name_map(ours.config)
    assert mapping.keys() == ours_params.keys()
    for ours_name, hf_name in mapping.items():
        expected, got = theirs[hf_name].grad, ours_params[ours_name].grad
        if hf_name == "lm_head.bias" and expected is None:  # the bias HF's forward uses is the decoder's
            expected = theirs["lm_head.decoder.bias"].grad
        assert (got - expected).abs().max() <= 1e-9 * expected.abs().max(), ours_name


@pytest.mark.parametrize(("layers", "num_buckets", "num_hashes"), CASES)
@pytest.mark.parametrize("length", [45, 61])
def test_float64_eval_logits_equal_hf_at_init_std_0_2_for_ragged_lengths(
    layers, num_buckets, num_hashes, length, hf_float32_rotations
):
    hf = hf_model(layers, num_buckets, num_hashes, initializer_range=0.2).double().eval()
    ours = ReformerLM.from_hf(hf).eval()
    ids = torch.randint(1, 40, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours.double()(ids)
    assert (got - expected).abs().max() < 1e-9


def test_round_trip_ours_hf_ours_is_lossless():
    torch.manual_seed(0)
    cfg = reformer.ReformerConfig(
        vocab_size=30, d_model=32, n_heads=2, n_layers=2, d_ff=48, attn_layers=("local", "lsh"),
        bucket_size=8, n_buckets=(2, 4), n_hashes=2, hash_seed=5, max_seq_len=64, local_chunk_size=16,
        activation="gelu_new", dropout=0.1, attn_dropout=0.05, ff_chunk_size=None, lsh_key_rule="chunks",
    )  # fmt: skip
    ours = ReformerLM(cfg)
    back = ReformerLM.from_hf(ours.to_hf())
    assert back.config == cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_from_hf_folder(tmp_path, weights):
    hf = hf_model().eval()
    if weights == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = ReformerLM.from_hf(tmp_path).eval()
    ids = torch.randint(1, 40, (1, 64))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_conversion_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReformerLM.from_hf(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(hf_model().config.to_dict()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        ReformerLM.from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        ReformerLM.from_hf(tmp_path)
    with pytest.raises(ValueError, match="axial"):
        ReformerLM.from_hf(hf_model(axial_pos_embds=False))
    with pytest.raises(TypeError, match="from_hf takes"):
        ReformerLM.from_hf(42)
    full = ReformerLM(reformer.ReformerConfig(n_layers=1, attn_layers=("full",), max_seq_len=64))
    with pytest.raises(ValueError, match="full-attention"):
        full.to_hf()


def test_enwik8_ids_are_bytes_plus_two():
    ids = encode_enwik8("Hé")
    assert ids.tolist() == [ord("H") + 2, 0xC3 + 2, 0xA9 + 2]
    assert decode_enwik8(torch.cat([ids, torch.tensor([0, 1])])) == "Hé"  # ids below 2 are specials


def test_head_size_independent_of_hidden_size():
    hf = hf_model(("lsh", "local"), attention_head_size=8).eval()  # 2 heads x 8 != hidden 32
    ours = ReformerLM.from_hf(hf).eval()
    assert ours.config.d_head == 8
    ids = torch.randint(1, 40, (1, 50))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_to_hf_names_the_extra_when_transformers_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    model = ReformerLM(reformer.ReformerConfig(n_layers=1, max_seq_len=64))
    with pytest.raises(ImportError, match=r"reformer\[hf\]"):
        model.to_hf()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("num_buckets", "num_hashes", "pad"), [(4, 1, 0), ([2, 4], 3, 0), (8, 2, 5)])
def test_float64_lsh_layer_outputs_and_gradients_equal_hf(
    causal, num_buckets, num_hashes, pad, hf_float32_rotations
):
    """HF's LSHSelfAttention (is_decoder=True for causal) on the same weights and rotations, float64,
    weights at std 0.2: outputs, and gradients for the input and both projections. ``pad`` padding
    tokens (fewer than a chunk, where HF and we agree) end the second row."""
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    config = transformers.ReformerConfig(
        hidden_size=32, num_attention_heads=2, attention_head_size=16, lsh_attn_chunk_length=8,
        num_hashes=num_hashes, num_buckets=num_buckets, is_decoder=causal, lsh_num_chunks_before=1,
        lsh_num_chunks_after=0, hash_seed=11, lsh_attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )  # fmt: skip
    hf = HFLSH(config).double().train()
    ours = reformer.LSHSelfAttention(
        d_model=32, n_heads=2, d_head=16, bucket_size=8, n_hashes=num_hashes,
        n_buckets=tuple(num_buckets) if isinstance(num_buckets, list) else num_buckets, causal=causal,
        key_rule="chunks", hash_seed=11,
    ).double().train()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hf_linear, our_linear in ((hf.query_key, ours.to_qk), (hf.value, ours.to_v)):
            hf_linear.weight.copy_(
                0.2 * torch.randn(hf_linear.weight.shape, generator=g, dtype=torch.float64)
            )
            our_linear.weight.copy_(hf_linear.weight)
        ours.to_out.weight.copy_(torch.eye(32))
    x = torch.randn(2, 64, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 64 - pad :] = 0
    weights = torch.randn(2, 64, 32, generator=g, dtype=torch.float64) * mask[..., None]
    results = []
    for run in (
        lambda x: hf(hidden_states=x, attention_mask=mask if pad else None).hidden_states,
        lambda x: ours(x, attention_mask=mask if pad else None),
    ):
        inputs = x.clone().requires_grad_(True)
        out = run(inputs) * mask[..., None]
        (out * weights).sum().backward()
        results.append((out.detach(), inputs.grad))
    (expected, expected_dx), (got, got_dx) = results
    assert (got - expected).abs().max() < 1e-10
    assert (got_dx - expected_dx).abs().max() < 1e-10
    for hf_linear, our_linear in ((hf.query_key, ours.to_qk), (hf.value, ours.to_v)):
        assert (our_linear.weight.grad - hf_linear.weight.grad).abs().max() < 1e-10
