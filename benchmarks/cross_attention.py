"""One cross-attention layer, forward + backward, at long sources: LSH vs exact (blocked) vs dense.

Time: per (L_dec, L_enc) the kinds run interleaved in one process (one warm-up each, then ``--repeats``
rounds), and the median is reported with its ratio to LSH: on a shared machine the ratios are the result
to read. Memory: each case runs once more in a fresh subprocess, where the kernel's high-water mark of
the resident set (VmHWM, reset after a warm-up pass) minus the resident set before the pass is what one
forward + backward adds; the subprocess runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so
every large buffer is mapped on allocation and unmapped when freed (by default glibc raises the threshold
after the warm-up frees its buffers, and the pass then reuses heap pages already resident, which hides
buffers of up to 32 MiB from the high-water mark). "dense" materialises the (L_dec x L_enc) scores;
"exact" is the blocked kernel.

    PYTHONPATH=src python benchmarks/cross_attention.py --lengths 4096 16384 65536 --decoder 1024 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

KINDS = ("lsh", "exact", "dense")
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc maps every allocation above this (see the module docstring)


def build(kind: str, l_dec: int, l_enc: int, d_model: int, heads: int, hashes: int):
    """A zero-argument fwd+bwd pass of one cross-attention layer of ``kind`` on random inputs."""
    from reformer.attention import CrossAttention, LSHCrossAttention

    torch.manual_seed(0)
    if kind == "lsh":
        layer = LSHCrossAttention(d_model, 2 * d_model, heads, chunk_size=64, n_hashes=hashes)
    else:
        layer = CrossAttention(d_model, 2 * d_model, heads)
    x = torch.randn(1, l_dec, d_model, requires_grad=True)
    memory = torch.randn(1, l_enc, 2 * d_model, requires_grad=True)

    def dense(x, memory):
        q, k, v = layer.split_heads(layer.to_q(x)), *layer.project_memory(memory)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return layer.output(probs @ v)

    fn = dense if kind == "dense" else layer

    def step():
        fn(x, memory).sum().backward()
        x.grad = memory.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def peak_case(kind: str, l_dec: int, l_enc: int, d_model: int, heads: int, hashes: int) -> float:
    """MiB that one fwd+bwd pass adds to the resident set's high-water mark (run in a fresh process)."""
    from reformer.bench.memory import hwm_bytes, reset_hwm, rss_bytes

    step = build(kind, l_dec, l_enc, d_model, heads, hashes)
    step()  # warm-up: allocator pools, lazy initialisation
    base = rss_bytes()
    reset_hwm()
    step()
    return (hwm_bytes() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="source lengths")
    p.add_argument("--decoder", type=int, nargs="+", default=[1024], help="decoder lengths (0: = source)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hashes", type=int, default=2)
    p.add_argument("--max-scores", type=float, default=2**31, help="skip exact above L_dec*L_enc*heads")
    p.add_argument("--max-dense-scores", type=float, default=2**28, help="skip dense above L_dec*L_enc*heads")
    p.add_argument("--no-memory", action="store_true", help="time only (no per-case memory subprocesses)")
    p.add_argument("--case", nargs=3, metavar=("KIND", "L_DEC", "L_ENC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = (args.d_model, args.heads, args.hashes)
    if args.case:
        print(json.dumps(peak_case(args.case[0], int(args.case[1]), int(args.case[2]), *shape)))
        return
    print("| L_dec | L_enc | kind | fwd+bwd s (median) | time / LSH | peak MiB |\n|---|---|---|---|---|---|")
    for l_enc in args.lengths:
        for dec in args.decoder:
            l_dec = dec or l_enc
            scores = l_dec * l_enc * args.heads
            limits = {"lsh": math.inf, "exact": args.max_scores, "dense": args.max_dense_scores}
            kinds = [k for k in args.kinds if scores <= limits[k]]
            steps = {kind: build(kind, l_dec, l_enc, *shape) for kind in kinds}
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for kind in kinds:
                steps[kind]()  # warm-up
            for _ in range(args.repeats):  # interleaved, so the kinds share the machine's state alike
                for kind in kinds:
                    start = time.perf_counter()
                    steps[kind]()
                    times[kind].append(time.perf_counter() - start)
            del steps
            flags = ["--d-model", str(args.d_model), "--heads", str(args.heads), "--hashes", str(args.hashes)]
            for kind in args.kinds:
                if kind not in kinds:
                    print(f"| {l_dec} | {l_enc} | {kind} | skipped (scores limit) | | |", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--case", kind, str(l_dec), str(l_enc), *flags]
                peak = math.nan
                if not args.no_memory:
                    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
                    run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    peak = json.loads(run.stdout)
                median = statistics.median(times[kind])
                ratio = median / statistics.median(times["lsh"]) if "lsh" in times else float("nan")
                print(f"| {l_dec} | {l_enc} | {kind} | {median:.3f} | {ratio:.2f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
