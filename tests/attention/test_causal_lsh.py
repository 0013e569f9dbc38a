"""Truly causal LSH attention (``key_rule="own_bucket"``): an independent oracle of the rule, gradients,
and prefix consistency (outputs at positions < n do not depend on the tokens after n).

The oracle below is written from the rule's definition with plain loops in float64 and shares no code
with ``reformer``: its own hashing (argmax of ``[xR; -xR]`` per bucket factor), its own stable sort by
(bucket, position), its own masks and its own log-sum-exp combination of the rounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention.lsh import LSHSelfAttention, lsh_attention
from reformer.hf import config_to_hf_dict

SELF_SCORE = -1e5  # a query's own key: seen only when nothing else is


def oracle_bucket(x: torch.Tensor, rot: torch.Tensor, factors: tuple[int, ...]) -> int:
    """Bucket of one vector ``x`` ``(d,)`` under one round's rotations ``rot`` ``(d, sum(factors)//2)``."""
    projected = [float(sum(x[a] * rot[a, c] for a in range(x.shape[0]))) for c in range(rot.shape[1])]
    bucket, start, stride = 0, 0, 1
    for f in factors:
        part = projected[start : start + f // 2]
        both = part + [-p for p in part]
        best = max(range(f), key=lambda i: (both[i], -i))  # first maximum
        bucket += stride * best
        start += f // 2
        stride *= f
    return bucket


def oracle_keys_seen(buckets: list[int], real: list[bool], window: int) -> list[list[int]]:
    """For each real position: the positions whose keys it sees in one round (excluding itself)."""
    order = sorted((p for p in range(len(buckets)) if real[p]), key=lambda p: (buckets[p], p))
    seen = [[] for _ in buckets]
    for rank, p in enumerate(order):
        for earlier in order[max(0, rank - window) : rank]:
            if buckets[earlier] == buckets[p]:
                seen[p].append(earlier)
    return seen


def oracle(qk, v, rotations, factors, window, mask=None) -> torch.Tensor:
    """The own-bucket rule by brute force, differentiable in ``qk`` and ``v`` (float64).

    ``qk`` ``(B, H, L, D)``, ``v`` ``(B, H, L, Dv)``, ``rotations`` ``(H, D, rounds, sum(factors)//2)``,
    ``mask`` ``(B, L)`` bool (True = real). Returns ``(B, H, L, Dv)``; padding positions are zero.
    """
    batch, heads, length, dim = qk.shape
    rounds = rotations.shape[2]
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    rows = []
    for b in range(batch):
        real = [True] * length if mask is None else [bool(m) for m in mask[b]]
        for h in range(heads):
            q = qk[b, h]
            rms = torch.sqrt((q * q).mean(-1, keepdim=True) + 1e-6)
            k = q / rms / math.sqrt(dim)
            seen = []
            for r in range(rounds):
                rot = rotations[h, :, r].double()
                buckets = [oracle_bucket(q[p].detach().double(), rot, factors) for p in range(length)]
                seen.append(oracle_keys_seen(buckets, real, window))
            for p in range(length):
                if not real[p]:
                    rows.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    continue
                outs, lses = [], []
                for r in range(rounds):
                    keys = seen[r][p]
                    scores = torch.stack([q[p] @ k[j] for j in keys] + [q.new_tensor(SELF_SCORE)])
                    values = torch.stack([v[b, h, j] for j in keys] + [v[b, h, p]])
                    outs.append(torch.softmax(scores, 0) @ values)
                    lses.append(torch.logsumexp(scores, 0))
                # softmax subtracts the maximum first: exact where every round sees only the query itself
                weights = torch.softmax(torch.stack(lses), 0)
                rows.append((weights[:, None] * torch.stack(outs)).sum(0))
    out = torch.stack(rows).view(batch, heads, length, v.shape[-1])
    return out


def _inputs(batch, heads, length, dim, seed, n_pad=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    mask = None
    if n_pad:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, -n_pad:] = False  # right padding
        mask[0, 3] = False  # and a hole in the middle
    return qk, v, mask


def _rotations(heads, dim, rounds, factors, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, dim, rounds, sum(factors) // 2, generator=g)


ORACLE_CASES = [
    # length, bucket, rounds, factors, chunks_before, n_pad
    (20, 4, 1, (4,), 1, 0),
    (19, 4, 2, (2,), 1, 0),  # few buckets: they overflow W, the distance mask matters
    (24, 4, 3, (2, 4), 1, 3),
    (6, 8, 2, (4,), 1, 0),  # shorter than a chunk: hashed too, rounds' single chunks must not mix
    (26, 4, 4, (2,), 2, 2),  # W = 2 chunks
    (12, 4, 1, (2,), 2, 0),  # two chunks and a window of three: a slot wraps onto the own chunk
]


@pytest.mark.parametrize(("length", "bucket", "rounds", "factors", "before", "n_pad"), ORACLE_CASES)
def test_outputs_and_gradients_equal_the_oracle(length, bucket, rounds, factors, before, n_pad):
    qk, v, mask = _inputs(2, 2, length, 5, seed=length + rounds, n_pad=n_pad)
    rotations = _rotations(2, 5, rounds, factors, seed=7)
    n_buckets = factors if len(factors) > 1 else factors[0]
    qk.requires_grad_(True)
    v.requires_grad_(True)
    out = lsh_attention(
        qk, v, bucket_size=bucket, n_hashes=rounds, n_buckets=n_buckets, causal=True, key_rule="own_bucket",
        n_chunks_before=before, rotations=rotations, attention_mask=mask,
    )  # fmt: skip
    want = oracle(qk, v, rotations, factors, window=before * bucket, mask=mask)
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask
    keep = real[:, None, :, None].double()
    torch.testing.assert_close(out * keep, want, atol=1e-12, rtol=0)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * keep
    got = torch.autograd.grad(out, (qk, v), g)
    expected = torch.autograd.grad(want, (qk, v), g)
    # 1e-10, not 1e-12: the backward recomputes a query's probabilities as 2**(s - LSE) in base 2, and a
    # query that sees only itself has s = LSE = -1e5 * log2(e), where one ulp is 3e-11 (its dv is off by
    # that relative amount; the forward normalises exactly).
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_the_oracle_sees_what_the_rule_says():
    """The oracle's key sets on a hand-made case: buckets [0, 1, 0, 0, 1, 0], W = 2."""
    seen = oracle_keys_seen([0, 1, 0, 0, 1, 0], [True] * 6, window=2)
    assert seen == [[], [], [0], [0, 2], [1], [2, 3]]
    seen = oracle_keys_seen([0, 1, 0, 0, 1, 0], [True, True, False, True, True, True], window=2)
    assert seen == [[], [], [], [0], [1], [0, 3]]


def test_gradcheck():
    qk, v, mask = _inputs(1, 2, 13, 4, seed=1, n_pad=2)
    kw = dict(bucket_size=4, n_hashes=2, n_buckets=4, causal=True, key_rule="own_bucket", attention_mask=mask)
    _, idx, buckets = lsh_attention(
        qk, v, hash_seed=3, return_sort_indices=True, return_sorted_buckets=True, **kw
    )
    qk.requires_grad_(True)
    v.requires_grad_(True)
    # Replayed buckets: a perturbation of qk must not move a position to another bucket.
    assert torch.autograd.gradcheck(
        lambda a, b: lsh_attention(a, b, sort_indices=idx, sorted_buckets=buckets, **kw), (qk, v)
    )


def _prefix_mismatch(fn, length, n):
    full = fn(length)
    return (full[..., :n, :] - fn(n)).abs().max().item()


@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
@pytest.mark.parametrize("n_buckets", [4, (2, 4)])
def test_layer_prefix_consistency(rounds, n_buckets):
    qk, v, _ = _inputs(2, 2, 45, 8, seed=rounds)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, 5] = mask[1, 30] = False

    def run(key_rule):
        kw = dict(bucket_size=8, n_hashes=rounds, n_buckets=n_buckets, causal=True, key_rule=key_rule)
        return lambda n: lsh_attention(
            qk[:, :, :n], v[:, :, :n], attention_mask=mask[:, :n], hash_seed=5, **kw
        )

    for n in (3, 8, 9, 20, 33, 44):
        assert _prefix_mismatch(run("own_bucket"), 45, n) < 1e-12
    # The trax/HF rule is not prefix consistent (so the check above can fail).
    assert max(_prefix_mismatch(run("chunks"), 45, n) for n in (20, 33, 44)) > 1e-3


def _causal_lm(key_rule, rounds, n_buckets, attn_layers=None, reversible=True):
    cfg = ReformerConfig(
        vocab_size=17, d_model=16, n_heads=2, n_layers=4, d_ff=32, causal=True, max_seq_len=128,
        attn_layers=attn_layers or ("lsh", "local", "lsh", "lsh"), bucket_size=8, n_buckets=n_buckets,
        n_hashes=rounds, local_chunk_size=8, lsh_key_rule=key_rule, initializer_range=0.3,
        reversible=reversible,
    )  # fmt: skip
    torch.manual_seed(0)
    return ReformerLM(cfg).double().eval()


@pytest.mark.parametrize(("rounds", "n_buckets"), [(1, None), (2, (2, 4)), (3, 4), (4, None)])
def test_model_prefix_consistency(rounds, n_buckets):
    """Several layers (LSH feeding LSH), padding, default bucket count (from max_seq_len) or fixed."""
    ids = torch.randint(0, 17, (2, 70), generator=torch.Generator().manual_seed(rounds))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 50:] = 0  # right padding

    def logits(model):
        return lambda n: model(ids[:, :n], attention_mask=mask[:, :n])

    model = _causal_lm("own_bucket", rounds, n_buckets)
    with torch.no_grad():
        for n in (5, 9, 31, 50, 64):
            assert _prefix_mismatch(logits(model), 70, n) < 1e-12
        chunks = _causal_lm("chunks", rounds, n_buckets or 4)
        assert max(_prefix_mismatch(logits(chunks), 70, n) for n in (31, 50, 64)) > 1e-3


