"""The reversible engine in the decoder's configuration (self-attention, cross-attention, feed-forward
half-steps): its gradients of every parameter, of both input streams and of the encoder output equal
those of plain residuals through the same blocks (float64, init std 0.3, dropout and fresh LSH rotations
replayed), and its backward pass never holds the feed-forward's ``d_ff``-wide activations of the whole
sequence."""

import weakref

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


class _LiveWidth(TorchDispatchMode):
    """The peak bytes of live activations ``(batch, length, width)`` (each storage counted once, from the
    operation that makes it until it is freed; parameter-shaped tensors are not activations)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.live, self.peak = width, 0, 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.width:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self._sizes:
                self._sizes[key] = storage.nbytes()
                self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
        return out


def _feed_forward_backward_peak(ff_chunk_size: int | None) -> int:
    decoder = _decoder(("full", "lsh"), "lsh", dropout=0.1, ff_chunk_size=ff_chunk_size).train()
    x1, x2, memory, (w1, w2) = _inputs(length=40)
    leaves = [t.clone().requires_grad_(True) for t in (x1, x2, memory)]
    a, b = decoder.layers(leaves[0], leaves[1], memory=leaves[2])
    with _LiveWidth(D_FF) as seen:
        ((a * w1).sum() + (b * w2).sum()).backward()
    assert leaves[2].grad is not None and leaves[2].grad.abs().sum() > 0
    return seen.peak


def test_decoder_backward_holds_one_feed_forward_chunk_at_a_time():
    whole = _feed_forward_backward_peak(None)
    chunked = _feed_forward_backward_peak(8)  # 5 chunks of 8 positions
    assert whole > 0
    # One chunk's d_ff-wide activations (about 1/5 of the whole), not every chunk's at once.
    assert chunked < 0.35 * whole, (chunked, whole)
