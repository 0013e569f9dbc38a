import json

import pytest
import torch

import reformer
from reformer import ReformerConfig, ReformerLM


def small_config(**overrides):
    base = dict(
        vocab_size=50, d_model=32, n_heads=2, n_layers=3, d_ff=64, bucket_size=8, n_buckets=4,
        n_hashes=2, max_seq_len=256, local_chunk_size=16, attn_layers=("lsh", "local", "lsh"),
    )  # fmt: skip
    base.update(overrides)
    return ReformerConfig(**base)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_gradients_equal_plain_residual_gradients(dropout):
    cfg = small_config(dropout=dropout, attn_dropout=dropout, attn_layers=("lsh", "local", "full"))
    torch.manual_seed(0)
    rev = ReformerLM(cfg)
    plain = ReformerLM(ReformerConfig(**{**cfg.to_dict(), "reversible": False}))
    plain.load_state_dict(rev.state_dict())
    ids = torch.randint(0, 50, (2, 77))
    results = []
    for model in (rev, plain):
        model.train()
        torch.manual_seed(42)  # same rotations and dropout masks in both
        loss = model.loss(ids, ids.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_rev, g_rev), (loss_plain, g_plain) = results
    assert torch.allclose(loss_rev, loss_plain, atol=1e-6)
    assert g_rev.keys() == g_plain.keys() and len(g_rev) == len(list(rev.parameters()))
    for name in g_rev:
        assert torch.allclose(g_rev[name], g_plain[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize(("dropout", "reference"), [(0.0, {"ff_chunk_size": None}), (0.1, {})])
def test_feed_forward_in_chunks_gives_the_loss_and_gradients_of_plain_residuals(dropout, reference):
    """Feed-forward chunks of 16 positions (77 is not a multiple) in the reversible stack, whose backward
    recomputes them chunk by chunk (``vjp_in_chunks``), against plain residuals: unchunked without
    dropout, chunked (the same dropout masks) with it."""
    cfg = small_config(ff_chunk_size=16, dropout=dropout, attn_dropout=dropout)
    torch.manual_seed(0)
    chunked = ReformerLM(cfg)
    plain = ReformerLM(ReformerConfig(**{**cfg.to_dict(), "reversible": False, **reference}))
    plain.load_state_dict(chunked.state_dict())
    ids = torch.randint(0, 50, (2, 77))
    results = []
    for model in (chunked, plain):
        model.train()
        torch.manual_seed(42)
        loss = model.loss(ids, ids.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_chunked, g_chunked), (loss_plain, g_plain) = results
    assert torch.allclose(loss_chunked, loss_plain, atol=1e-6)
    assert g_chunked.keys() == g_plain.keys()
    for name in g_chunked:
        assert torch.allclose(g_chunked[name], g_plain[name], atol=1e-5, rtol=1e-4), name


def test_reversible_backward_rebuilds_inputs_from_outputs():
    torch.manual_seed(0)
    block_model = ReformerLM(small_config(n_layers=1, attn_layers=("lsh",)))
    block = block_model.layers.blocks[0]
    x1, x2 = torch.randn(2, 1, 40, 32).unbind(0)
    replay: dict = {}
    with torch.no_grad():
        y1, y2 = block(x1, x2, replay=replay)
        rebuilt_x2 = y2 - block.feed_forward(y1)
        rebuilt_x1 = y1 - block.attend(rebuilt_x2, replay=replay)
    assert torch.allclose(rebuilt_x2, x2, atol=1e-5) and torch.allclose(rebuilt_x1, x1, atol=1e-5)


def _saved_bytes(model, ids):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(ids, ids.roll(-1, 1))
    return total


def test_activation_memory_does_not_grow_with_depth():
    ids = torch.randint(0, 50, (1, 200))
    torch.manual_seed(0)
    shallow = _saved_bytes(ReformerLM(small_config(n_layers=2, attn_layers=None)), ids)
    deep = _saved_bytes(ReformerLM(small_config(n_layers=12, attn_layers=None)), ids)
    plain = _saved_bytes(ReformerLM(small_config(n_layers=12, attn_layers=None, reversible=False)), ids)
    assert deep <= shallow * 1.05
    assert plain > 3 * deep  # the check can fail: ordinary residuals do keep every layer's activations


@pytest.mark.parametrize("causal", [True, False])
def test_padding_does_not_change_real_token_outputs(causal):
    torch.manual_seed(0)
    model = ReformerLM(small_config(causal=causal, attn_layers=("lsh", "local", "full"))).eval()
    ids = torch.randint(0, 50, (1, 45))  # not a multiple of any chunk size
    alone = model(ids)
    junk = torch.randint(0, 50, (1, 70))
    padded_ids = torch.cat([ids, junk], dim=1)
    mask = torch.zeros(1, 115, dtype=torch.bool)
    mask[:, :45] = True
    padded = model(padded_ids, attention_mask=mask)
    assert torch.allclose(alone, padded[:, :45], atol=1e-5)


def test_batch_of_different_lengths_equals_one_by_one():
    torch.manual_seed(0)
    model = ReformerLM(small_config()).eval()
    a, b = torch.randint(0, 50, (1, 30)), torch.randint(0, 50, (1, 61))
    batch = torch.zeros(2, 61, dtype=torch.long)
    batch[0, :30], batch[1] = a[0], b[0]
    mask = torch.arange(61)[None] < torch.tensor([[30], [61]])
    logits = model(batch, attention_mask=mask)
    assert torch.allclose(logits[0, :30], model(a)[0], atol=1e-5)
    assert torch.allclose(logits[1], model(b)[0], atol=1e-5)


def test_loss_is_mean_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = ReformerLM(small_config()).eval()
    ids = torch.randint(0, 50, (2, 70))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    expected = torch.nn.functional.cross_entropy(
        model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    assert torch.allclose(model.loss(ids, targets, chunk_size=16), expected, atol=1e-5)


def test_chunked_loss_gradients_equal_those_of_the_plain_loss():
    """The chunked loss recomputes each chunk's logits in the backward pass: every parameter's gradient
    equals that of cross-entropy over the whole logits (a float64 model; the LM's loss is float32)."""
    torch.manual_seed(0)
    model = ReformerLM(small_config()).double().eval()
    ids = torch.randint(0, 50, (2, 70))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        if chunked:
            loss = model.loss(ids, targets, chunk_size=16)
        else:
            loss = torch.nn.functional.cross_entropy(
                model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100
            )
        loss.backward()
        grads.append(
            {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
        )
    for name, expected in grads[1].items():
        assert torch.allclose(grads[0][name], expected, rtol=1e-6, atol=1e-8), name


def test_model_learns_a_repetitive_sequence():
    torch.manual_seed(0)
    model = ReformerLM(small_config(n_layers=2, attn_layers=("lsh", "lsh")))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.randint(1, 50, (8,))
    ids = pattern.repeat(1, 12)
    first = None
    for _ in range(60):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(small_config(n_buckets=(2, 4))).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (1, 40))
    assert torch.equal(model(ids), loaded(ids))
    assert loaded.config == model.config


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReformerLM.from_pretrained(tmp_path / "nowhere")
    model = ReformerLM(small_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_heads": 2, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown config keys"):
        ReformerLM.from_pretrained(tmp_path)
    other = ReformerLM(small_config(d_ff=32))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(small_config().to_dict()))
    with pytest.raises(ValueError, match="shape"):
        ReformerLM.from_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ReformerLM.from_pretrained(tmp_path / "other")


def test_bad_model_inputs_are_named():
    model = ReformerLM(small_config(max_seq_len=64))
    with pytest.raises(ValueError, match=r"vocab_size=50"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match=r"\[-1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="targets shape"):
        model.loss(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(attn_layers=("lsh",)), "attn_layers has 1 entries"),
        (dict(attn_layers=("lsh", "sparse", "lsh")), "unknown"),
        (dict(n_buckets=5), "n_buckets"),
        (dict(n_buckets=(4, 3)), "n_buckets"),
        (dict(dropout=1.5), "dropout"),
        (dict(activation="tanh"), "activation"),
        (dict(axial_pos_shape=(4, 4)), "axial_pos_shape"),
        (dict(axial_pos_dims=(16, 8)), "axial_pos_dims"),
        (dict(bucket_size=0), "bucket_size"),
        (dict(n_hashes=0), "n_hashes"),
    ],
)
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_config_json_round_trip(tmp_path):
    cfg = small_config(n_buckets=(2, 4), hash_seed=3)
    cfg.to_json(tmp_path / "c.json")
    assert ReformerConfig.from_json(tmp_path / "c.json") == cfg


def test_generate_greedy_extends_the_prompt():
    torch.manual_seed(0)
    model = ReformerLM(small_config())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0.0)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], torch.tensor([[1, 2, 3]]))
    assert torch.equal(out, model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0.0))


