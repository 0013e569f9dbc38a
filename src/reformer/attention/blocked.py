"""Blocked attention: queries attend to gathered key blocks with an online log-sum-exp, and the backward
pass recomputes the scores block by block (as FlashAttention does), so memory stays O(rows) besides one
block of scores.

One autograd function serves every blocked kind; a *plan* says which rows meet. Its :meth:`~BlockPlan.blocks`
list the blocks in processing order, each with a flag saying whether it is the first block that visits
its query rows; :meth:`~BlockPlan.block_rows` gives a block's query rows ``(n, cq)`` and key rows
``(n, ck)`` (indices into the flat ``(rows, dim)`` inputs, distinct query rows within a block); and
:meth:`~BlockPlan.mask_scores` hides the keys a query must not see by filling their scores with
:data:`HIDDEN` in place. The plans: chunked LSH and local self-attention (``chunked.ChunkPlan``), LSH
cross-attention (``lsh_cross.CrossPlan``) and exact cross-attention (``cross.TiledPlan``).

A query row visited by several blocks (hash rounds, key tiles) gets one softmax over all the keys it sees
in all of them (a key seen twice counts twice): each block's softmax is folded into the running output
by its log-sum-exp. Scores are kept in float32 (float64 for float64 inputs) and in base 2 (scaled by
``log2(e)``): ``exp2`` is fast everywhere, while ``exp`` slows down ~10x on CPU for arguments below -87,
which hidden entries always are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable

# The trax/HF mask constant (docs/architecture.md, "The math", step 7), in natural-log units of the scores.
MASK_VALUE = -1e9
LOG2E = 1.4426950408889634
# The score a plan gives a hidden key, in the core's base-2 units.
HIDDEN = MASK_VALUE * LOG2E
# A query whose every key is hidden has a log-sum-exp near HIDDEN (real scores never come within orders
# of magnitude of it): such a query gets a zero output and passes no gradient.
EMPTY_LSE = HIDDEN / 2


class BlockPlan(Protocol):
    """Which query rows attend to which key rows, block by block (see the module docstring)."""

    def blocks(self) -> list[tuple[Any, bool]]:
        """``(block, first)`` in processing order; ``first``: no earlier block visits its query rows."""
        ...

    def block_rows(self, block: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows ``(n, cq)`` and key rows ``(n, ck)`` int64 of ``block``."""
        ...

    def mask_scores(
        self, scores: torch.Tensor, block: Any, q_rows: torch.Tensor, k_rows: torch.Tensor
    ) -> torch.Tensor:
        """``scores`` ``(n, cq, ck)`` (base 2) with hidden keys set to :data:`HIDDEN`, in place."""
        ...


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics and accumulators: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for 2-D ``rows`` ``(n, m)``: ``(n, m, ...)``, through the faster index_select."""
    return x.index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[1:])


def _dropout_mask(shape, p: float, generator: torch.Generator, device, dtype) -> torch.Tensor:
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype).div_(1.0 - p)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _scores(q, k, plan: BlockPlan, block, q_rows, k_rows):
    """Masked base-2 scores ``(n, cq, ck)`` of ``block`` with its gathered queries and keys."""
    q_blk, k_blk = take(q, q_rows), take(k, k_rows)
    scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)).to(acc_dtype(q)).mul_(LOG2E)
    return plan.mask_scores(scores, block, q_rows, k_rows), q_blk, k_blk


def merge_block(acc, run_max, run_sum, rows, out, lse, first: bool) -> None:
    """Fold one block's attention into the running results (online log-sum-exp; docs/architecture.md,
    "The math", step 9).

    ``out`` ``(n, dim)`` is the block's normalised output for the query ``rows`` ``(n,)`` (distinct) and
    ``lse`` ``(n,)`` its base-2 log-sum-exp. ``acc`` ``(rows, dim)``, ``run_max`` and ``run_sum``
    ``(rows,)`` are updated in place: the output so far, the largest LSE and the sum of
    ``2**(lse - run_max)``. A first visit just writes.
    """
    if first:
        acc.index_copy_(0, rows, out)
        run_max.index_copy_(0, rows, lse)
        run_sum.index_fill_(0, rows, 1.0)
        return
    old_max = run_max[rows]
    new_max = torch.maximum(old_max, lse)
    old_scale, new_scale = (old_max - new_max).exp2_(), (lse - new_max).exp2_()
    acc.index_copy_(0, rows, acc[rows] * old_scale[:, None] + out * new_scale[:, None])
    run_sum.index_copy_(0, rows, run_sum[rows] * old_scale + new_scale)
    run_max.index_copy_(0, rows, new_max)


def _forward_block(q, k, v, plan: BlockPlan, block, keep: torch.Tensor | None):
    """One block's query rows ``(n * cq,)``, normalised output ``(n * cq, dim_v)`` (accumulator dtype)
    and base-2 log-sum-exp ``(n * cq,)``; ``keep``: the scaled dropout mask ``(n, cq, ck)`` or None."""
    q_rows, k_rows = plan.block_rows(block)
    scores, _, _ = _scores(q, k, plan, block, q_rows, k_rows)
    # Softmax with a single exp pass; the 1/sum is applied to the (smaller) output.
    row_max = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(row_max).exp2_()
    row_sum = weights.sum(dim=-1)
    if keep is not None:
        weights.mul_(keep)
    out = torch.matmul(weights.to(v.dtype), take(v, k_rows)).to(scores.dtype)
    out = out.div_(row_sum[..., None]).flatten(0, 1)
    lse = (row_max.squeeze(-1) + row_sum.log2()).reshape(-1)
    return q_rows.reshape(-1), out, lse


def _backward_block(grad_out, q, k, v, total_lse, delta, plan: BlockPlan, block, keep):
    """One block's contributions: query rows ``(n * cq,)`` with their ``dq``, key rows ``(n * ck,)`` with
    their ``dk`` and ``dv`` (accumulator dtype)."""
    dtype = acc_dtype(q)
    q_rows, k_rows = plan.block_rows(block)
    scores, q_blk, k_blk = _scores(q, k, plan, block, q_rows, k_rows)
    v_blk, g_blk = take(v, k_rows), take(grad_out, q_rows)
    # One softmax over all blocks: P = 2**(s - LSE_total).
    probs = scores.sub_(take(total_lse, q_rows)[..., None]).exp2_()
    grad_probs = torch.matmul(g_blk, v_blk.transpose(-1, -2)).to(dtype)
    if keep is not None:
        dv_blk = torch.matmul((probs * keep).transpose(-1, -2).to(g_blk.dtype), g_blk)
        grad_probs.mul_(keep)
    else:
        dv_blk = torch.matmul(probs.transpose(-1, -2).to(g_blk.dtype), g_blk)
    grad_scores = probs.mul_(grad_probs.sub_(take(delta, q_rows)[..., None])).to(q.dtype)
    dq_blk = torch.matmul(grad_scores, k_blk).to(dtype).flatten(0, 1)
    dk_blk = torch.matmul(grad_scores.transpose(-1, -2), q_blk).to(dtype).flatten(0, 1)
    return q_rows.reshape(-1), dq_blk, k_rows.reshape(-1), dk_blk, dv_blk.to(dtype).flatten(0, 1)


def _keep_mask(plan: BlockPlan, block, dropout_p: float, generator, q) -> torch.Tensor | None:
    if dropout_p == 0.0:
        return None
    q_rows, k_rows = plan.block_rows(block)
    shape = (*q_rows.shape, k_rows.shape[1])
    return _dropout_mask(shape, dropout_p, generator, q.device, acc_dtype(q))


@functools.cache
def _compiled_bodies():
    return torch.compile(_forward_block), torch.compile(_backward_block)


def _bodies(compiled: bool, dropout_p: float):
    """The per-block functions, through torch.compile when ``compiled`` (compilation then sees one block,
    never the loop over blocks) unless there is dropout, whose masks come from a private generator."""
    return _compiled_bodies() if compiled and dropout_p == 0.0 else (_forward_block, _backward_block)


def attention_forward(q, k, v, plan: BlockPlan, dropout_p: float, seed: int | None, compiled: bool = False):
    """The output ``(rows_q, dim_v)`` in ``v``'s dtype and the base-2 log-sum-exp ``(rows_q,)``
    (infinite for queries with no visible key, whose output is zero) of queries ``q`` already scaled;
    ``compiled``: run each block through torch.compile'd code."""
    rows, dtype = q.shape[0], acc_dtype(q)
    acc = torch.zeros(rows, v.shape[1], dtype=dtype, device=q.device)
    run_max = torch.full((rows,), float("-inf"), dtype=dtype, device=q.device)
    run_sum = torch.zeros(rows, dtype=dtype, device=q.device)
    generator = _generator(seed, q.device)
    forward_block, _ = _bodies(compiled, dropout_p)
    for block, first in plan.blocks():
        keep = _keep_mask(plan, block, dropout_p, generator, q)
        block_rows, out, lse = forward_block(q, k, v, plan, block, keep)
        merge_block(acc, run_max, run_sum, block_rows, out, lse, first)
    total_lse = run_max + run_sum.log2()
    empty = total_lse < EMPTY_LSE
    out = acc.div_(run_sum[:, None]).masked_fill_(empty[:, None], 0.0).to(v.dtype)
    return out, total_lse.masked_fill_(empty, float("inf"))


