"""LSH self-attention (Reformer paper, section 2): the functional core and the module."""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from ..config import default_key_rule, validate_key_rule, validate_n_buckets
from ..hashing import auto_n_buckets, draw_rotations
from .base import SelfAttentionBase
from .chunked import (
    ChunkPlan,
    chunk_neighbours,
    chunked_attention,
    draw_call_seed,
    flat_rows,
    unwrapped_slots,
)
from .decode import Prompt
from .lsh_cache import LSHCache, lsh_decode_step
from .lsh_sort import lsh_sort_indices, normalize_keys, sort_indices_by_own_length
from .masks import check_attention_inputs, pad_to_multiple
from .own_bucket_cache import OwnBucketCache, own_bucket_decode_step

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for ``backend`` on ``device``: ``"auto"`` takes the fused Triton kernels
    on CUDA when triton is installed (the ``[gpu]`` extra) and the PyTorch path elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        has_triton = importlib.util.find_spec("triton") is not None
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton":
        from .triton_lsh import require_triton

        require_triton()
    return backend


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    bucket_size: int = 64,
    n_hashes: int = 4,
    n_buckets: int | tuple[int, ...] | None = None,
    causal: bool = False,
    key_rule: str | None = None,
    attention_mask: torch.Tensor | None = None,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    rotations: torch.Tensor | None = None,
    hash_seed: int | None = None,
    sort_indices: torch.Tensor | None = None,
    return_sort_indices: bool = False,
    sorted_buckets: torch.Tensor | None = None,
    return_sorted_buckets: bool = False,
    backend: str = "torch",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Shared-QK LSH attention of every position over the chunks its hash buckets fall in.

    Positions are hashed ``n_hashes`` times, sorted by (bucket, position) in each round, and cut into
    chunks of ``bucket_size`` that attend to themselves and ``n_chunks_before`` / ``n_chunks_after``
    neighbours. A query never attends to its own key unless nothing else is allowed; with ``causal``
    no query sees a later position. The rounds are combined with their log-sum-exp weights.
    Sequences up to ``bucket_size`` long get exact shared-QK attention (one chunk, no hashing).

    ``key_rule`` says which keys a query sees in a round; None (default) is ``"own_bucket"`` when
    ``causal`` and ``"chunks"`` otherwise, as in :class:`~reformer.ReformerConfig`:

    * ``"chunks"`` (trax/HF): every key of its sorted chunk and the neighbour chunks. Causal or not, which
      keys those are depends on the buckets of later tokens: they sort in among earlier ones and shift
      every chunk boundary after them.
    * ``"own_bucket"`` (truly causal; needs ``causal=True`` and a fixed ``n_buckets``, e.g.
      ``auto_n_buckets(max_length, bucket_size)``: so a causal call without ``n_buckets`` must choose
      one or pass ``key_rule="chunks"``): the last
      ``W = n_chunks_before * bucket_size`` earlier keys of its own bucket (and its own key, under the
      self-mask rule), which lie in its chunk and the ``n_chunks_before`` before it. They depend only on
      positions up to the query's own, so outputs at positions < n do not change when tokens after n
      are added. Short sequences are hashed too (exact attention would not be a prefix of the rule).

    Args:
        qk: ``(batch, heads, length, head_dim)`` shared queries/keys (keys are normalised here).
        v: ``(batch, heads, length, head_dim_v)`` values.
        n_buckets: an even integer or even factors; None picks about two buckets per chunk of each
            row's own real length (without ``attention_mask``: of ``length``), so padding does not change
            a row's buckets: all rows are hashed in one pass with rotations as wide as the widest count
            a row of this padded length can have, column ``j`` drawn from its own seed (not
            :func:`~reformer.hashing.draw_rotations`' numbers; with a mask this hashing is PyTorch's on
            every backend). None is not allowed with ``key_rule="own_bucket"``, where a
            length-dependent count would break prefix consistency.
        attention_mask: ``(batch, length)``, nonzero/True for real tokens, zero/False for padding.
        dropout_p: dropout on the attention probabilities; ``dropout_seed`` makes it replayable.
        rotations: explicit hash rotations ``(heads, head_dim, n_hashes, sum(factors) // 2)``.
        hash_seed: draw the rotations from this seed (ignored when ``rotations`` is given); without
            either the seed is drawn once from the default generator.
        sort_indices: ``(batch, heads, n_hashes, padded_length)`` from an earlier call, to replay it.
        return_sort_indices: also return the sort indices used (None for the exact short path).
        sorted_buckets: ``(batch, heads, n_hashes, padded_length)`` the bucket of every sorted entry,
            from an earlier call with ``return_sorted_buckets``; ``own_bucket`` replays need it along
            with ``sort_indices``.
        return_sorted_buckets: also return the sorted buckets (after the sort indices, if asked).
        backend: ``"torch"`` (default), ``"triton"`` (fused kernels,
            :mod:`reformer.attention.triton_lsh`) or ``"auto"`` (Triton on CUDA when installed, PyTorch
            elsewhere).

    Returns:
        ``(batch, heads, length, head_dim_v)`` in ``v``'s dtype (and the sort indices and sorted
        buckets if asked).
    """
    backend = resolve_backend(backend, qk.device)
    key_valid = check_attention_inputs(qk, v, attention_mask, "qk")
    if n_hashes < 1:
        raise ValueError(f"n_hashes={n_hashes} must be at least 1")
    validate_n_buckets(n_buckets)
    key_rule = default_key_rule(causal) if key_rule is None else key_rule
    validate_key_rule(key_rule, causal, n_buckets)
    own_bucket = key_rule == "own_bucket"
    if backend == "triton":
        from . import triton_lsh

        triton_lsh.check_device(qk)
        # The kernels draw no dropout masks and have no float64 path: those calls stay on PyTorch.
        if dropout_p > 0.0 or torch.float64 in (qk.dtype, v.dtype):
            backend = "torch"
    batch, heads, length, head_dim = qk.shape
    keys = normalize_keys(qk)
    user_valid = key_valid

    if length <= bucket_size and not own_bucket:  # one chunk holds everything: exact, as trax and HF do
        plan = _single_chunk_plan(batch, heads, length, key_valid, causal, self_mask=True, device=qk.device)
        out = chunked_attention(flat_rows(qk), flat_rows(keys), flat_rows(v), plan, dropout_p, dropout_seed)
        out = out.view(batch, heads, length, v.shape[-1])
        return _with_extras(out, None, None, return_sort_indices, return_sorted_buckets)

    padded = -(-length // bucket_size) * bucket_size
    chunks = padded // bucket_size
    qk_p, keys_p, v_p, key_valid = pad_to_multiple(padded, qk, keys, v, key_valid=key_valid)
    if sort_indices is None:
        if rotations is None and hash_seed is None:
            hash_seed = draw_call_seed()  # one draw per call, whatever the rows' bucket counts
        fused = backend == "triton"
        want_buckets = own_bucket or return_sorted_buckets
        if n_buckets is None and rotations is None:
            sort_indices, sorted_buckets = sort_indices_by_own_length(
                qk_p, key_valid, user_valid, bucket_size, n_hashes, hash_seed, fused, want_buckets
            )
        else:
            n_buckets = n_buckets if n_buckets is not None else auto_n_buckets(padded, bucket_size)
            sorted_ = lsh_sort_indices(
                qk_p, n_buckets=n_buckets, key_padding_mask=key_valid, rotations=rotations, seed=hash_seed,
                n_hashes=n_hashes, fused=fused, return_buckets=want_buckets,
            )  # fmt: skip
            sort_indices, sorted_buckets = sorted_ if isinstance(sorted_, tuple) else (sorted_, None)
    else:
        expected = (batch, heads, n_hashes, padded)
        if sort_indices.shape != expected:
            raise ValueError(
                f"sort_indices has shape {tuple(sort_indices.shape)}, expected "
                f"{expected} for this input and n_hashes={n_hashes}"
            )
        if own_bucket and (sorted_buckets is None or sorted_buckets.shape != expected):
            got = None if sorted_buckets is None else tuple(sorted_buckets.shape)
            raise ValueError(
                f"key_rule='own_bucket' replays need sorted_buckets of shape {expected} with "
                f"sort_indices (got {got}); pass return_sorted_buckets=True to the call that made them"
            )

    real_chunks = None
    if key_valid is not None:
        real_chunks = (key_valid.sum(-1) + bucket_size - 1) // bucket_size
    window = (n_chunks_before, n_chunks_after)
    if backend == "triton":
        if qk.dtype != v.dtype:
            raise TypeError(f"backend='triton' needs qk and v of one dtype, got {qk.dtype} and {v.dtype}")
        out = triton_lsh.fused_lsh_core(
            qk_p, keys_p, v_p, sort_indices, real_chunks, key_valid, bucket_size=bucket_size, causal=causal,
            window=window, sorted_buckets=sorted_buckets if own_bucket else None,
        )  # fmt: skip
    else:
        slices = batch * heads
        offsets = torch.arange(slices, device=qk.device).view(batch, heads, 1, 1) * padded
        chunk_rows = (sort_indices + offsets).view(slices * n_hashes * chunks, bucket_size)
        neighbours = chunk_neighbours(real_chunks, batch, n_hashes, chunks, *window, qk.device)
        plan = ChunkPlan.shared_by_heads(chunk_rows, neighbours, key_valid, heads, n_hashes, causal, True)
        if own_bucket:
            slot_ok = unwrapped_slots(neighbours, chunks, n_chunks_before)
            plan = dataclasses.replace(
                plan,
                bucket_ids=sorted_buckets.reshape(-1, bucket_size).to(torch.int32),
                slot_ok=slot_ok[:, None].expand(batch, heads, -1, -1).reshape(-1, slot_ok.shape[-1]),
                bucket_window=n_chunks_before * bucket_size,
                before=n_chunks_before,
            )
        out = chunked_attention(
            flat_rows(qk_p), flat_rows(keys_p), flat_rows(v_p), plan, dropout_p, dropout_seed
        ).view(batch, heads, padded, v.shape[-1])
    out = out[:, :, :length]
    return _with_extras(out, sort_indices, sorted_buckets, return_sort_indices, return_sorted_buckets)


def _with_extras(out, sort_indices, sorted_buckets, return_sort_indices, return_sorted_buckets):
    extras = (sort_indices,) * return_sort_indices + (sorted_buckets,) * return_sorted_buckets
    return (out, *extras) if extras else out


def _single_chunk_plan(batch, heads, length, key_valid, causal, self_mask, device) -> ChunkPlan:
    chunk_rows = torch.arange(batch * heads * length, device=device).view(batch * heads, length)
    neighbours = torch.zeros(batch, 1, 1, dtype=torch.long, device=device)
    return ChunkPlan.shared_by_heads(chunk_rows, neighbours, key_valid, heads, 1, causal, self_mask)


class LSHSelfAttention(SelfAttentionBase):
    """LSH self-attention with its projections: shared query/key, value, and output.

    Rotations: with ``hash_seed`` set they are fixed for every call (HF's meaning of the setting);
    otherwise fresh ones are drawn on every training call and ``eval_hash_seed`` makes eval
    deterministic.

    ``backend``: ``"torch"`` (default), ``"triton"`` or ``"auto"`` (fused Triton kernels on CUDA when
    triton is installed, PyTorch elsewhere); see :func:`lsh_attention`. The default stays ``"torch"``
    until the fused kernels have been checked on a GPU (they are tested on CPU with Triton's interpreter).

    ``key_rule``: ``"own_bucket"`` (truly causal: a query sees the last ``n_chunks_before * bucket_size``
    earlier keys of its own bucket; needs ``causal``) or ``"chunks"`` (trax/HF); None (default) picks
    ``"own_bucket"`` when ``causal`` and ``"chunks"`` otherwise, as :class:`~reformer.ReformerConfig`
    does. Under ``"own_bucket"`` the bucket count must not depend on the input's length, so
    ``n_buckets=None`` means about two buckets per chunk of ``max_seq_len`` (the model's rule); see
    :func:`lsh_attention`.

    Shapes: ``x`` ``(batch, length, d_model)`` -> ``(batch, length, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        d_head: int | None = None,
        bucket_size: int = 64,
        n_hashes: int = 4,
        n_buckets: int | tuple[int, ...] | None = None,
        causal: bool = False,
        key_rule: str | None = None,
        max_seq_len: int = 65536,
        n_chunks_before: int = 1,
        n_chunks_after: int = 0,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        hash_seed: int | None = None,
        eval_hash_seed: int = 0,
        backend: str = "torch",
    ) -> None:
        super().__init__(d_model, n_heads, d_head, dropout)
        validate_n_buckets(n_buckets)
        key_rule = default_key_rule(causal) if key_rule is None else key_rule
        if key_rule == "own_bucket" and n_buckets is None:  # fixed: a prefix must not change it
            n_buckets = auto_n_buckets(max_seq_len, bucket_size)
        validate_key_rule(key_rule, causal, n_buckets)
        resolve_backend(backend, torch.device("cpu"))  # fail early on a bad name or a missing triton
        self.backend = backend
        self.bucket_size, self.n_hashes, self.n_buckets = bucket_size, n_hashes, n_buckets
        self.causal, self.key_rule = causal, key_rule
        self.n_chunks_before, self.n_chunks_after = n_chunks_before, n_chunks_after
        self.attn_dropout, self.hash_seed, self.eval_hash_seed = attn_dropout, hash_seed, eval_hash_seed
        self.to_qk, self.to_v = self.projection(), self.projection()

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        n_hashes: int | None = None,
        replay: dict | None = None,
    ) -> torch.Tensor:
        """``x``: ``(batch, length, d_model)``; ``attention_mask``: ``(batch, length)``, 1 = real token.

        ``n_hashes`` overrides the number of rounds for this call. ``replay`` is a dict that records the
        sort indices on its first use and replays them afterwards: the reversible stack uses it so that
        the recomputation sees exactly the buckets of the forward pass, even where the reconstructed
        input differs from the original in the last bits.
        """
        qk, v = self.split_heads(self.to_qk(x)), self.split_heads(self.to_v(x))
        n_hashes = n_hashes or self.n_hashes
        dropout_p = self.attn_dropout if self.training else 0.0
        # One draw from the default generator per training call seeds both the rotations and the
        # dropout masks, so a recomputation from a restored RNG state replays both.
        call_seed = draw_call_seed() if self.training and (self.hash_seed is None or dropout_p > 0) else None
        hash_seed = self.hash_seed
        if hash_seed is None:
            hash_seed = call_seed if self.training else self.eval_hash_seed
        replay = {} if replay is None else replay
        own_bucket = self.key_rule == "own_bucket"
        with self.head_context():  # sequence parallel: this rank's heads' rotations
            out, sort_indices, *sorted_buckets = lsh_attention(
                qk, v,
                bucket_size=self.bucket_size, n_hashes=n_hashes, n_buckets=self.n_buckets, causal=self.causal,
                key_rule=self.key_rule, attention_mask=attention_mask, n_chunks_before=self.n_chunks_before,
                n_chunks_after=self.n_chunks_after, dropout_p=dropout_p,
                dropout_seed=None if call_seed is None else call_seed + 1,
                hash_seed=hash_seed, sort_indices=replay.get("sort_indices"), return_sort_indices=True,
                sorted_buckets=replay.get("sorted_buckets"), return_sorted_buckets=own_bucket,
                backend=self.backend,
            )  # fmt: skip
        replay["sort_indices"] = sort_indices
        if own_bucket:
            replay["sorted_buckets"] = sorted_buckets[0].to(torch.int32)  # kept per layer until backward
        return self.output(out)

    @property
    def fixed_n_buckets(self) -> int | tuple[int, ...] | None:
        """The bucket count decoding must use: the layer's own under ``own_bucket``, else None (free)."""
        return self.n_buckets if self.key_rule == "own_bucket" else None

    def decode_state(self, n_buckets: int | tuple[int, ...], n_hashes: int | None) -> torch.Tensor:
        """The run's rotations ``(heads, head_dim, rounds, sum(factors) // 2)``, from the layer's fixed or
        eval seed (``n_hashes`` rounds, default the layer's)."""
        seed = self.hash_seed if self.hash_seed is not None else self.eval_hash_seed
        device = self.to_qk.weight.device
        rounds = n_hashes or self.n_hashes
        return draw_rotations(self.n_heads, self.d_head, rounds, n_buckets, seed=seed, device=device)

    def prefill(
        self, x: torch.Tensor, prompt: Prompt, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LSHCache | OwnBucketCache | None]:
        """Causal eval forward over ``x`` ``(batch, length, d_model)`` with the run's bucket count
        (``prompt.n_buckets``; under ``own_bucket`` the layer's) and rotations ``state`` (default
        :meth:`decode_state`), and the cache of the key rule (see :mod:`reformer.attention.decode`)."""
        qk, v = self.split_heads(self.to_qk(x)), self.split_heads(self.to_v(x))
        own_bucket = self.key_rule == "own_bucket"
        n_buckets = self.n_buckets if own_bucket else prompt.n_buckets
        if n_buckets is None:
            raise ValueError("prefill of an LSH layer under key_rule='chunks' needs prompt.n_buckets")
        rotations = self.decode_state(n_buckets, None) if state is None else state
        out = lsh_attention(
            qk, v, bucket_size=self.bucket_size, n_hashes=rotations.shape[2], n_buckets=n_buckets,
            causal=True, attention_mask=prompt.attention_mask, n_chunks_before=self.n_chunks_before,
            n_chunks_after=self.n_chunks_after, rotations=rotations, key_rule=self.key_rule,
        )  # fmt: skip
        cache = None
        if prompt.keep_cache and own_bucket:
            window = self.n_chunks_before * self.bucket_size
            cache = OwnBucketCache.from_prefix(
                qk, v, prompt.lengths, rotations, n_buckets, window, prompt.capacity
            )
        elif prompt.keep_cache:
            cache = LSHCache.from_prefix(
                qk, v, prompt.lengths, rotations, n_buckets, self.bucket_size, self.n_chunks_before,
                self.n_chunks_after, prompt.capacity, prompt.hf_hashed, prompt.hf_padded,
            )  # fmt: skip
        return self.output(out), cache

    def step(
        self, cache: LSHCache | OwnBucketCache, x_t: torch.Tensor, lengths: torch.Tensor, max_length: int
    ) -> tuple[torch.Tensor, LSHCache | OwnBucketCache]:
        """``x_t`` ``(batch, 1, d_model)`` at position ``lengths[b]`` of row ``b``: its causal LSH attention
        ``(batch, 1, d_model)`` over the keys the key rule gives it; the cache keeps it."""
        qk, v = self.split_heads(self.to_qk(x_t)), self.split_heads(self.to_v(x_t))
        attend = own_bucket_decode_step if self.key_rule == "own_bucket" else lsh_decode_step
        return self.output(attend(cache, qk, v, lengths, max_length)), cache
