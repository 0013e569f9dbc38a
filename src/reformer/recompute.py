"""What a recomputing backward pass needs to replay its forward exactly, and to keep CPU memory flat.

The reversible stack (:mod:`reformer.reversible`) and the chunked loss recompute parts of the forward
pass during ``backward``: dropout masks are replayed by restoring the default generators' state
(:class:`RngState`), hash buckets through the attention's ``replay`` record (whose sort indices
:class:`SortIndexStore` keeps in one buffer), and the forward's autocast state is re-entered
(:class:`AutocastState`: ``loss.backward()`` usually runs outside ``torch.autocast``, and rebuilding a
bfloat16 layer in float32 would subtract the wrong output).
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import ExitStack, contextmanager

import torch


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


class RngState:
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


class SortIndexStore:
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


def eager_under_compile(fn):
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


@contextmanager
def maybe_restored(state: RngState | None):
    """``state.restored()``, or nothing when ``state`` is None (evaluation: no random draws to replay)."""
    if state is None:
        yield
    else:
        with state.restored():
            yield
