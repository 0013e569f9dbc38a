"""What every attention kind's ``prefill`` is told about the prompt batch it caches.

Every self-attention kind decodes with two methods next to its ``forward``:

* ``prefill(x, prompt, state=None) -> (out, cache)``: the causal eval-mode forward over ``x``
  ``(batch, length, d_model)`` (row ``b`` real for its first ``prompt.lengths[b]`` positions, then
  padding), ``out`` of the same shape, and the layer's cache of the real positions (None without
  ``prompt.keep_cache``).
* ``step(cache, x_t, lengths, max_length) -> (out_t, cache)``: one new position per row, ``x_t``
  ``(batch, 1, d_model)`` at position ``lengths[b]`` of row ``b`` (``lengths`` ``(batch,)`` int64, the
  positions the cache holds; ``max_length == int(lengths.max())``); ``out_t`` ``(batch, 1, d_model)``
  equals the last position of the causal forward over the row's ``lengths[b] + 1`` positions. The
  cache is updated in place and returned.

``state`` is what a kind fixes for a whole generation run (``decode_state``: the LSH rotations;
None for the others), drawn once so that recomputing from a prompt does not redraw it.

The caches: :class:`~reformer.attention.kv_cache.KVCache` (full),
:class:`~reformer.attention.local_cache.LocalCache` (local), :class:`~reformer.attention.lsh_cache.LSHCache`
(LSH, ``chunks`` key rule) and :class:`~reformer.attention.own_bucket_cache.OwnBucketCache` (LSH,
``own_bucket`` key rule), each with its tensor shapes documented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompt:
    """A batch of prompts entering the layers' caches.

    Attributes:
        lengths: ``(batch,)`` int64 real positions per row (the rest of the row is padding).
        attention_mask: ``(batch, length)`` bool, True for real positions; None when every row is full.
        n_buckets: the run's LSH bucket count (shared by every LSH layer).
        capacity: positions to preallocate in the caches that grow (None: the prompt's length).
        keep_cache: False for the recompute-everything reference (``prefill`` returns no cache).
        hf_hashed, hf_padded: ``(batch,)`` bool in HF-compatible mode (None otherwise): whether HF
            hashes each prompt, and whether it pads it (see :class:`~reformer.attention.lsh_cache.LSHCache`).
    """

    lengths: torch.Tensor
    attention_mask: torch.Tensor | None
    n_buckets: int | tuple[int, ...] | None = None
    capacity: int | None = None
    keep_cache: bool = True
    hf_hashed: torch.Tensor | None = None
    hf_padded: torch.Tensor | None = None

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, length: int, **settings) -> Prompt:
        """The prompt batch of ``lengths`` ``(batch,)`` in rows of ``length`` positions."""
        mask = torch.arange(length, device=lengths.device) < lengths[:, None]
        return cls(lengths, None if bool(mask.all()) else mask, **settings)
