"""Reversible residual layers (Reformer paper, section 3; Gomez et al. 2017).

``y1 = x1 + Attention(LayerNorm(x2))``, ``y2 = x2 + FeedForward(y1)``. The backward pass rebuilds each
layer's inputs from its outputs (``x2 = y2 - FeedForward(y1)``, ``x1 = y1 - Attention(LayerNorm(x2))``),
so only the last layer's output is kept and activation memory does not grow with depth. Dropout masks
are replayed by restoring the default generators' state, hash buckets through the attention's
``replay`` record, and the autocast state of the forward pass is re-entered (``loss.backward()`` usually
runs outside ``torch.autocast``; rebuilding a bfloat16 layer in float32 would subtract the wrong output).
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .feedforward import FeedForward
from .vjp import vjp


class ReformerBlock(nn.Module):
    """One layer: pre-LayerNorm attention ``f`` and feed-forward ``g`` (which norms its own input).

    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape.
    """

    def __init__(self, attention: nn.Module, feed_forward: FeedForward, d_model: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attention = attention
        self.feed_forward = feed_forward

    def attend(self, x2, attention_mask=None, n_hashes=None, replay=None) -> torch.Tensor:
        return self.attention(self.attn_norm(x2), attention_mask, n_hashes=n_hashes, replay=replay)

    def forward(self, x1, x2, attention_mask=None, n_hashes=None, replay=None):
        y1 = x1 + self.attend(x2, attention_mask, n_hashes, replay)
        y2 = x2 + self.feed_forward(y1)
        return y1, y2

    def attention_params(self) -> list[nn.Parameter]:
        return [p for p in (*self.attn_norm.parameters(), *self.attention.parameters()) if p.requires_grad]


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()
# Trimming returns freed pages to the OS, which must fault them in again: every second layer (and once
# after the forward pass) bounds the heap's growth at a cost of about 4% of the step time (every layer:
# 8%; every fourth: 2%, but 12 layers then peaked at up to 1.27x the memory of 2).
TRIM_EVERY_LAYERS = 2


def release_free_heap() -> None:
    """Give the pages of freed CPU memory back to the OS (glibc's ``malloc_trim``; no-op elsewhere).

    Called between layers of the reversible backward: each layer frees all its temporaries, and
    without this the allocator keeps them resident in a heap that fragments a little more with every
    layer, so the process's resident memory would grow with depth although live memory does not.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _RngState:
    """The default CPU generator's state and, for CUDA inputs, that device's generator state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class AutocastState:
    """The autocast settings of the CPU and of the CUDA device at forward time (as torch.utils.checkpoint
    records them), to be re-entered for the recomputation."""

    def __init__(self) -> None:
        cache = torch.is_autocast_cache_enabled()
        self.kwargs = {
            device: {
                "enabled": torch.is_autocast_enabled(device),
                "dtype": torch.get_autocast_dtype(device),
                "cache_enabled": cache,
            }
            for device in ("cpu", "cuda")
            if torch.amp.is_autocast_available(device)
        }

    @contextmanager
    def entered(self):
        with ExitStack() as stack:
            for device, kwargs in self.kwargs.items():
                stack.enter_context(torch.autocast(device, **kwargs))
            yield


class _SortIndexStore:
    """One int32 buffer for the sort indices of every layer, allocated at the first LSH layer.

    Layer-sized allocations that outlive the layer, made one per layer between its large
    temporaries, would fragment the CPU heap (its resident size would then grow with depth).
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers, self.buffer, self.used = n_layers, None, 0

    def keep(self, replay: dict) -> None:
        indices = replay.get("sort_indices")
        if indices is None or indices.numel() >= 2**31:
            return
        if self.buffer is None:
            self.buffer = torch.empty(
                (self.n_layers, *indices.shape), dtype=torch.int32, device=indices.device
            )
        if self.buffer.shape[1:] != indices.shape or self.used == self.n_layers:
            return  # a layer with other settings: keep its own tensor
        slot = self.buffer[self.used]
        slot.copy_(indices)
        replay["sort_indices"] = slot
        self.used += 1


def _eager_under_compile(fn):
    """``fn``, run eagerly when torch.compile traces it (one graph break) and unchanged otherwise.

    The reversible stack is one opaque region for torch.compile: its autograd.Function takes modules,
    saves and restores generator states and replays buckets, which dynamo cannot trace; the layers inside
    it then run compiled code (``compiled=True``). (Without gradients, and in eval mode while compiling,
    the stack is a plain loop and compiles whole.) ``torch.compiler.disable`` is applied only while
    compiling, since it imports torch._dynamo, which would slow down ``import reformer``.
    """

    @functools.wraps(fn)
    def run(*args):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args)
        return fn(*args)

    return run


def _attend(block: ReformerBlock, x2, attention_mask, n_hashes, replay) -> torch.Tensor:
    return block.attend(x2, attention_mask, n_hashes, replay)


@functools.cache
def _compiled_attend():
    """:func:`_attend` through torch.compile: one compiled function for every block (their parameters are
    inputs, not constants). The feed-forward stays eager: its compiled backward was slower on CPU."""
    return torch.compile(_attend)


