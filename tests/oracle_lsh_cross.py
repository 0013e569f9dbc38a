"""Brute-force LSH cross-attention, written from the rule in ``reformer.attention.lsh_cross``'s docstring
with plain Python loops; it shares no code with ``src/``.

For every (row, head, round): bucket every vector (argmax of ``[xR, -xR]`` per factor), sort queries and
keys by (bucket, position) with padding last, cut the sorted queries into chunks, find the keys of the
buckets a chunk spans by counting, centre a window of ``window`` sorted keys on them inside the real
keys, and give every real query of the chunk those keys. A query's output is one softmax over all the
(round, key) pairs it was given, duplicates included.
"""

from __future__ import annotations

import math

import torch


def bucket_of(x: torch.Tensor, rotation: torch.Tensor, factors: tuple[int, ...]) -> int:
    """x: (dim,), rotation: (dim, sum(factors) // 2); hashed in float32 like the library."""
    rotated = x.float() @ rotation.float()
    bucket, stride, start = 0, 1, 0
    for f in factors:
        part = rotated[start : start + f // 2]
        both = torch.cat([part, -part]).tolist()
        best = max(range(f), key=lambda i: (both[i], -i))  # first index among ties
        bucket += stride * best
        stride *= f
        start += f // 2
    return bucket


def lsh_cross_oracle(q, k, v, rotations, n_buckets, chunk_size, window, query_mask=None, key_mask=None):
    """q: (B, H, Lq, d); k, v: (B, H, Lk, d); rotations: (H, d, rounds, sum(factors)//2).
    Returns (B, H, Lq, d_v), differentiable through q, k, v."""
    factors = tuple(n_buckets) if isinstance(n_buckets, (tuple, list)) else (n_buckets,)
    pad_bucket = math.prod(factors)
    batch, heads, lq, dim = q.shape
    lk = k.shape[2]
    rounds = rotations.shape[2]
    rows = []
    for b in range(batch):
        q_real = [query_mask is None or bool(query_mask[b, i]) for i in range(lq)]
        k_real = [key_mask is None or bool(key_mask[b, j]) for j in range(lk)]
        n_real = sum(k_real)
        padded = -(-lq // chunk_size) * chunk_size
        heads_out = []
        for h in range(heads):
            seen = [[] for _ in range(lq)]
            for r in range(rounds):
                rot = rotations[h, :, r]
                qb = [
                    bucket_of(q[b, h, i].detach(), rot, factors) if q_real[i] else pad_bucket
                    for i in range(lq)
                ]
                qb += [pad_bucket] * (padded - lq)
                kb = [
                    bucket_of(k[b, h, j].detach(), rot, factors) if k_real[j] else pad_bucket
                    for j in range(lk)
                ]
                q_sorted = sorted(range(padded), key=lambda i: (qb[i], i))
                k_sorted = sorted(range(lk), key=lambda j: (kb[j], j))
                for c in range(padded // chunk_size):
                    members = [
                        i for i in q_sorted[c * chunk_size : (c + 1) * chunk_size] if qb[i] < pad_bucket
                    ]
                    if not members:
                        continue
                    lo, hi = min(qb[i] for i in members), max(qb[i] for i in members)
                    start = sum(1 for j in range(lk) if kb[j] < lo)
                    end = sum(1 for j in range(lk) if kb[j] <= hi)
                    first = min(max((start + end - window) // 2, 0), max(n_real - window, 0))
                    keys = [k_sorted[p] for p in range(first, first + window) if p < n_real]
                    for i in members:
                        seen[i].extend(keys)
            outs = []
            for i in range(lq):
                if not seen[i] or not q_real[i]:
                    outs.append(torch.zeros(v.shape[-1], dtype=v.dtype))
                    continue
                idx = torch.tensor(seen[i])
                scores = k[b, h, idx] @ q[b, h, i] / math.sqrt(dim)
                outs.append(torch.softmax(scores, 0) @ v[b, h, idx])
            heads_out.append(torch.stack(outs))
        rows.append(torch.stack(heads_out))
    return torch.stack(rows)
