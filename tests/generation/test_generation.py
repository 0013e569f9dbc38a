import pytest
import torch

from reformer import ReformerConfig, ReformerLM, full_attention, local_attention, lsh_attention
from reformer.generation import (
    KVCache,
    LocalCache,
    LSHCache,
    decode_step,
    full_decode_step,
    local_decode_step,
    lsh_decode_step,
    prefill,
    run_settings,
    sample_next,
)
from reformer.hashing import draw_rotations


def config(layers, **overrides):
    # The trax/HF "chunks" rule and its approximate cache (test_generation_own_bucket.py has the default).
    base = dict(
        vocab_size=40, d_model=32, n_heads=2, n_layers=len(layers), d_ff=64, attn_layers=tuple(layers),
        bucket_size=8, n_buckets=4, n_hashes=2, max_seq_len=256, local_chunk_size=8, ff_chunk_size=None,
        lsh_key_rule="chunks",
    )  # fmt: skip
    base.update(overrides)
    return ReformerConfig(**base)


def model64(layers, seed=0, **overrides):
    torch.manual_seed(seed)
    model = ReformerLM(config(layers, **overrides)).double().eval()
    # Larger weights than the initialisation: attention is far from uniform, so a wrong key set shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- layer level: the new position gathers exactly the chunked computation's keys ----------------


@pytest.mark.parametrize(
    ("n_hashes", "n_buckets", "before", "after"),
    [(1, 4, 1, 0), (2, 6, 1, 0), (3, (2, 4), 1, 0), (2, 4, 2, 0), (2, 4, 1, 1)],
)
def test_lsh_decode_steps_equal_lsh_attention_on_the_whole_sequence(n_hashes, n_buckets, before, after):
    """Prefill 3 positions, then append one at a time up to 41 (inside one chunk, at and off chunk
    multiples): every new position's output equals lsh_attention's last row over the whole sequence."""
    batch, heads, dim, bs, total = 2, 2, 8, 8, 41
    qk, v = _rand(batch, heads, total, dim, seed=1), _rand(batch, heads, total, dim, seed=2)
    rotations = draw_rotations(heads, dim, n_hashes, n_buckets, seed=5)
    kwargs = dict(bucket_size=bs, n_hashes=n_hashes, n_buckets=n_buckets, causal=True, rotations=rotations)
    kwargs.update(n_chunks_before=before, n_chunks_after=after, key_rule="chunks")
    lengths = torch.full((batch,), 3)
    cache = LSHCache.from_prefix(qk[:, :, :3], v[:, :, :3], lengths, rotations, n_buckets, bs, before, after)
    worst = 0.0
    for t in range(3, total):
        got = lsh_decode_step(cache, qk[:, :, t : t + 1], v[:, :, t : t + 1], lengths)
        want = lsh_attention(qk[:, :, : t + 1], v[:, :, : t + 1], **kwargs)[:, :, -1:]
        worst = max(worst, (got - want).abs().max().item())
        lengths = lengths + 1
    assert worst < 1e-12
    # The sorted positions kept are the (bucket, position) sort of everything seen.
    ref = torch.sort(cache.buckets[..., :total], dim=-1, stable=True).indices
    assert torch.equal(cache.order[..., :total].long(), ref)


def test_lsh_decode_with_rows_of_different_lengths_and_a_grown_cache():
    """Rows hold 5 and 30 positions (right padding in the prefill); capacity grows past the prefill."""
    heads, dim, bs, n_buckets = 2, 8, 8, 6
    qk, v = _rand(2, heads, 40, dim, seed=3), _rand(2, heads, 40, dim, seed=4)
    rotations = draw_rotations(heads, dim, 2, n_buckets, seed=1)
    lengths = torch.tensor([5, 30])
    cache = LSHCache.from_prefix(qk[:, :, :30], v[:, :, :30], lengths, rotations, n_buckets, bs)
    assert cache.keys.shape[2] == 30
    for _ in range(9):
        new_qk = qk[torch.arange(2), :, lengths][:, :, None]
        new_v = v[torch.arange(2), :, lengths][:, :, None]
        got = lsh_decode_step(cache, new_qk, new_v, lengths)
        for row in range(2):
            n = int(lengths[row]) + 1
            want = lsh_attention(
                qk[row : row + 1, :, :n], v[row : row + 1, :, :n], bucket_size=bs, n_hashes=2,
                n_buckets=n_buckets, causal=True, key_rule="chunks", rotations=rotations,
            )  # fmt: skip
            assert (got[row] - want[0, :, -1:]).abs().max() < 1e-12
        lengths = lengths + 1
    assert cache.keys.shape[2] >= 39


@pytest.mark.parametrize("before", [0, 1, 2])
def test_local_decode_steps_equal_local_attention(before):
    batch, heads, dim, cs, total = 2, 2, 8, 4, 23
    q, k, v = (_rand(batch, heads, total, dim, seed=s) for s in (6, 7, 8))
    lengths = torch.full((batch,), 2)
    cache = LocalCache.from_prefix(k[:, :, :2] / dim**0.5, v[:, :, :2], lengths, cs, before)
    for t in range(2, total):
        sl = slice(t, t + 1)
        got = local_decode_step(cache, q[:, :, sl], k[:, :, sl], v[:, :, sl], lengths)
        want = local_attention(
            q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], chunk_size=cs, causal=True,
            n_chunks_before=before,
        )[:, :, -1:]  # fmt: skip
        assert (got - want).abs().max() < 1e-12, t
        lengths = lengths + 1