def test_reversible_training_gradients_equal_plain_residuals():
    """The reversible backward replays the sort indices and the sorted buckets of the forward pass."""
    ids = torch.randint(0, 17, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for reversible in (True, False):
        model = _causal_lm("own_bucket", 2, (2, 4), reversible=reversible).train()
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-10, rtol=0, msg=name)


def test_settings_are_checked_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="causal"):
        ReformerConfig(causal=False, lsh_key_rule="own_bucket")
    with pytest.raises(ValueError, match="unknown"):
        ReformerConfig(lsh_key_rule="bucket")
    # One default with the config: causal layers are truly causal, their count fixed by max_seq_len.
    layer = LSHSelfAttention(16, 2, causal=True, bucket_size=8, max_seq_len=1024)
    assert (layer.key_rule, layer.n_buckets) == ("own_bucket", (16, 16))  # 256, factorised
    assert LSHSelfAttention(16, 2, causal=False).key_rule == "chunks"
    # The functional core has no max_seq_len: a causal call names its count or the trax/HF rule.
    qk, v, _ = _inputs(1, 1, 20, 4, seed=0)
    for key_rule in ("own_bucket", None):
        with pytest.raises(ValueError, match="fixed n_buckets.*key_rule='chunks'"):
            lsh_attention(qk, v, bucket_size=4, causal=True, key_rule=key_rule)
    assert lsh_attention(qk, v, bucket_size=4, causal=True, key_rule="chunks").shape == v.shape
    assert torch.equal(
        lsh_attention(qk, v, bucket_size=4, n_buckets=4, causal=True, hash_seed=1),
        lsh_attention(qk, v, bucket_size=4, n_buckets=4, causal=True, hash_seed=1, key_rule="own_bucket"),
    )
    cfg = ReformerConfig(lsh_key_rule="own_bucket", max_seq_len=1024, n_layers=2)
    cfg.to_json(tmp_path / "c.json")
    assert ReformerConfig.from_json(tmp_path / "c.json") == cfg
    model = ReformerLM(cfg)
    assert model.layers.blocks[0].attention.n_buckets == 32  # 2 per chunk at max_seq_len, whatever the input
    with pytest.raises(ValueError, match="lsh_key_rule"):
        config_to_hf_dict(cfg)
    # New causal models are truly causal; bidirectional ones and configs saved before the rule existed
    # (config.json without the field) keep the trax/HF rule.
    assert ReformerConfig().lsh_key_rule == "own_bucket"
    assert ReformerConfig(causal=False).lsh_key_rule == "chunks"
    saved = {k: v for k, v in ReformerConfig(n_layers=2).to_dict().items() if k != "lsh_key_rule"}
    assert ReformerConfig.from_dict(saved).lsh_key_rule == "chunks"
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1)  # decodes (own cache)
    assert out.shape == (1, 4)