def attention_backward(
    grad_out, q, k, v, out, total_lse, plan, dropout_p, seed, dq_scale=1.0, compiled=False
):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward`, the scores recomputed block by block,
    ``dq`` times ``dq_scale`` (the gradient of the unscaled queries).

    Hidden entries need no second masking: their probability is exactly zero (``2**(HIDDEN - lse)``),
    except where a query sees only hidden keys, and there ``dP - D = g.v - g.v`` is zero.
    """
    grad_out, dtype = grad_out.contiguous(), acc_dtype(q)
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1)
    dq, dk, dv = (torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (q, k, v))
    generator = _generator(seed, q.device)
    _, backward_block = _bodies(compiled, dropout_p)
    for block, _ in plan.blocks():
        keep = _keep_mask(plan, block, dropout_p, generator, q)
        q_rows, dq_blk, k_rows, dk_blk, dv_blk = backward_block(
            grad_out, q, k, v, total_lse, delta, plan, block, keep
        )
        dq.index_add_(0, q_rows, dq_blk)
        dk.index_add_(0, k_rows, dk_blk)
        dv.index_add_(0, k_rows, dv_blk)
    dq = dq if dq_scale == 1.0 else dq.mul_(dq_scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Under torch.compile the core is one opaque custom op, its plan flattened into tensors and integers:
# Dynamo would otherwise unroll the loop over blocks into the graph, whose size (and compile time) would
# grow with the length. The op runs each block through torch.compile'd code instead.
_PLANS: dict[str, type] = {}
PLAN_TENSORS = 5  # tensor fields a registered plan may have (the op's fixed slots)


def register_plan(cls: type) -> type:
    """Class decorator for a dataclass plan whose fields are tensors (or None; at most
    :data:`PLAN_TENSORS`), ints, bools and a device, so that compiled models can hand it to the core's
    custom op."""
    tensors = [field for field in dataclasses.fields(cls) if "Tensor" in field.type]
    if len(tensors) > PLAN_TENSORS:
        raise TypeError(f"{cls.__name__} has {len(tensors)} tensor fields; a plan may have {PLAN_TENSORS}")
    _PLANS[cls.__name__] = cls
    return cls


def _flatten(plan) -> tuple:
    """``(kind, tensor 1, ..., tensor PLAN_TENSORS, ints)``: the op's plan arguments."""
    name = type(plan).__name__
    if _PLANS.get(name) is not type(plan):
        raise TypeError(f"{name} is not a registered plan (reformer.attention.blocked.register_plan)")
    tensors, ints = [], []
    for field in dataclasses.fields(plan):
        if "Tensor" in field.type:
            tensors.append(getattr(plan, field.name))
        elif field.type != "torch.device":
            ints.append(int(getattr(plan, field.name)))
    return name, *tensors, *[None] * (PLAN_TENSORS - len(tensors)), ints


def _unflatten(name: str, tensors: tuple, ints: list[int], device: torch.device):
    cls, values = _PLANS[name], {}
    tensors, ints = list(tensors), list(ints)
    for field in dataclasses.fields(cls):
        if "Tensor" in field.type:
            values[field.name] = tensors.pop(0)
        elif field.type == "torch.device":
            values[field.name] = device
        else:
            values[field.name] = bool(ints.pop(0)) if field.type == "bool" else ints.pop(0)
    return cls(**values)


@torch.library.custom_op("reformer::blocked_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_kind: str, p0: torch.Tensor | None,
    p1: torch.Tensor | None, p2: torch.Tensor | None, p3: torch.Tensor | None, p4: torch.Tensor | None,
    plan_ints: list[int], scale: float, dropout_p: float, seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    plan = _unflatten(plan_kind, (p0, p1, p2, p3, p4), plan_ints, q.device)
    q = q if scale == 1.0 else q * scale
    return attention_forward(q, k, v, plan, dropout_p, seed, compiled=True)


@_attention_op.register_fake
def _attention_fake(q, k, v, *args):
    return q.new_empty(q.shape[0], v.shape[1], dtype=v.dtype), q.new_empty(q.shape[0], dtype=acc_dtype(q))


@torch.library.custom_op("reformer::blocked_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    total_lse: torch.Tensor, plan_kind: str, p0: torch.Tensor | None, p1: torch.Tensor | None,
    p2: torch.Tensor | None, p3: torch.Tensor | None, p4: torch.Tensor | None, plan_ints: list[int],
    scale: float, dropout_p: float, seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    plan = _unflatten(plan_kind, (p0, p1, p2, p3, p4), plan_ints, q.device)
    q = q if scale == 1.0 else q * scale
    return attention_backward(
        grad_out, q, k, v, out, total_lse, plan, dropout_p, seed, dq_scale=scale, compiled=True
    )


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    q, k, v, plan_kind, *plan_tensors, plan_ints, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, *output, *(t for t in plan_tensors if t is not None))
    ctx.missing = [t is None for t in plan_tensors]
    ctx.settings = (plan_kind, plan_ints, scale, dropout_p, seed)


def _op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, total_lse, *present = ctx.saved_tensors
    present = iter(present)
    plan_tensors = [None if missing else next(present) for missing in ctx.missing]
    plan_kind, plan_ints, scale, dropout_p, seed = ctx.settings
    dq, dk, dv = _attention_backward_op(
        grad_out, q, k, v, out, total_lse, plan_kind, *plan_tensors, plan_ints, scale, dropout_p, seed
    )
    return dq, dk, dv, *[None] * (1 + PLAN_TENSORS + 4)


_attention_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, scale: float, dropout_p: float, seed: int | None):
        # The scale is applied to the queries once, not to every block of scores.
        q = q if scale == 1.0 else q * scale
        out, total_lse = attention_forward(q, k, v, plan, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, total_lse)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed = plan, scale, dropout_p, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, total_lse = ctx.saved_tensors
        # d(scores)/d(k) is the scaled query (saved), d(scores)/d(q) the key times the scale.
        grads = attention_backward(
            grad_out, q, k, v, out, total_lse, ctx.plan, ctx.dropout_p, ctx.seed, dq_scale=ctx.scale
        )
        return (*grads, None, None, None, None)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Softmax attention of the query rows over the key rows ``plan`` gathers for them.

    Args:
        q: ``(rows_q, dim)`` queries; k: ``(rows_k, dim)`` keys; v: ``(rows_k, dim_v)`` values, their rows
            addressed by ``plan``.
        scale: multiplies ``q.k`` (keys already scaled: 1).
        dropout_p: attention-probability dropout; needs ``seed`` so the backward replays the masks.

    Returns:
        ``(rows_q, dim_v)`` in ``v``'s dtype; zeros for a query whose every key is hidden or that no block
        visits (and no gradient through it). The backward pass is not differentiable again.
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention dropout needs a seed so that the backward pass can replay its masks")
    if torch.compiler.is_compiling():
        out, _ = _attention_op(q, k, v, *_flatten(plan), scale, dropout_p, seed)
        return out
    return _BlockedAttention.apply(q, k, v, plan, scale, dropout_p, seed)