def test_full_decode_steps_equal_full_attention():
    q, k, v = (_rand(1, 2, 12, 8, seed=s) for s in (9, 10, 11))
    lengths = torch.tensor([3])
    cache = KVCache.from_prefix(k[:, :, :3], v[:, :, :3])
    for t in range(3, 12):
        sl = slice(t, t + 1)
        got = full_decode_step(cache, q[:, :, sl], k[:, :, sl], v[:, :, sl], lengths, t)
        want = full_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True)[:, :, -1:]
        assert (got - want).abs().max() < 1e-12
        lengths = lengths + 1


# ---- model level ---------------------------------------------------------------------------------


def test_prefill_reference_equals_the_model_forward():
    """The recompute path (fixed bucket count, explicit rotations) is the model's own forward."""
    model = model64(("local", "lsh", "full", "lsh"))
    ids = torch.randint(0, 40, (2, 37), generator=torch.Generator().manual_seed(0))
    settings = run_settings(model, 37)
    logits, _ = prefill(model, ids, torch.tensor([37, 37]), settings, keep_cache=False)
    with torch.no_grad():
        assert (logits - model(ids)[:, -1].float()).abs().max() < 1e-5


@pytest.mark.parametrize(
    "layers",
    [
        ("local", "full", "local"),  # no LSH: every layer's prefix states are final
        ("local", "full", "lsh"),  # LSH only in the last layer
    ],
)
@pytest.mark.parametrize("prompt", [3, 16, 21])  # within a chunk, a chunk multiple, neither
def test_cached_logits_equal_recomputation_where_it_holds(layers, prompt):
    model = model64(layers)
    ids = torch.randint(0, 40, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    new = 20
    settings = run_settings(model, prompt + new)
    logits, cache = prefill(model, ids, torch.full((2,), prompt), settings, capacity=prompt + new)
    seq = ids
    for _ in range(new):
        ref, _ = prefill(model, seq, torch.full((2,), seq.shape[1]), settings, keep_cache=False)
        assert (logits - ref).abs().max() < 1e-5
        next_ids = logits.argmax(-1)
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        logits = decode_step(model, cache, next_ids)


def test_cached_greedy_tokens_equal_recomputation_within_one_lsh_chunk():
    model = model64(("lsh", "local", "lsh"), bucket_size=32)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(ids, max_new_tokens=27, temperature=0.0)
    recomputed = model.generate(ids, max_new_tokens=27, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_stale_prefix_states_make_mixed_models_differ_from_recomputation():
    """The documented limit: with an LSH layer feeding later layers and chunked LSH (sequence longer
    than one chunk), full recomputation changes earlier tokens' states, the cache does not."""
    model = model64(("lsh", "local", "lsh"))
    ids = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(1))
    settings = run_settings(model, 60)
    logits, cache = prefill(model, ids, torch.tensor([30]), settings, capacity=60)
    seq, worst = ids, 0.0
    for _ in range(30):
        ref, _ = prefill(model, seq, torch.tensor([seq.shape[1]]), settings, keep_cache=False)
        worst = max(worst, (logits - ref).abs().max().item())
        next_ids = ref.argmax(-1)
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        logits = decode_step(model, cache, next_ids)
    assert worst > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_one_by_one(use_cache):
    model = model64(("local", "lsh", "full", "lsh"))
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 40, (n,), generator=gen) for n in (3, 19, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    new = 15
    batched = model.generate(
        ids, max_new_tokens=new, temperature=0.0, attention_mask=mask, use_cache=use_cache, n_buckets=4
    )
    assert torch.equal(batched[:, :width], ids)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], new, temperature=0.0, use_cache=use_cache, n_buckets=4)
        assert torch.equal(batched[row, width:], single[0, len(p) :]), row


def test_cache_is_preallocated_and_reports_its_size():
    model = model64(("local", "lsh", "full"))
    ids = torch.randint(0, 40, (1, 10))
    settings = run_settings(model, 30)
    _, cache = prefill(model, ids, torch.tensor([10]), settings, capacity=30)
    local, lsh, full = cache.layers
    assert lsh.keys.shape[2] == 30 and full.keys.shape[2] == 30
    assert local.keys.shape[2] == 2 * model.config.local_chunk_size  # the window, not the prefix
    before = [t.data_ptr() for t in (lsh.keys, lsh.order, full.keys)]
    for token in range(20):
        decode_step(model, cache, torch.tensor([token]))
    assert [t.data_ptr() for t in (lsh.keys, lsh.order, full.keys)] == before  # written in place
    heads, head_dim = model.config.n_heads, model.config.d_head
    expected_lsh = 2 * 30 * heads * head_dim * 8 + 2 * heads * 2 * 30 * 4  # keys+values, buckets+order
    assert lsh.nbytes() == expected_lsh
    assert cache.nbytes() == lsh.nbytes() + local.nbytes() + full.nbytes()


