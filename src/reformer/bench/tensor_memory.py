"""Peak memory of live tensors on CPU: what ``torch.cuda.max_memory_allocated`` reports on a GPU.

The process's resident set (``VmHWM``) also counts the libraries' code and data (about 400 MiB for torch
after a first step) and the C heap's freed-but-kept pages; neither is what limits the sequence length on
an accelerator, where the allocator's live tensors are. :class:`TensorMemory` counts those on the CPU:
every tensor storage created while it is active (by any operation, in the forward, the backward or a
collective's receive buffer) is added when it appears and subtracted when it is freed, and the largest
total is the peak. Storages that existed before (the weights) are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """``with TensorMemory(existing=model.parameters()) as mem: step()``; then ``mem.peak`` (bytes).

    ``existing``: tensors whose storages are not counted (views of them neither). ``peak`` and
    ``live`` are in bytes; only CPU storages are counted.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._skip = {id(t.untyped_storage()) for t in existing}
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in self._skip:
                continue
            # The Python storage object lives as long as the C++ storage does (PyObject preservation),
            # so its weak reference dies exactly when the memory is freed.
            self._sizes[key] = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out
