"""A row's outputs depend on its own real tokens only, with the default configuration (``n_buckets=None``):
rows of different lengths batched with right padding, left padding or holes equal the rows run alone."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM, lsh_attention

# Alone, these rows get 1, 4, 10 and 13 LSH chunks of 8 (2, 8, 20 and 26 buckets; the shortest takes
# the exact one-chunk path) and 1, 2, 5 and 7 local chunks of 16.
LENGTHS = (6, 29, 77, 100)


def _model(causal: bool) -> ReformerLM:
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=50, d_model=32, n_heads=2, n_layers=4, d_ff=64, bucket_size=8, n_hashes=2,
        max_seq_len=128, local_chunk_size=16, attn_layers=("lsh", "local", "full", "lsh"), causal=causal,
        initializer_range=0.2, dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip
    assert cfg.n_buckets is None
    return ReformerLM(cfg)


def _batch(layout: str, seed: int = 1):
    """Rows of ``LENGTHS`` and their batch ``(ids, mask)`` with padding laid out as ``layout``."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 50, (n,), generator=g) for n in LENGTHS]
    width = max(LENGTHS) + 3  # even the longest row has some padding
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        if layout == "right":
            mask[i, :n] = True
        elif layout == "left":
            mask[i, width - n :] = True
        else:  # holes: real tokens at random positions
            mask[i, torch.randperm(width, generator=g)[:n]] = True
    ids = torch.randint(0, 50, (len(rows), width), generator=g)  # junk at padding positions
    for i, row in enumerate(rows):
        ids[i, mask[i]] = row
    return rows, ids, mask


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_each_row_equals_the_row_alone_in_eval(causal, layout):
    model = _model(causal).eval()
    rows, ids, mask = _batch(layout)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(logits[i][mask[i]], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_each_row_equals_the_row_alone_in_training_with_the_same_seed(layout):
    """Fresh rotations in training: one seed per LSH call, so a row alone draws the same rotations; the
    token-summed loss's gradient is the sum of the rows' gradients."""
    model = _model(causal=True).train()
    rows, ids, mask = _batch(layout)
    targets = ids.roll(-1, 1)
    torch.manual_seed(7)
    logits = model(ids, attention_mask=mask)
    model.zero_grad()
    torch.manual_seed(7)
    (model.loss(ids, targets, attention_mask=mask) * mask.sum()).backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i, row in enumerate(rows):
        torch.manual_seed(7)
        alone = model(row[None])[0]
        torch.testing.assert_close(logits[i][mask[i]], alone.detach(), atol=1e-5, rtol=0)
        torch.manual_seed(7)
        (model.loss(row[None], targets[i][mask[i]][None]) * len(row)).backward()  # accumulates
    for name, p in model.named_parameters():
        torch.testing.assert_close(batch_grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_attention_rows_equal_rows_alone_with_default_buckets_and_fresh_rotations(causal):
    """The functional core: each row hashed into its own length's bucket count, rotations drawn from
    one seed per call (``torch.manual_seed`` before each call gives a row alone the same ones)."""
    g = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(len(LENGTHS), 2, max(LENGTHS), 8, generator=g) for _ in range(2))
    mask = torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]
    kw = dict(bucket_size=8, n_hashes=2, causal=causal, key_rule="chunks")  # the automatic count
    torch.manual_seed(3)
    out = lsh_attention(qk, v, attention_mask=mask, **kw)
    for i, n in enumerate(LENGTHS):
        torch.manual_seed(3)
        alone = lsh_attention(qk[i : i + 1, :, :n], v[i : i + 1, :, :n], **kw)
        torch.testing.assert_close(out[i : i + 1, :, :n], alone, atol=1e-5, rtol=0)
