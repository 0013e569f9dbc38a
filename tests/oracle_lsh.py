"""A brute-force oracle for shared-QK LSH attention, written from its definition (docs/architecture.md,
"The math").

It shares no code with ``src/reformer``: the hashing, the key normalisation, the sort, the chunking
(with the cross-round wrap and the skip over all-padding chunks), the masks and the merge of the rounds
are all re-derived here with plain Python loops over float64 tensors. Only differentiable torch ops
touch ``qk`` and ``v``, so autograd through the oracle gives reference gradients.
"""

from __future__ import annotations

import math

import torch

PAD_AND_CAUSAL_MASK = -1e9
SELF_MASK = -1e5
KEY_NORM_EPS = 1e-6
# A hash whose best and second-best candidates are closer than this (relative) is ambiguous: the
# library hashes in float32, the oracle in float64, so such a row might legitimately go either way.
AMBIGUOUS_GAP = 1e-5


def _factors(n_buckets) -> list[int]:
    return list(n_buckets) if isinstance(n_buckets, (tuple, list)) else [int(n_buckets)]


def _first_argmax(values: list[float]) -> int:
    """Index of the first largest value; refuses near-ties that float32 rounding could flip."""
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    others = [values[i] for i in range(len(values)) if i != best]
    scale = max(1.0, max(abs(x) for x in values))
    if others and values[best] - max(others) < AMBIGUOUS_GAP * scale and any(values):
        raise AssertionError(f"ambiguous hash {values}: choose other test data")
    return best


def oracle_bucket(vector: torch.Tensor, rotation: torch.Tensor, n_buckets) -> int:
    """Bucket of one ``(d,)`` vector under one round's ``(d, sum(factors) // 2)`` rotation."""
    rotated = (vector.detach().double() @ rotation.double()).tolist()
    bucket, start, stride = 0, 0, 1
    for factor in _factors(n_buckets):
        part = rotated[start : start + factor // 2]
        bucket += stride * _first_argmax(part + [-x for x in part])
        start += factor // 2
        stride *= factor
    return bucket


def oracle_keys(qk: torch.Tensor) -> torch.Tensor:
    """``k = q / sqrt(mean(q^2) + 1e-6) / sqrt(d)`` row by row, ``(L, d)`` -> ``(L, d)``."""
    d = qk.shape[-1]
    rows = [row / torch.sqrt((row * row).sum() / d + KEY_NORM_EPS) / math.sqrt(d) for row in qk]
    return torch.stack(rows)


def oracle_neighbour_chunks(chunk: int, rounds: int, chunks: int, real_chunks: int, before: int, after: int):
    """Key chunks of query ``chunk`` (an index into the round-concatenated chunks), in window order.

    A chunk holding real tokens looks at its neighbours in the sequence of real chunks only (all the
    rounds' real chunks laid end to end, wrapping around); a chunk of padding looks at its plain
    neighbours in the round-concatenated sequence, wrapping around.
    """
    r, j = divmod(chunk, chunks)
    out = []
    for delta in range(-before, after + 1):
        if j < real_chunks:
            real_list = [(rr, jj) for rr in range(rounds) for jj in range(real_chunks)]
            rr, jj = real_list[(r * real_chunks + j + delta) % len(real_list)]
            out.append(rr * chunks + jj)
        else:
            out.append((chunk + delta) % (rounds * chunks))
    return out


def _masked_scores(q, keys, key_valid, causal):
    """All ``(P, P)`` scores ``q . k``: padding keys and (causal) later keys at -1e9, then self at -1e5."""
    n = len(key_valid)
    far = torch.tensor([[not key_valid[k] or (causal and i < k) for k in range(n)] for i in range(n)])
    scores = torch.where(far, torch.tensor(PAD_AND_CAUSAL_MASK, dtype=q.dtype), q @ keys.T)
    return torch.where(torch.eye(n, dtype=torch.bool), torch.tensor(SELF_MASK, dtype=q.dtype), scores)


def lsh_attention_oracle(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    *,
    n_buckets,
    bucket_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    n_chunks_before: int = 1,
    n_chunks_after: int = 0,
) -> torch.Tensor:
    """LSH attention by brute force.

    Args:
        qk: ``(batch, heads, length, d)`` float64; v: ``(batch, heads, length, dv)`` float64.
        rotations: ``(heads, d, n_hashes, sum(factors) // 2)``.
        attention_mask: ``(batch, length)`` bool, True for real tokens, or None.

    Returns:
        ``(batch, heads, length, dv)`` float64. Rows of padding queries are zero (undefined).
    """
    batch, heads, length, _ = qk.shape
    rounds = rotations.shape[2]
    chunk = bucket_size
    exact = length <= chunk
    padded = length if exact else -(-length // chunk) * chunk
    chunks = padded // chunk
    rows = []
    for b in range(batch):
        key_valid = [
            p < length and (attention_mask is None or bool(attention_mask[b, p])) for p in range(padded)
        ]
        real_chunks = min(max(1, -(-sum(key_valid) // chunk)), chunks)
        for h in range(heads):
            q = torch.cat([qk[b, h], qk.new_zeros(padded - length, qk.shape[-1])])
            keys = oracle_keys(q)
            values = torch.cat([v[b, h], v.new_zeros(padded - length, v.shape[-1])])
            if exact:  # one chunk: every query sees every key once, one round
                seen = {i: [list(range(length))] for i in range(length)}
            else:
                order = []  # the round-concatenated sorted sequence of positions
                for r in range(rounds):
                    pad_bucket = math.prod(_factors(n_buckets))
                    bucket = [
                        oracle_bucket(q[p], rotations[h, :, r], n_buckets) if key_valid[p] else pad_bucket
                        for p in range(padded)
                    ]
                    order += sorted(range(padded), key=lambda p: (bucket[p], p))
                seen = {i: [] for i in range(padded)}
                for c in range(rounds * chunks):
                    key_positions = []
                    for n in oracle_neighbour_chunks(
                        c, rounds, chunks, real_chunks, n_chunks_before, n_chunks_after
                    ):
                        key_positions += order[n * chunk : (n + 1) * chunk]
                    for i in order[c * chunk : (c + 1) * chunk]:
                        seen[i].append(key_positions)
            all_scores = _masked_scores(q, keys, key_valid, causal)
            out_rows = []
            for i in range(length):
                if not key_valid[i]:
                    out_rows.append(v.new_zeros(v.shape[-1]))
                    continue
                lses, outs = [], []
                for positions in seen[i]:  # one entry per round
                    scores = all_scores[i, positions]  # duplicates kept: a key seen twice counts twice
                    # softmax, not exp(s - lse): at s = -1e5 (self only) lse has lost ~1e-11 to rounding
                    outs.append(torch.softmax(scores, 0) @ values[positions])
                    lses.append(torch.logsumexp(scores, 0))
                weights = torch.softmax(torch.stack(lses), 0)
                out_rows.append(sum(w * o for w, o in zip(weights, outs, strict=True)))
            rows.append(torch.stack(out_rows))
    return torch.stack(rows).view(batch, heads, length, v.shape[-1])
