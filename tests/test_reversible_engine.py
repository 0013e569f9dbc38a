"""The reversible engine in the decoder's configuration (self-attention, cross-attention, feed-forward
half-steps): its gradients of every parameter, of both input streams and of the encoder output equal
those of plain residuals through the same blocks (float64, init std 0.3, dropout and fresh LSH rotations
replayed), and its backward pass never holds the feed-forward's ``d_ff``-wide activations of the whole
sequence."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reformer.config import ReformerConfig
from reformer.models.decoder import ReformerDecoder
from reformer.models.seq2seq import Seq2SeqConfig
from reformer.reversible import ReversibleSequence

D_MODEL, D_FF, D_MEMORY = 32, 72, 48  # d_ff unlike every other width, to recognise its activations


def _decoder(self_kinds, cross, dropout=0.0, ff_chunk_size=None, std=0.3) -> ReformerDecoder:
    common = dict(d_model=D_MODEL, n_heads=2, d_ff=D_FF, max_seq_len=64, bucket_size=4, local_chunk_size=4,
                  initializer_range=std, dropout=dropout, ff_chunk_size=ff_chunk_size)  # fmt: skip
    enc = ReformerConfig(vocab_size=11, n_layers=1, attn_layers=("full",), causal=False, **{
        **common, "d_model": D_MEMORY // 2, "d_ff": 16, "n_heads": 2})  # fmt: skip
    dec = ReformerConfig(
        vocab_size=11, n_layers=len(self_kinds), attn_layers=self_kinds, causal=True, **common
    )
    config = Seq2SeqConfig(enc, dec, cross_attention=cross, cross_chunk_size=4, cross_window=8)
    decoder = ReformerDecoder(config)
    decoder.apply(decoder._init_weights)
    return decoder.double()


def _inputs(seed=0, length=21, memory_length=17):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(2, length, D_MODEL, generator=g, dtype=torch.float64) for _ in range(2))
    memory = torch.randn(2, memory_length, D_MEMORY, generator=g, dtype=torch.float64)
    weights = [torch.randn(2, length, D_MODEL, generator=g, dtype=torch.float64) for _ in range(2)]
    return x1, x2, memory, weights


@pytest.mark.parametrize(
    "self_kinds,cross,train,ff_chunk_size",
    [
        (("lsh", "full", "local"), "lsh", True, 5),
        (("full", "lsh"), "full", False, None),
        (("local", "lsh"), "full", True, 8),
    ],
)
def test_decoder_stack_gradients_equal_plain_residuals(self_kinds, cross, train, ff_chunk_size):
    decoder = _decoder(self_kinds, cross, dropout=0.1 if train else 0.0, ff_chunk_size=ff_chunk_size)
    decoder.train(train)
    stacks = [decoder.layers, ReversibleSequence(list(decoder.blocks), reversible=False)]
    assert stacks[0].reversible
    x1, x2, memory, (w1, w2) = _inputs()
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 15:] = False  # decoder padding at the end of a row
    memory_mask = torch.ones(2, 17, dtype=torch.bool)
    memory_mask[0, 11:] = False
    results = []
    for stack in stacks:
        leaves = [t.clone().requires_grad_(True) for t in (x1, x2, memory)]
        decoder.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks and LSH rotations for both
        a, b = stack(leaves[0], leaves[1], mask, None, memory=leaves[2], memory_mask=memory_mask)
        keep = mask[..., None]
        ((a * w1 * keep).sum() + (b * w2 * keep).sum()).backward()
        grads = {name: p.grad.clone() for name, p in decoder.layers.named_parameters()}
        grads.update(x1=leaves[0].grad, x2=leaves[1].grad, memory=leaves[2].grad)
        results.append(grads)
    reversible, plain = results
    assert reversible.keys() == plain.keys()
    assert len(reversible) == len(list(decoder.layers.parameters())) + 3
    for name in reversible:
        assert plain[name].abs().sum() > 0, name  # every gradient is exercised
        torch.testing.assert_close(reversible[name], plain[name], rtol=1e-9, atol=1e-11, msg=name)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_decoder_backward_runs_the_feed_forward_in_chunks():
    decoder = _decoder(("full", "lsh"), "lsh", dropout=0.1, ff_chunk_size=8).train()
    x1, x2, memory, (w1, w2) = _inputs()
    leaves = [t.clone().requires_grad_(True) for t in (x1, x2, memory)]
    a, b = decoder.layers(leaves[0], leaves[1], memory=leaves[2])
    with _Shapes() as seen:
        ((a * w1).sum() + (b * w2).sum()).backward()
    assert (2, 8, D_FF) in seen.shapes  # the check sees the feed-forward's chunks
    assert (2, 21, D_FF) not in seen.shapes  # and never the whole sequence's activations
    assert leaves[2].grad is not None and leaves[2].grad.abs().sum() > 0