def test_public_api_names():
    for name in ("ReformerConfig", "ReformerLM", "LSHSelfAttention", "lsh_attention"):
        assert hasattr(reformer, name)


def test_reversible_step_leaves_the_default_generator_as_a_plain_step_does():
    cfg = small_config()
    torch.manual_seed(0)
    rev = ReformerLM(cfg).train()
    plain = ReformerLM(ReformerConfig(**{**cfg.to_dict(), "reversible": False})).train()
    ids = torch.randint(0, 50, (1, 40))
    states = []
    for model in (rev, plain):
        torch.manual_seed(7)
        model.loss(ids, ids.roll(-1, 1)).backward()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_axial_position_embedding_is_the_row_major_broadcast_concatenation():
    """docs/architecture.md: weight i ``(n_i, e_i)`` broadcast over the other axes, concatenated on features,
    flattened row-major (the last axis fastest) to prod(n) positions."""
    from reformer.embeddings import AxialPositionEmbedding

    torch.manual_seed(0)
    emb = AxialPositionEmbedding((4, 3, 5), (2, 6, 4))
    parts = [w.expand(4, 3, 5, w.shape[-1]) for w in emb.weights]
    expected = torch.cat(parts, dim=-1).reshape(60, 12)
    assert torch.equal(emb(torch.arange(60)), expected)
    assert torch.equal(emb(torch.tensor([[7, 59]])), expected[[7, 59]][None])
