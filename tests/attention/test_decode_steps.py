"""Every attention kind decodes itself: ``prefill`` over prompts of different lengths, then one ``step``
per new position, equals the kind's own ``forward`` over each row's prefix (its last position for a
step). The oracle is the module's forward on the unpadded prefix of one row, which shares no decode code.
Blocks likewise: ``prefill_block`` / ``step_block`` equal the block's ``forward`` on the prefix.

Weights are drawn with std 0.3 so that attention is far from uniform and a wrong key set shows.
"""

from __future__ import annotations

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention import (
    CrossAttention,
    FullSelfAttention,
    LocalSelfAttention,
    LSHCrossAttention,
    LSHSelfAttention,
    Prompt,
)
from reformer.block_decoding import prefill_block, step_block

D_MODEL, HEADS = 16, 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _widen(module: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = module.to(dtype).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return module


KINDS = {
    "full": lambda: FullSelfAttention(D_MODEL, HEADS, causal=True),
    "full-rotary": lambda: FullSelfAttention(D_MODEL, HEADS, causal=True, rotary_base=100.0),
    "local": lambda: LocalSelfAttention(D_MODEL, HEADS, chunk_size=4, causal=True, n_chunks_before=1),
    "local-wide": lambda: LocalSelfAttention(
        D_MODEL, HEADS, chunk_size=3, causal=True, n_chunks_before=2, rotary_base=50.0
    ),
    "lsh-chunks": lambda: LSHSelfAttention(
        D_MODEL, HEADS, bucket_size=4, n_hashes=2, n_buckets=4, causal=True, key_rule="chunks"
    ),
    "lsh-chunks-factors": lambda: LSHSelfAttention(
        D_MODEL,
        HEADS,
        bucket_size=4,
        n_hashes=3,
        n_buckets=(2, 4),
        causal=True,
        key_rule="chunks",
        n_chunks_before=2,
    ),  # fmt: skip
    "lsh-own-bucket": lambda: LSHSelfAttention(
        D_MODEL, HEADS, bucket_size=4, n_hashes=2, causal=True, max_seq_len=64
    ),
    "lsh-own-bucket-wide": lambda: LSHSelfAttention(
        D_MODEL, HEADS, bucket_size=3, n_hashes=3, n_buckets=4, causal=True, n_chunks_before=2
    ),
}


def _run_kind(layer, x: torch.Tensor, lengths: torch.Tensor, steps: int, n_buckets=None):
    """Outputs of prefill (real positions per row) and of each step, beside the forward's."""
    batch = x.shape[0]
    prompt = Prompt.from_lengths(lengths, int(lengths.max()), n_buckets=n_buckets, capacity=4)
    out, cache = layer.prefill(x[:, : int(lengths.max())], prompt)
    pairs = []
    for b in range(batch):
        n = int(lengths[b])
        pairs.append((out[b, :n], layer(x[b : b + 1, :n])[0]))
    position = lengths.clone()
    for _ in range(steps):
        x_t = x[torch.arange(batch), position][:, None]
        out_t, cache = layer.step(cache, x_t, position, int(position.max()))
        assert out_t.shape == (batch, 1, D_MODEL)
        for b in range(batch):
            n = int(position[b]) + 1
            pairs.append((out_t[b, 0], layer(x[b : b + 1, :n])[0, -1]))
        position = position + 1
    return pairs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prefill_and_steps_equal_the_forward_of_each_prefix(kind, dtype):
    layer = _widen(KINDS[kind](), dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 30, D_MODEL, generator=gen).to(dtype)
    lengths = torch.tensor([5, 1, 11])  # one chunk, a single token, several chunks
    n_buckets = getattr(layer, "n_buckets", None)
    with torch.no_grad():
        pairs = _run_kind(layer, x, lengths, steps=17, n_buckets=n_buckets)
    for got, want in pairs:
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_lsh_prefill_under_the_chunks_rule_needs_the_run_bucket_count():
    layer = _widen(KINDS["lsh-chunks"](), torch.float64)
    layer.n_buckets = None
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs prompt.n_buckets"):
        layer.prefill(x, Prompt.from_lengths(torch.tensor([6]), 6))


def test_prefill_without_keep_cache_returns_the_forward_and_no_cache():
    layer = _widen(KINDS["local"](), torch.float64)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    out, cache = layer.prefill(x, Prompt.from_lengths(torch.tensor([9, 9]), 9, keep_cache=False))
    assert cache is None
    torch.testing.assert_close(out, layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["exact", "lsh"])
def test_cross_attention_step_equals_its_forward_for_one_query(kind, dtype):
    if kind == "exact":
        layer = CrossAttention(D_MODEL, 24, HEADS)
    else:
        layer = LSHCrossAttention(D_MODEL, 24, HEADS, chunk_size=4, window=6, n_hashes=3, n_buckets=4)
    layer = _widen(layer, dtype)
    gen = torch.Generator().manual_seed(2)
    memory = torch.randn(2, 19, 24, generator=gen).to(dtype)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 12:] = False
    x = torch.randn(2, 7, D_MODEL, generator=gen).to(dtype)
    with torch.no_grad():
        cache = layer.prefill_memory(memory, mask)
        for t in range(x.shape[1]):
            got = layer.step(cache, x[:, t : t + 1])
            want = layer(x[:, t : t + 1], memory, mask)
            torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("key_rule", ["own_bucket", "chunks"])
def test_block_prefill_and_steps_equal_the_block_forward(key_rule):
    """Per block, fed its own input stream: the residual arithmetic of the block's forward."""
    cfg = ReformerConfig(
        vocab_size=20, d_model=D_MODEL, n_heads=HEADS, n_layers=3, d_ff=32,
        attn_layers=("local", "lsh", "full"), bucket_size=4, n_buckets=4, n_hashes=2, max_seq_len=64,
        local_chunk_size=4, lsh_key_rule=key_rule, initializer_range=0.2, ff_chunk_size=None,
    )  # fmt: skip
    model = _widen(ReformerLM(cfg), torch.float64)
    x1, x2 = torch.randn(2, 2, 20, D_MODEL, dtype=torch.float64)
    lengths = torch.tensor([6, 3])
    with torch.no_grad():
        for block in model.layers.blocks:
            state = block.attention.decode_state(4, None)
            prompt = Prompt.from_lengths(lengths, 6, n_buckets=4)
            y1, y2, cache = prefill_block(block, x1[:, :6], x2[:, :6], prompt, state)
            for b, n in enumerate(lengths.tolist()):
                w1, w2 = block(x1[b : b + 1, :n], x2[b : b + 1, :n])
                torch.testing.assert_close((y1[b, :n], y2[b, :n]), (w1[0], w2[0]), rtol=1e-10, atol=1e-10)
            position = lengths.clone()
            for _ in range(9):
                rows = torch.arange(2)
                a, c = x1[rows, position][:, None], x2[rows, position][:, None]
                y1, y2, cache = step_block(block, cache, a, c, position, int(position.max()))
                for b, n in enumerate((position + 1).tolist()):
                    w1, w2 = block(x1[b : b + 1, :n], x2[b : b + 1, :n])
                    torch.testing.assert_close(
                        (y1[b, 0], y2[b, 0]), (w1[0, -1], w2[0, -1]), rtol=1e-10, atol=1e-10
                    )
                position = position + 1
