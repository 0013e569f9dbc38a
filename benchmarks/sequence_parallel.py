"""Per-rank peak memory and step time of sequence parallelism on CPU (gloo), P=1 against P=2 (or more).

The same measurement as ``reformer bench --what model --sequence-parallel P`` (see
:mod:`reformer.bench.sequence_parallel` for the protocol), with the warm-up and the layouts adjustable:

    python benchmarks/sequence_parallel.py [--length 65536] [--layers 6] [--sizes 1 2] [--steps 1]
        [--warmup 1]

Timings on a shared machine are rough; memory is not disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import sys

from reformer.bench.sequence_parallel import layout_table, measure_layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1, help="measured steps (median time, peak memory)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps of 1024 tokens before them")
    args = parser.parse_args()
    rows = measure_layouts(args.length, args.layers, args.sizes, args.steps, args.warmup)
    print(
        f"{args.layers}-layer reversible LSH model, {args.length} tokens, fp32, CPU gloo, 1 thread per rank"
    )
    print(layout_table(rows))
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
