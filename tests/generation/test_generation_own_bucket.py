"""Cached decoding under the ``own_bucket`` LSH key rule: the cache's step equals the rule (an independent
brute-force oracle), and cached decoding equals the model's forward on every prefix and recomputation.

The rule makes every position's states final once it is computed (docs/causal_lsh.md), so here, unlike
under the ``chunks`` rule, cached and recomputed decoding must agree for any stack of layers.
"""

from __future__ import annotations

import pytest
import torch

from reformer import ReformerConfig, ReformerLM, lsh_attention
from reformer.generation import (
    OwnBucketCache,
    decode_step,
    own_bucket_decode_step,
    prefill,
    run_settings,
)
from reformer.hashing import bucket_factors, draw_rotations
from tests.attention.test_causal_lsh import oracle

# ---- layer level: one step sees what the rule says -------------------------------------------------


@pytest.mark.parametrize(
    ("rounds", "n_buckets", "bucket", "before", "prompt"),
    [
        (1, 4, 4, 1, 3),
        (2, 2, 4, 1, 9),  # 2 buckets: rings overflow W, eviction matters
        (3, (2, 4), 4, 1, 1),  # factorised buckets, prefill of one position
        (4, 4, 3, 2, 10),  # W = 2 chunks
    ],
)
def test_decode_steps_equal_the_oracle_and_lsh_attention(rounds, n_buckets, bucket, before, prompt):
    """Prefill ``prompt`` positions, append one at a time to 30: each step's output equals the brute-force
    oracle's row at that position and ``lsh_attention(key_rule="own_bucket")``'s last row."""
    batch, heads, dim, total = 2, 2, 6, 30
    gen = torch.Generator().manual_seed(rounds)
    qk = torch.randn(batch, heads, total, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, heads, total, dim, generator=gen, dtype=torch.float64)
    rotations = draw_rotations(heads, dim, rounds, n_buckets, seed=7)
    window = before * bucket
    want_all = oracle(qk, v, rotations, bucket_factors(n_buckets), window)
    lengths = torch.full((batch,), prompt)
    cache = OwnBucketCache.from_prefix(
        qk[:, :, :prompt], v[:, :, :prompt], lengths, rotations, n_buckets, window
    )
    kw = dict(bucket_size=bucket, n_hashes=rounds, n_buckets=n_buckets, causal=True, key_rule="own_bucket")
    worst_oracle = worst_lsh = 0.0
    for t in range(prompt, total):
        got = own_bucket_decode_step(cache, qk[:, :, t : t + 1], v[:, :, t : t + 1], lengths)
        lsh = lsh_attention(
            qk[:, :, : t + 1], v[:, :, : t + 1], n_chunks_before=before, rotations=rotations, **kw
        )[:, :, -1:]
        worst_oracle = max(worst_oracle, (got - want_all[:, :, t : t + 1]).abs().max().item())
        worst_lsh = max(worst_lsh, (got - lsh).abs().max().item())
        lengths = lengths + 1
    assert worst_oracle < 1e-12 and worst_lsh < 1e-12
    assert cache.keys.shape[2] >= total  # grown past the prefill


def test_rows_of_different_lengths_prefill_with_right_padding():
    """Rows hold 2 and 17 positions (the first right-padded in the prefill): padding never enters a
    ring, and each row continues as if alone."""
    heads, dim, bucket, n_buckets, rounds = 2, 6, 4, (2, 2), 2
    gen = torch.Generator().manual_seed(3)
    qk = torch.randn(2, heads, 30, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, heads, 30, dim, generator=gen, dtype=torch.float64)
    rotations = draw_rotations(heads, dim, rounds, n_buckets, seed=2)
    lengths = torch.tensor([2, 17])
    cache = OwnBucketCache.from_prefix(qk[:, :, :17], v[:, :, :17], lengths, rotations, n_buckets, bucket)
    assert int((cache.rings[0] >= 2).sum()) == 0  # row 0's padding positions are nowhere
    want = [oracle(qk[row : row + 1], v[row : row + 1], rotations, (2, 2), bucket)[0] for row in range(2)]
    for _ in range(10):
        got = own_bucket_decode_step(
            cache,
            qk[torch.arange(2), :, lengths][:, :, None],
            v[torch.arange(2), :, lengths][:, :, None],
            lengths,
        )
        for row in range(2):
            t = int(lengths[row])
            assert (got[row, :, 0] - want[row][:, t]).abs().max() < 1e-12, (row, t)
        lengths = lengths + 1