def test_generate_keeps_prompt_and_sampling_is_reproducible():
    model = model64(("local", "lsh"))
    ids = torch.randint(0, 40, (2, 6))
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    outs = [model.generate(ids, 8, temperature=0.8, top_k=5, top_p=0.9, generator=g) for g in gens]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (2, 14) and torch.equal(outs[0][:, :6], ids)
    assert torch.equal(model.generate(ids, 0), ids)
    assert not model.training
    model.train()
    model.generate(ids, 2)
    assert model.training


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.7, generator=gen) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    draws = torch.stack([sample_next(logits, 1.0, top_k=3, generator=gen) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.3, generator=gen) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}
    assert torch.equal(sample_next(logits, 0.0), torch.tensor([0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(n_hashes=0), "n_hashes"),
        (dict(max_new_tokens=300), "max_seq_len"),
    ],
)
def test_bad_generation_arguments_are_named(kwargs, message):
    model = model64(("lsh",))
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})


# ---- HF transformers parity and the command line ---------------------------------------------------


def hf_lm(layers, lsh_chunk):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.ReformerConfig(
        vocab_size=40, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=list(layers), axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16],
        max_position_embeddings=64, feed_forward_size=64, lsh_attn_chunk_length=lsh_chunk,
        local_attn_chunk_length=4, num_buckets=4, num_hashes=2, is_decoder=True, hash_seed=3,
        hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        pad_token_id=0, eos_token_id=None, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.ReformerModelWithLMHead(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # peaked distributions: a wrong key set changes the tokens
    return hf, ReformerLM.from_hf(hf).eval()


def hf_greedy(hf, ids, new):
    return hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, use_cache=True,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip


@pytest.mark.parametrize("layers", [("local", "lsh"), ("lsh", "local", "lsh")])
def test_greedy_tokens_equal_hf_generate_within_one_lsh_chunk(layers):
    """Where HF's cached LSH step equals the chunked computation (the whole sequence within one LSH
    chunk; local layers over eight chunks), the default mode generates HF's greedy tokens."""
    hf, ours = hf_lm(layers, lsh_chunk=32)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = hf_greedy(hf, ids, 26).sequences  # 32 tokens in all
    assert torch.equal(ours.generate(ids, 26, temperature=0.0), expected)


@pytest.mark.parametrize(
    ("layers", "prompt"), [(("lsh", "local", "lsh"), 20), (("lsh", "lsh"), 24), (("local", "lsh"), 5)]
)
def test_hf_compatible_mode_follows_hf_generate_past_one_chunk(layers, prompt):
    """LSH chunk 8, up to 44 tokens: HF's cached rule differs from the chunked computation, and
    ``hf_compatible=True`` reproduces it (its scores to float32 rounding, its greedy tokens)."""
    hf, ours = hf_lm(layers, lsh_chunk=8)
    ids = torch.randint(1, 40, (1, prompt), generator=torch.Generator().manual_seed(4))
    new = 20
    expected = hf_greedy(hf, ids, new)
    settings = run_settings(ours, prompt + new, hf_compatible=True)
    logits, cache = prefill(ours, ids, torch.tensor([prompt]), settings, capacity=prompt + new)
    for step in range(new):
        assert (logits - expected.scores[step]).abs().max() < 1e-3, step
        logits = decode_step(ours, cache, expected.sequences[:, prompt + step])
    assert torch.equal(ours.generate(ids, new, temperature=0.0, hf_compatible=True), expected.sequences)


def test_cli_generate_streams_the_continuation(tmp_path, capsys):
    from reformer.cli import main

    torch.manual_seed(0)
    model = ReformerLM(config(("local", "lsh"), vocab_size=256))
    model.save_pretrained(tmp_path / "m")
    prompt = "def f(x):"
    args = [str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", *args]) == 0
    out, err = capsys.readouterr()
    ids = torch.tensor([list(prompt.encode())])
    expected = bytes(model.generate(ids, 12, temperature=0.0)[0, len(prompt) :].tolist())
    assert out == expected.decode("utf-8", errors="replace") + "\n"
    assert "12 tokens" in err and "cache" in err
    (tmp_path / "p.txt").write_text(prompt)
    assert main(["generate", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "p.txt"), "--seed", "3",
                 "--max-new-tokens", "5", "--top-k", "4"]) == 0  # fmt: skip
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "missing"), "--prompt", "x"])


def test_no_cache_path_keeps_the_old_sliding_window_behaviour():
    """use_cache=False is the former generate: the model's forward over the trailing max_seq_len tokens
    (n_buckets fixed in the config, so the bucket count is the same), argmax for greedy."""
    torch.manual_seed(0)
    model = ReformerLM(config(("lsh", "local"), max_seq_len=64)).eval()
    ids = torch.randint(0, 40, (1, 60))
    out = model.generate(ids, 8, temperature=0.0, use_cache=False)
    expected = ids
    with torch.no_grad():
        for _ in range(8):
            next_id = model(expected[:, -64:])[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, 8, temperature=0.0)
