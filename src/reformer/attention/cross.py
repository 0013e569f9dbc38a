"""Exact cross-attention (decoder queries over encoder keys): the memory-lean functional core and the module.

The scores are computed block by block, (query block) x (key block), with an online softmax (the
log-sum-exp of every query is carried across key blocks), and the backward pass recomputes each block
from the saved log-sum-exp, as FlashAttention does: memory is O(L_dec + L_enc) besides one block of
scores, however long the source. The module projects the encoder output to keys and values once per
call (or takes them from a decoding cache) and the decoder states to queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import SelfAttentionBase
from .chunked import MASK_VALUE, _acc_dtype

# Scores held at once: batch x heads x query block x key block. 2**22 float32 values is 16 MiB.
CROSS_BLOCK_SCORES = 2**22
KEY_BLOCK = 1024
# A query whose keys are all padding has a log-sum-exp near MASK_VALUE: zero output, no gradient.
EMPTY_LSE = MASK_VALUE / 2


def _blocks(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _block_sizes(q: torch.Tensor, k: torch.Tensor, block_scores: int) -> tuple[int, int]:
    slices, lq, lk = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    key_block = min(lk, KEY_BLOCK)
    query_block = max(1, min(lq, block_scores // max(1, slices * key_block)))
    return query_block, key_block


def _block_scores(qs, k_blk, key_valid, k0, k1, acc_dtype) -> torch.Tensor:
    """Scaled scores ``(batch, heads, n_q, n_k)`` with padding keys at ``MASK_VALUE``."""
    scores = torch.matmul(qs, k_blk.transpose(-1, -2)).to(acc_dtype)
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, None, k0:k1], MASK_VALUE)
    return scores


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, block_scores):
        acc_dtype = _acc_dtype(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        batch, heads, lq, _ = q.shape
        out = torch.empty(batch, heads, lq, v.shape[-1], dtype=v.dtype, device=q.device)
        lse = torch.empty(batch, heads, lq, dtype=acc_dtype, device=q.device)
        query_block, key_block = _block_sizes(q, k, block_scores)
        for q0, q1 in _blocks(lq, query_block):
            qs = q[:, :, q0:q1] * scale
            acc = torch.zeros(batch, heads, q1 - q0, v.shape[-1], dtype=acc_dtype, device=q.device)
            run_max = torch.full((batch, heads, q1 - q0), -math.inf, dtype=acc_dtype, device=q.device)
            run_sum = torch.zeros_like(run_max)
            for k0, k1 in _blocks(k.shape[2], key_block):
                scores = _block_scores(qs, k[:, :, k0:k1], key_valid, k0, k1, acc_dtype)
                new_max = torch.maximum(run_max, scores.amax(-1))
                rescale = (run_max - new_max).exp_()
                weights = scores.sub_(new_max[..., None]).exp_()
                acc.mul_(rescale[..., None]).add_(torch.matmul(weights.to(v.dtype), v[:, :, k0:k1]))
                run_sum.mul_(rescale).add_(weights.sum(-1))
                run_max = new_max
            block_lse = run_max + run_sum.log()
            empty = block_lse < EMPTY_LSE
            out[:, :, q0:q1] = (acc / run_sum[..., None]).masked_fill_(empty[..., None], 0.0)
            lse[:, :, q0:q1] = block_lse.masked_fill_(empty, math.inf)
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.block_scores = block_scores
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        acc_dtype = _acc_dtype(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        grad_out = grad_out.contiguous()
        delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        query_block, key_block = _block_sizes(q, k, ctx.block_scores)
        for q0, q1 in _blocks(q.shape[2], query_block):
            qs, g = q[:, :, q0:q1] * scale, grad_out[:, :, q0:q1]
            for k0, k1 in _blocks(k.shape[2], key_block):
                k_blk, v_blk = k[:, :, k0:k1], v[:, :, k0:k1]
                scores = _block_scores(qs, k_blk, key_valid, k0, k1, acc_dtype)
                probs = scores.sub_(lse[:, :, q0:q1, None]).exp_()
                dv[:, :, k0:k1] += torch.matmul(probs.transpose(-1, -2).to(g.dtype), g).to(acc_dtype)
                grad_probs = torch.matmul(g, v_blk.transpose(-1, -2)).to(acc_dtype)
                grad_scores = probs.mul_(grad_probs.sub_(delta[:, :, q0:q1, None])).to(q.dtype)
                dq[:, :, q0:q1] += torch.matmul(grad_scores, k_blk).to(acc_dtype) * scale
                dk[:, :, k0:k1] += torch.matmul(grad_scores.transpose(-1, -2), qs).to(acc_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def check_cross_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate cross-attention inputs; return ``key_mask`` as bool ``(batch, L_enc)`` (None: all real)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k and v must be (batch, heads, length, head_dim); "
            f"got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch and heads, "
            "q and k their head_dim, k and v their length"
        )
    if k.shape[2] == 0:
        raise ValueError("the encoder side (k, v) is empty; cross-attention needs at least one source token")
    if key_mask is None:
        return None
    if key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_mask has shape {tuple(key_mask.shape)}, "
            f"expected (batch, L_enc) = {(k.shape[0], k.shape[2])}"
        )
    if key_mask.is_floating_point():
        raise TypeError("key_mask must be bool or integer (1 = real token, 0 = padding), not float")
    key_mask = key_mask.to(device=k.device, dtype=torch.bool)
    return None if bool(key_mask.all()) else key_mask


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    block_scores: int = CROSS_BLOCK_SCORES,
) -> torch.Tensor:
    """Exact softmax attention of decoder queries over encoder keys, scale 1/sqrt(head_dim).

    Args:
        q: ``(batch, heads, L_dec, head_dim)`` queries.
        k: ``(batch, heads, L_enc, head_dim)`` keys; v: ``(batch, heads, L_enc, head_dim_v)`` values.
        key_mask: ``(batch, L_enc)`` bool/int, True/1 for real source tokens, False/0 for padding.
        block_scores: the most scores held at once (sets the query block; keys go 1,024 at a time).

    Returns:
        ``(batch, heads, L_dec, head_dim_v)`` in ``v``'s dtype; zeros (and no gradient) for a row
        whose source is all padding. Memory O(L_dec + L_enc) besides one block; the backward
        recomputes the scores block by block and is not differentiable again.
    """
    key_valid = check_cross_inputs(q, k, v, key_mask)
    return _CrossAttention.apply(q, k, v, key_valid, block_scores)


class CrossAttention(SelfAttentionBase):
    """Decoder-to-encoder attention with its projections.

    ``x`` ``(batch, L_dec, d_model)`` and ``memory`` ``(batch, L_enc, d_memory)`` (the encoder output)
    -> ``(batch, L_dec, d_model)``. :meth:`project_memory` gives the keys and values of a memory, which
    decoding computes once and passes back as ``memory_kv``.
    """

    def __init__(
        self, d_model: int, d_memory: int, n_heads: int, *, d_head: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(d_model, n_heads, d_head, dropout)
        self.to_q = self.projection()
        self.to_k = nn.Linear(d_memory, self.n_heads * self.d_head, bias=False)
        self.to_v = nn.Linear(d_memory, self.n_heads * self.d_head, bias=False)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(batch, heads, L_enc, head_dim)`` of ``memory`` ``(batch, L_enc, d_memory)``."""
        return self.split_heads(self.to_k(memory)), self.split_heads(self.to_v(memory))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None = None,
        *,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_hashes: int | None = None,
        replay: dict | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n_hashes``, ``replay`` and ``query_mask`` are accepted for the LSH kind's signature and ignored
        (every query attends on its own here; outputs at padding queries are unused)."""
        k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        q = self.split_heads(self.to_q(x))
        return self.output(cross_attention(q, k, v, key_mask=memory_mask))