def test_the_step_reads_at_most_rounds_times_w_keys_whatever_the_prefix():
    """The rings' size depends on the rounds, the bucket count and W only, not on the prefix length."""
    rotations = draw_rotations(2, 6, 3, 4, seed=0)
    sizes = set()
    for length in (5, 50, 500):
        qk = torch.randn(1, 2, length, 6, dtype=torch.float64)
        cache = OwnBucketCache.from_prefix(qk, qk, torch.tensor([length]), rotations, 4, 8)
        sizes.add(tuple(cache.rings.shape))
        assert int(cache.counts.sum()) == 2 * 3 * length  # every position entered one bucket per round
    assert sizes == {(1, 2, 3, 4, 8)}


# ---- model level: cached decoding == forward on the prefix == recomputation ------------------------


def own_bucket_model(layers, rounds=2, n_buckets=(2, 4), bucket=4, seed=0):
    cfg = ReformerConfig(
        vocab_size=40, d_model=32, n_heads=2, n_layers=len(layers), d_ff=64, attn_layers=tuple(layers),
        bucket_size=bucket, n_buckets=n_buckets, n_hashes=rounds, max_seq_len=128, local_chunk_size=4,
        ff_chunk_size=None, causal=True, lsh_key_rule="own_bucket", initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return ReformerLM(cfg).double().eval()


MODEL_CASES = [
    # layers, rounds, n_buckets
    pytest.param(("lsh", "lsh"), 1, 4, marks=pytest.mark.slow),
    (("lsh", "lsh", "lsh"), 2, (2, 4)),
    (("local", "lsh", "full", "lsh"), 3, 6),
    # None: the model's fixed count from max_seq_len
    pytest.param(("lsh", "local", "lsh", "lsh"), 4, None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("layers", "rounds", "n_buckets"), MODEL_CASES)
def test_cached_step_logits_equal_the_forward_on_the_prefix(layers, rounds, n_buckets):
    """A 23-token prompt (6 chunks) and 20 greedy steps: at every step the cached logits equal the last
    row of the model's own forward over the whole sequence so far (float64 model)."""
    model = own_bucket_model(layers, rounds, n_buckets)
    ids = torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(rounds))
    settings = run_settings(model, 43)
    logits, cache = prefill(model, ids, torch.full((2,), 23), settings, capacity=43)
    seq, worst, spread = ids, 0.0, 0.0
    with torch.no_grad():
        for _ in range(20):
            ref = model(seq)[:, -1]
            worst = max(worst, (logits.double() - ref).abs().max().item())
            spread = max(spread, (ref - ref.mean(-1, keepdim=True)).abs().max().item())
            next_ids = logits.argmax(-1)
            seq = torch.cat([seq, next_ids[:, None]], dim=1)
            logits = decode_step(model, cache, next_ids)
    assert worst < 1e-5
    assert spread > 0.1  # the logits are not flat: a wrong key set would show


@pytest.mark.parametrize(
    ("layers", "rounds", "n_buckets"), [MODEL_CASES[2], pytest.param(*MODEL_CASES[1], marks=pytest.mark.slow)]
)
def test_cached_greedy_tokens_equal_recomputation_for_left_padded_batches(layers, rounds, n_buckets):
    """Left-padded prompts of 3, 21 and 12 tokens, 20 greedy tokens each: cached == use_cache=False,
    token for token, and each row equals its prompt generated alone."""
    model = own_bucket_model(layers, rounds, n_buckets)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 40, (n,), generator=gen) for n in (3, 21, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    kw = dict(max_new_tokens=20, temperature=0.0, attention_mask=mask)
    cached = model.generate(ids, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    assert len(set(cached[:, width:].flatten().tolist())) > 3  # not one repeated token
    for row, p in enumerate(prompts):
        single = model.generate(p[None], 20, temperature=0.0)
        assert torch.equal(cached[row, width:], single[0, len(p) :]), row


def test_settings_use_the_layers_fixed_bucket_count():
    model = own_bucket_model(("lsh", "local"), n_buckets=None)
    assert run_settings(model, 10).n_buckets == model.layers.blocks[0].attention.n_buckets
    ids = torch.randint(0, 40, (1, 5))
    with pytest.raises(ValueError, match="fixed count"):
        model.generate(ids, 3, n_buckets=4)
    with pytest.raises(ValueError, match="own_bucket"):
        model.generate(ids, 3, hf_compatible=True)