def test_bfloat16_follows_float32_on_the_same_buckets():
    """The masks do not depend on the dtype: bfloat16 outputs and gradients follow float32 when the buckets
    of the float32 call are replayed (bfloat16 rounding alone would move some positions to other buckets)."""
    qk, v, mask = _inputs(2, 2, 40, 16, seed=4, n_pad=5)
    kw = dict(bucket_size=8, n_hashes=2, n_buckets=4, causal=True, key_rule="own_bucket", attention_mask=mask)
    qk32, v32 = qk.float().requires_grad_(True), v.float().requires_grad_(True)
    ref, idx, buckets = lsh_attention(
        qk32, v32, hash_seed=1, return_sort_indices=True, return_sorted_buckets=True, **kw
    )
    qk16, v16 = qk.bfloat16().requires_grad_(True), v.bfloat16().requires_grad_(True)
    out = lsh_attention(qk16, v16, sort_indices=idx, sorted_buckets=buckets, **kw)
    assert out.dtype == torch.bfloat16
    keep = mask[:, None, :, None].float()
    torch.testing.assert_close(out.float() * keep, ref * keep, atol=0.05, rtol=0.02)
    (ref * keep).sum().backward()
    (out.float() * keep).sum().backward()
    for got, want in ((qk16.grad, qk32.grad), (v16.grad, v32.grad)):
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
