"""Naive O(L^2) references: dense attention with the LSH chunk structure made explicit."""

from __future__ import annotations

import math

import torch


def neighbour_chunks(
    chunk: int, rounds: int, chunks: int, real_chunks: int, before: int, after: int
) -> list[int]:
    """Chunk ids (over the round-concatenated sequence) that ``chunk`` attends to, written plainly."""
    r, j = divmod(chunk, chunks)
    out = []
    for delta in range(-before, after + 1):
        if j < real_chunks:  # skip chunks that hold only padding
            c = (r * real_chunks + j + delta) % (rounds * real_chunks)
            out.append((c // real_chunks) * chunks + c % real_chunks)
        else:
            out.append((chunk + delta) % (rounds * chunks))
    return out


def naive_chunked_attention(
    q, k, v, sort_indices, bucket_size, causal, key_valid, before=1, after=0, self_mask=True
):
    """Dense reference for one call.

    q, k, v: (batch, heads, padded_length, dim) float64, keys already normalised/scaled.
    sort_indices: (batch, heads, rounds, padded_length) positions per round.
    key_valid: (batch, padded_length) bool or None. Returns (batch, heads, padded_length, dim).
    """
    batch, heads, length, _ = q.shape
    rounds = sort_indices.shape[2]
    chunks = length // bucket_size
    out = torch.zeros_like(v)
    for b in range(batch):
        n_real = length if key_valid is None else int(key_valid[b].sum())
        real_chunks = max(1, math.ceil(n_real / bucket_size))
        for h in range(heads):
            # count[r, i, j]: how often query i sees key j in round r (a key can come twice).
            count = torch.zeros(rounds, length, length, dtype=q.dtype)
            order = sort_indices[b, h].reshape(-1)  # concatenated rounds
            for chunk in range(rounds * chunks):
                r = chunk // chunks
                queries = order[chunk * bucket_size : (chunk + 1) * bucket_size]
                for nb in neighbour_chunks(chunk, rounds, chunks, real_chunks, before, after):
                    keys = order[nb * bucket_size : (nb + 1) * bucket_size]
                    for i in queries.tolist():
                        for j in keys.tolist():
                            count[r, i, j] += 1
            scores = q[b, h] @ k[b, h].T
            masked = torch.zeros(length, length, dtype=torch.bool)
            if causal:
                masked |= torch.ones(length, length).triu(1).bool()
            if key_valid is not None:
                masked |= ~key_valid[b][None, :]
            scores = scores.masked_fill(masked, -1e9)
            if self_mask:
                scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), -1e5)
            lse, outs = [], []
            for r in range(rounds):
                seen = scores.masked_fill(count[r] == 0, float("-inf"))
                row_max = seen.max(-1, keepdim=True).values
                weights = count[r] * torch.exp(seen - row_max)
                lse.append(row_max.squeeze(-1) + weights.sum(-1).log())
                outs.append((weights / weights.sum(-1, keepdim=True)) @ v[b, h])
            lse = torch.stack(lse)  # (rounds, length)
            w = torch.softmax(lse, dim=0)
            out[b, h] = sum(w[r][:, None] * outs[r] for r in range(rounds))
    return out


def exact_shared_qk_attention(qk, v, causal, key_valid=None):
    """Plain dense shared-QK attention with the self mask: (batch, heads, length, dim)."""
    keys = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(qk.shape[-1])
    scores = qk @ keys.transpose(-1, -2)
    length = qk.shape[2]
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), -1e9)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], -1e9)
    scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), -1e5)
    return torch.softmax(scores, -1) @ v
