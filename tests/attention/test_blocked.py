"""The blocked-attention core (``reformer.attention.blocked``) on plans written here: random query/key
rows visited in several rounds, random hidden entries, duplicated keys, a query with nothing visible and
one that no block visits; against one softmax per query over every (key, visit) it sees, written from the
definition in float64, and gradcheck with and without dropout."""

import math
from dataclasses import dataclass

import pytest
import torch

from reformer.attention.blocked import HIDDEN, blocked_attention


@dataclass
class ListPlan:
    """Blocks as explicit lists: query rows ``(n, cq)``, key rows ``(n, ck)``, hidden ``(n, cq, ck)``."""

    q_rows: list[torch.Tensor]
    k_rows: list[torch.Tensor]
    hidden: list[torch.Tensor]
    first: list[bool]

    def blocks(self):
        return [(i, first) for i, first in enumerate(self.first)]

    def block_rows(self, i):
        return self.q_rows[i], self.k_rows[i]

    def mask_scores(self, scores, i, q_rows, k_rows):
        return scores.masked_fill_(self.hidden[i], HIDDEN)


def random_plan(rows_q=12, rows_k=10, rounds=3, cq=2, ck=5, seed=0, unvisited=2):
    """Each round visits the first ``rows_q - unvisited`` query rows once, in a random order, ``cq`` per
    chunk, and gives each chunk ``ck`` random key rows (repeats allowed). Query row 0 sees nothing."""
    g = torch.Generator().manual_seed(seed)
    visited = rows_q - unvisited
    q_rows, k_rows, hidden, first = [], [], [], []
    for r in range(rounds):
        order = torch.randperm(visited, generator=g).view(-1, cq)
        for block in order.split(2):  # two chunks per block
            n = block.shape[0]
            q_rows.append(block)
            k_rows.append(torch.randint(0, rows_k, (n, ck), generator=g))
            h = torch.rand(n, cq, ck, generator=g) < 0.3
            h[block == 0] = True
            hidden.append(h)
            first.append(r == 0)
    return ListPlan(q_rows, k_rows, hidden, first)


def oracle(q, k, v, plan: ListPlan, scale):
    """One softmax per query over every visible (key, visit) entry of every block; zeros without any."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=q.dtype)
    seen: dict[int, list[int]] = {}
    for q_rows, k_rows, hidden in zip(plan.q_rows, plan.k_rows, plan.hidden, strict=True):
        for n in range(q_rows.shape[0]):
            for i in range(q_rows.shape[1]):
                keys = [int(key) for key, h in zip(k_rows[n], hidden[n, i], strict=True) if not h]
                seen.setdefault(int(q_rows[n, i]), []).extend(keys)
    for row, keys in seen.items():
        if keys:
            weights = torch.softmax(torch.stack([scale * q[row] @ k[key] for key in keys]), 0)
            out[row] = sum(w * v[key] for w, key in zip(weights, keys, strict=True))
    return out


def _inputs(rows_q=12, rows_k=10, dim=4, dim_v=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, d: (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).requires_grad_()  # noqa: E731
    return make(rows_q, dim), make(rows_k, dim), make(rows_k, dim_v)


@pytest.mark.parametrize("scale", [1.0, 1 / math.sqrt(4)])
@pytest.mark.parametrize("rounds", [1, 3])
def test_equals_one_softmax_over_all_visits_with_gradients(scale, rounds):
    plan = random_plan(rounds=rounds)
    ours = _inputs()
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out = blocked_attention(*ours, plan, scale=scale)
    expected = oracle(*ref, plan, scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0], torch.zeros(3, dtype=torch.float64))  # nothing visible
    assert torch.equal(out[-1], torch.zeros(3, dtype=torch.float64))  # never visited
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(ours[0].grad[0], torch.zeros(4, dtype=torch.float64))


def test_gradcheck_float64():
    plan = random_plan(rows_q=8, rows_k=6, rounds=2, ck=3)
    q, k, v = _inputs(8, 6)
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v, plan, scale=0.7), (q, k, v))


def test_gradcheck_with_replayed_dropout():
    plan = random_plan(rows_q=8, rows_k=6, rounds=2, ck=3)
    q, k, v = _inputs(8, 6)

    def fn(q, k, v):
        return blocked_attention(q, k, v, plan, scale=0.7, dropout_p=0.3, seed=5)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    dropped = fn(q, k, v)
    assert not torch.allclose(dropped, blocked_attention(q, k, v, plan, scale=0.7))
    torch.testing.assert_close(dropped, fn(q, k, v), rtol=0, atol=0)


def test_float32_close_to_float64_and_dropout_needs_a_seed():
    plan = random_plan()
    q, k, v = _inputs()
    expected = blocked_attention(q, k, v, plan, scale=0.5)
    low = blocked_attention(q.float(), k.float(), v.float(), plan, scale=0.5)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seed"):
        blocked_attention(q, k, v, plan, dropout_p=0.1)