class _ReversibleFunction(torch.autograd.Function):
    """Runs every block forward without storing activations; rebuilds them in backward. With ``compiled``
    (the stack is inside a torch.compile'd model) each block's attention runs through compiled code.

    Block parameters are explicit inputs and their gradients explicit outputs (no side effects on
    ``.grad``), so autograd hooks such as DistributedDataParallel's see them as usual.
    """

    @staticmethod
    def forward(ctx, x1, x2, attention_mask, n_hashes, blocks, keep_rng, compiled, *params):
        replays, rng_states = [], []
        attend = _compiled_attend() if compiled else _attend
        with torch.no_grad():
            # Two buffers updated in place, layer after layer: few large allocations, so the CPU heap
            # does not fragment (its resident size would otherwise grow with depth).
            x1, x2 = x1.clone(), x2.clone()
            store = _SortIndexStore(len(blocks))
            for block in blocks:
                replay: dict = {}
                rng_f = _RngState(x1.device) if keep_rng else None
                x1.add_(attend(block, x2, attention_mask, n_hashes, replay))
                store.keep(replay)
                rng_g = _RngState(x1.device) if keep_rng else None
                x2.add_(block.feed_forward(x1))
                replays.append(replay)
                rng_states.append((rng_f, rng_g))
        ctx.blocks, ctx.replays, ctx.rng_states = blocks, replays, rng_states
        ctx.autocast = AutocastState()
        ctx.attention_mask, ctx.n_hashes, ctx.compiled = attention_mask, n_hashes, compiled
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @_eager_under_compile  # autograd runs it inside a compiled caller's loss.backward()
    @once_differentiable
    def backward(ctx, grad_y1, grad_y2):
        params = [p for block in ctx.blocks for p in block.parameters()]
        # Everything long-lived is allocated up front and updated in place: the activations and their
        # gradients (rebuilt layer by layer) and one buffer for all parameter gradients. Long-lived
        # allocations made between the large short-lived ones would fragment the CPU heap, whose
        # resident size would then grow with depth.
        if ctx.saved_tensors[0].device.type == "cpu":
            release_free_heap()  # what the forward pass freed
        y1, y2 = (t.clone() for t in ctx.saved_tensors)
        grad_y1, grad_y2 = grad_y1.clone(), grad_y2.clone()
        flat = torch.zeros(sum(p.numel() for p in params), dtype=y1.dtype, device=y1.device)
        views = flat.split([p.numel() for p in params])
        grads = {p: g.view_as(p) for p, g in zip(params, views, strict=True)}
        layers = zip(reversed(ctx.blocks), reversed(ctx.replays), reversed(ctx.rng_states), strict=True)
        attend = _compiled_attend() if ctx.compiled else _attend
        for layers_done, (block, replay, (rng_f, rng_g)) in enumerate(layers, start=1):
            # x2 = y2 - g(y1); the gradient of y1 picks up the feed-forward's contribution.
            ff_params = [p for p in block.feed_forward.parameters() if p.requires_grad]
            with _maybe_restored(rng_g), ctx.autocast.entered():
                g_out, grad_from_g = block.feed_forward.vjp_in_chunks(
                    y1, grad_y2, [grads[p] for p in ff_params]
                )
            y2.sub_(g_out)  # now x2
            grad_y1.add_(grad_from_g)
            del g_out, grad_from_g
            # x1 = y1 - f(x2); f replays the forward's buckets through its replay record.
            x2_leaf = y2.detach().requires_grad_(True)
            attn_params = block.attention_params()
            with torch.enable_grad(), _maybe_restored(rng_f), ctx.autocast.entered():
                f_out = attend(block, x2_leaf, ctx.attention_mask, ctx.n_hashes, replay)
            grad_x2_from_f, *attn_grads = vjp(f_out, [x2_leaf, *attn_params], grad_y1)
            for p, g in zip(attn_params, attn_grads, strict=True):
                grads[p].add_(g)
            del attn_grads, x2_leaf
            with torch.no_grad():
                y1.sub_(f_out)  # now x1
            del f_out
            grad_y2.add_(grad_x2_from_f)
            del grad_x2_from_f
            if y1.device.type == "cpu" and layers_done % TRIM_EVERY_LAYERS == 0:
                release_free_heap()
            # grad_y1 (now the gradient of x1) is unchanged: x1 enters y1 with identity.
        param_grads = tuple(grads[p] if p.requires_grad else None for p in params)
        return (grad_y1, grad_y2, None, None, None, None, None, *param_grads)


_reversible_apply = _eager_under_compile(_ReversibleFunction.apply)


@contextmanager
def _maybe_restored(state: _RngState | None):
    if state is None:
        yield
    else:
        with state.restored():
            yield


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReformerBlock` run reversibly (or as plain residuals with ``reversible=False``).

    Shapes: ``x1, x2`` ``(batch, length, d_model)`` -> ``y1, y2`` of the same shape.
    """

    def __init__(self, blocks: list[ReformerBlock], reversible: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, x1, x2, attention_mask=None, n_hashes=None):
        compiling = torch.compiler.is_compiling()
        needs_grad = torch.is_grad_enabled() and (x1.requires_grad or self._any_grad())
        # Under torch.compile an eval-mode pass with gradients runs as plain residuals, traced whole (its
        # autograd graph keeps every layer's activations, as for reversible=False).
        if not self.reversible or not needs_grad or (compiling and not self.training):
            for block in self.blocks:
                x1, x2 = block(x1, x2, attention_mask, n_hashes)
            return x1, x2
        # In training, layers draw from the default generators (dropout, fresh hash rotations): the
        # recomputation must see the same draws and must leave the generators as it found them.
        keep_rng = self.training
        params = [p for block in self.blocks for p in block.parameters()]
        return _reversible_apply(
            x1, x2, attention_mask, n_hashes, list(self.blocks), keep_rng, compiling, *params
        )

    def _any_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())
