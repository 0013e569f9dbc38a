"""benchmarks/dna_repeats.py: planted copies (direct with a point difference, inverted) in random bases
are found at their coordinates; k-mer codes against the base-4 number of each window."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "dna_repeats.py"
_spec = importlib.util.spec_from_file_location("dna_repeats", _path)
dna_repeats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dna_repeats)


def test_kmer_codes_are_base_4_numbers_and_n_breaks_them():
    bases = np.array([0, 1, 2, 3, 4, 3, 2, 1, 0])
    codes, valid = dna_repeats.kmer_codes(bases, k=3)
    for i in range(len(bases) - 2):
        window = bases[i : i + 3]
        assert valid[i] == all(window < 4)
        if valid[i]:
            assert int(codes[i]) == int(window[0]) * 16 + int(window[1]) * 4 + int(window[2])


def test_planted_direct_and_inverted_copies_are_found_where_they_are():
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 4, 80_000)
    region = rng.integers(0, 4, 3000)
    bases[10_000:13_000] = region
    copy = region.copy()
    copy[1500] = (copy[1500] + 1) % 4  # one point difference: the copy is still one repeat
    bases[40_000:43_000] = copy
    bases[60_000:63_000] = (3 - region)[::-1]  # the reverse complement
    bases[20_000] = 4  # an N
    found = dna_repeats.find_repeats(bases, min_length=1000)
    direct = [r for r in found if not r.inverted]
    inverted = [r for r in found if r.inverted]
    assert len(direct) == 1 and len(inverted) == 1
    (d,), (v,) = direct, inverted
    # Chance matches may extend a copy by a base or two at either end.
    assert abs(d.start - 40_000) <= 3 and abs(d.end - 43_000) <= 3 and d.offset == 30_000
    assert d.matched < d.length  # the point difference breaks the k-mers that cover it
    assert abs(v.start - 60_000) <= 3 and abs(v.end - 63_000) <= 3
    assert abs(v.source - 40_000) <= 3  # the nearest earlier copy: the direct one
    assert not dna_repeats.find_repeats(rng.integers(0, 4, 50_000), min_length=100)
