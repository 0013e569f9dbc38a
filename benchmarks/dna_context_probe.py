"""Does a DNA model use long context? Its loss on the bases of a repeated region (a later copy of an
rRNA operon) when it sees the preceding 1K, 16K or 64K bases: once the context reaches back to the
earlier copy, a model that looks the copy up predicts the later one almost for free. The same
positions of a region that repeats nowhere nearby are the control: what context length buys without a
copy to find.

    python benchmarks/dna_context_probe.py RUN                        # E. coli K-12, the default regions
    python benchmarks/dna_context_probe.py RUN --contexts 1024 16384 65536 --n-hashes 8

The repeat is a later copy ``[start, end)`` whose earlier copy lies ``offset`` bases before it, as
``benchmarks/dna_repeats.py`` lists them (by default the longest direct repeat whose earlier copy is
16K-64K bases back). Each context length ``C`` gives one forward pass over the ``C`` bases before the
region and the region itself; only the region's bases are scored (bits per base, the forward strand).
Where the context reaches the earlier copy, the repeat is scored again with the earlier copy's bases
shuffled in place (same composition, nothing to copy): the gain that the copy itself brings.
The model must take inputs longer than it was trained on (rotary or no positions); its ``max_seq_len``
is raised for the probe, which changes no parameter.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reformer.data import default_genome, read_records
from reformer.train import load_run

_spec = importlib.util.spec_from_file_location("dna_repeats", Path(__file__).with_name("dna_repeats.py"))
dna_repeats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dna_repeats)


def region_bits(model, bases: np.ndarray, start: int, end: int, context: int, n_hashes: int | None) -> float:
    """Mean bits per base of ``bases[start:end]`` given the ``context`` bases before ``start``."""
    if context < 1:
        raise ValueError(f"context={context}: give at least one base of context")
    if start - context < 0:
        raise ValueError(f"a context of {context} bases reaches before the sequence's start ({start})")
    window = torch.from_numpy(np.asarray(bases[start - context : end]).astype(np.int64))
    inputs, targets = window[None, :-1], window[None, 1:]
    with torch.no_grad():
        logits = model.eval()(inputs, n_hashes=n_hashes)[0, -(end - start) :].double()
    loss = F.cross_entropy(logits, targets[0, -(end - start) :], reduction="mean")
    return float(loss) / math.log(2)


def default_regions(bases: np.ndarray, longest: int) -> tuple[dna_repeats.Repeat, int]:
    """The longest direct repeat whose earlier copy is 16K-``longest`` bases back, and the start of a
    control region of its length: the nearest stretch before it with no repeat of 200+ bases within
    ``longest`` bases before or inside it."""
    repeats = dna_repeats.find_repeats(bases, min_length=200)
    candidates = [
        r for r in repeats if not r.inverted and 16384 < r.offset <= longest - 1024 and r.length >= 2000
    ]
    if not candidates:
        raise ValueError(
            f"no direct repeat of 2,000+ bases lies 16K-{longest:,} bases after its earlier copy"
        )
    target = max(candidates, key=lambda r: r.length)
    covered = np.zeros(len(bases) + 1, np.int64)
    for r in repeats:
        covered[r.start] += 1
        covered[r.end] -= 1
        covered[r.source] += 1
        covered[min(len(bases), r.source + r.length)] -= 1
    clean = np.cumsum(covered)[: len(bases)] == 0
    run = np.concatenate([[0], np.cumsum(~clean)])
    span = longest + target.length
    for start in range(target.start - span, span, -1000):  # the nearest clean span before the repeat
        if run[start + target.length] - run[start - longest] == 0:
            return target, start
    raise ValueError("no region free of repeats found for the control")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a run folder of a DNA model (reformer train --preset dna)")
    parser.add_argument("--data", help="a FASTA file, its first record (default: E. coli K-12 W3110)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384, 65536])
    parser.add_argument("--repeat", type=int, nargs=2, metavar=("START", "END"), help="the later copy")
    parser.add_argument("--offset", type=int, help="with --repeat: how far before it the earlier copy starts")
    parser.add_argument("--control", type=int, metavar="START", help="the control region's start")
    parser.add_argument("--n-hashes", type=int, help="LSH rounds (default: as trained)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    name, bases = read_records(args.data or default_genome("K-12"))[0]
    longest = max(args.contexts)
    if args.repeat is None or args.control is None:
        target, control = default_regions(bases, longest)
        start, end = target.start, target.end
        offset = target.offset
    if args.repeat is not None:
        (start, end), offset = args.repeat, args.offset
    if args.control is not None:
        control = args.control
    _, _, model = load_run(args.run, "cpu")
    if model.config.position_embedding not in ("rotary", "none"):
        raise SystemExit(
            f"{args.run} has {model.config.position_embedding} positions; the probe needs rotary or none"
        )
    model.config.max_seq_len = max(model.config.max_seq_len, longest + end - start + 1)
    length = end - start
    earlier = f"earlier copy {offset:,} bases before" if offset else "earlier copy not given"
    print(
        f"{name}: repeat {start:,}-{end:,} ({length:,} bases, {earlier}); "
        f"control {control:,}-{control + length:,}"
    )
    # The ablation: the earlier copy's bases shuffled in place (same composition, no copy to look up).
    shuffled = np.array(bases, copy=True)
    if offset:
        source = start - offset
        shuffled[source : source + length] = np.random.default_rng(0).permutation(
            shuffled[source : source + length]
        )
    print("| context (bases) | repeat: bits/base | repeat, earlier copy shuffled | control: bits/base |")
    print("|---|---|---|---|")
    for context in args.contexts:
        repeat = region_bits(model, bases, start, end, context, args.n_hashes)
        plain = region_bits(model, bases, control, control + length, context, args.n_hashes)
        reaches = offset and context >= offset
        ablated = (
            f"{region_bits(model, shuffled, start, end, context, args.n_hashes):.3f}" if reaches else "-"
        )
        print(f"| {context:,} | {repeat:.3f} | {ablated} | {plain:.3f} |", flush=True)


if __name__ == "__main__":
    main()
