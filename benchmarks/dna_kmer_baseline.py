"""The k-mer baseline beside a DNA model's bits per base: an order-k Markov model (the next base given
the k before it) counted on the training bases of both strands, additive smoothing, evaluated on the
held-out bases exactly as ``reformer eval`` counts them (every base after the first; separators are
context, never targets).

    python benchmarks/dna_kmer_baseline.py                 # E. coli K-12 (the dna preset's data)
    python benchmarks/dna_kmer_baseline.py --data my.fa --orders 4 8 12
"""

from __future__ import annotations

import argparse

import numpy as np

from reformer.data import load_data

SYMBOLS = 6  # A C G T N and the record separator
TARGETS = 5  # a target is one of A C G T N
COMPLEMENT = np.array([3, 2, 1, 0, 4, 5])


def context_ids(stream: np.ndarray, k: int) -> np.ndarray:
    """The id of the ``k`` symbols before each position ``k..`` of ``stream`` (base-6 number)."""
    ids = np.zeros(len(stream) - k, dtype=np.int64)
    for j in range(k):
        ids = ids * SYMBOLS + stream[j : len(stream) - k + j]
    return ids


def lookup(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """How often each of ``queries`` occurs in ``keys`` (a sort, not a ``6^k`` table)."""
    unique, count = np.unique(keys, return_counts=True)
    at = np.clip(np.searchsorted(unique, queries), 0, len(unique) - 1)
    return np.where(unique[at] == queries, count[at], 0)


def bits_per_base(train: np.ndarray, test: np.ndarray, k: int, alpha: float) -> float:
    """Held-out bits per base of the order-``k`` model (``k`` >= 1)."""
    strands = [train, COMPLEMENT[train[::-1]]]
    ctx = np.concatenate([context_ids(s, k) for s in strands])
    nxt = np.concatenate([s[k:] for s in strands])
    keep = nxt < TARGETS
    ctx, nxt = ctx[keep], nxt[keep]
    # The first k held-out targets see the training tail as context; the first held-out base itself is
    # not predicted (reformer eval predicts every base after the first).
    stream = np.concatenate([train[-k:], test])
    test_ctx, test_nxt = context_ids(stream, k)[1:], stream[k + 1 :]
    counted = test_nxt < TARGETS
    test_ctx, test_nxt = test_ctx[counted], test_nxt[counted]
    pair = lookup(ctx * TARGETS + nxt, test_ctx * TARGETS + test_nxt)
    total = lookup(ctx, test_ctx)
    p = (pair + alpha) / (total + alpha * TARGETS)
    return float(-np.log2(p).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="*", help="FASTA files (default: E. coli K-12)")
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 16])
    parser.add_argument("--alpha", type=float, default=0.5, help="additive smoothing (default 0.5)")
    args = parser.parse_args()
    corpus = load_data(args.data or None, format="fasta")
    train, test = np.asarray(corpus.train, dtype=np.int64), np.asarray(corpus.test, dtype=np.int64)
    print(corpus.describe())
    for k in args.orders:
        print(f"k={k:2d}: {bits_per_base(train, test, k, args.alpha):.4f} bits/base")


if __name__ == "__main__":
    main()
