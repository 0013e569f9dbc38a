"""``reformer.lsh_attention`` against the independent brute-force oracle in ``tests/oracle_lsh.py``.

Outputs and gradients (library autograd vs autograd through the oracle) must agree to 1e-12 in
float64 for every rule the oracle re-derives: hashing (some rows are exactly zero, so the argmax
tie-break matters), the key normalisation, the sort, the chunk window with its wrap across rounds and
its skip over padding chunks, the masks, and the merge of the rounds.
"""

import pytest
import torch

import reformer
from tests.oracle_lsh import lsh_attention_oracle

ATOL = 1e-12
# Gradients: a query that sees only itself has its log-sum-exp near -1e5, where float64 keeps ~1.5e-11
# absolute; the backward's exp(s - lse) inherits that as a relative error of its probabilities.
GRAD_RTOL = 1e-10

# length, bucket_size, n_hashes, n_buckets, causal, mask, (n_chunks_before, n_chunks_after)
CASES = {
    "1round-int": (32, 8, 1, 4, False, None, (1, 0)),
    "2rounds-int-causal": (40, 8, 2, 8, True, None, (1, 0)),
    "3rounds-factorised": (48, 8, 3, (2, 4), False, None, (1, 0)),
    "4rounds-factorised-causal": (48, 8, 4, (2, 2), True, None, (1, 0)),
    "ragged-length": (45, 8, 2, 4, False, None, (1, 0)),
    "ragged-length-causal": (37, 8, 3, (2, 4), True, None, (1, 0)),
    "tail-padding": (48, 8, 2, 4, False, "tail", (1, 0)),
    "tail-padding-causal": (41, 8, 3, 4, True, "tail", (1, 0)),
    "holes": (40, 8, 2, (2, 4), False, "holes", (1, 0)),
    "holes-causal-4rounds": (43, 8, 4, 8, True, "holes", (1, 0)),
    "window-2-1": (64, 8, 2, 8, False, None, (2, 1)),
    "window-0-1-causal": (40, 8, 2, 4, True, "tail", (0, 1)),
    "window-0-0": (32, 8, 3, 4, False, None, (0, 0)),
    "window-3-2-padding": (40, 8, 2, 4, False, "tail", (3, 2)),
    "few-chunks-wrap": (16, 8, 3, 4, False, None, (2, 2)),
    "exact-short": (8, 8, 4, 4, False, None, (1, 0)),
    "exact-short-causal-padding": (7, 8, 2, 4, True, "tail", (1, 0)),
}


def _mask(kind, batch, length):
    if kind is None:
        return None
    mask = torch.ones(batch, length, dtype=torch.bool)
    if kind == "tail":
        mask[1, length - 12 if length > 16 else length - 3 :] = False
    else:  # padding in the middle and at the end
        mask[0, 5:9] = False
        mask[1, 11] = False
        mask[1, length - 6 :] = False
    return mask


def _inputs(length, n_hashes, n_buckets, seed, batch=2, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    # float32-representable values: the library hashes in float32, so both see the same numbers.
    qk = torch.randn(batch, heads, length, dim, generator=g).double()
    qk[:, :, [2, length // 2]] = 0.0  # exact argmax ties: cat([0, -0]) picks the first index
    v = torch.randn(batch, heads, length, dim, generator=g).double()
    factors = n_buckets if isinstance(n_buckets, tuple) else (n_buckets,)
    rotations = torch.randn(heads, dim, n_hashes, sum(factors) // 2, generator=g)
    return qk, v, rotations


@pytest.mark.parametrize("case", list(CASES))
def test_lsh_attention_equals_brute_force_oracle_outputs_and_gradients(case):
    length, bucket, n_hashes, n_buckets, causal, mask_kind, (before, after) = CASES[case]
    qk, v, rotations = _inputs(length, n_hashes, n_buckets, seed=len(case))
    mask = _mask(mask_kind, qk.shape[0], length)
    kwargs = dict(bucket_size=bucket, causal=causal, attention_mask=mask, n_chunks_before=before)
    kwargs["n_chunks_after"] = after
    weights = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real = torch.ones(qk.shape[0], 1, length, 1, dtype=torch.float64)
    if mask is not None:
        real = mask[:, None, :, None].double()  # padding queries' outputs are undefined: not compared

    results = []
    for fn in (
        lambda a, b: reformer.lsh_attention(
            a, b, n_hashes=n_hashes, n_buckets=n_buckets, rotations=rotations, key_rule="chunks", **kwargs
        ),
        lambda a, b: lsh_attention_oracle(a, b, rotations, n_buckets=n_buckets, **kwargs),
    ):
        a, b = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = fn(a, b) * real
        grads = torch.autograd.grad((out * weights).sum(), (a, b))
        results.append((out.detach(), *grads))
    (out, dqk, dv), (ref, ref_dqk, ref_dv) = results
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(dv, ref_dv, atol=ATOL, rtol=GRAD_RTOL)
    torch.testing.assert_close(dqk, ref_dqk, atol=ATOL, rtol=GRAD_RTOL)


def test_oracle_is_not_vacuous():
    """The oracle itself depends on what it should: other rotations give other outputs, and causal
    rows never see the future (perturbing later values leaves earlier outputs alone)."""
    qk, v, rotations = _inputs(40, 2, 4, seed=0)
    kwargs = dict(n_buckets=4, bucket_size=8)
    out = lsh_attention_oracle(qk, v, rotations, **kwargs)
    assert not torch.allclose(out, lsh_attention_oracle(qk, v, rotations.flip(-1), **kwargs))
    causal = lsh_attention_oracle(qk, v, rotations, causal=True, **kwargs)
    v2 = v.clone()
    v2[:, :, 30:] += 1.0
    assert torch.equal(
        causal[:, :, :30], lsh_attention_oracle(qk, v2, rotations, causal=True, **kwargs)[:, :, :30]
    )
