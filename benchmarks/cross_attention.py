"""One cross-attention layer, forward + backward, at long sources: LSH vs exact (blocked) vs dense.

Each (kind, L_dec, L_enc) case runs in a fresh subprocess, so its peak memory is its own: the kernel's
high-water mark of the resident set (VmHWM, reset after the inputs are built) minus the resident set at
that point, i.e. what the forward + backward pass adds. Time is the median of ``--repeats`` passes after
one warm-up. The kinds run interleaved per length, so on a shared machine the ratios are the result
to read (docs/seq2seq.md).

    PYTHONPATH=src python benchmarks/cross_attention.py --lengths 4096 16384 65536 --decoder 1024
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

KINDS = ("lsh", "exact", "dense")


def run_case(kind: str, l_dec: int, l_enc: int, repeats: int, d_model: int, heads: int, hashes: int) -> dict:
    from reformer.attention import CrossAttention, LSHCrossAttention
    from reformer.bench.memory import hwm_bytes, reset_hwm, rss_bytes

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

    step()  # warm-up
    base = rss_bytes()
    reset_hwm()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = hwm_bytes() - base
    return {
        "kind": kind,
        "l_dec": l_dec,
        "l_enc": l_enc,
        "seconds": statistics.median(times),
        "peak_mib": peak / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="source lengths")
    p.add_argument("--decoder", type=int, nargs="+", default=[1024], help="decoder lengths (0: = source)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hashes", type=int, default=2)
    p.add_argument("--max-dense-scores", type=float, default=2**30, help="skip dense above L_dec*L_enc*heads")
    p.add_argument("--case", nargs=3, metavar=("KIND", "L_DEC", "L_ENC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        kind, l_dec, l_enc = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(kind, l_dec, l_enc, args.repeats, args.d_model, args.heads, args.hashes)))
        return
    print("| L_dec | L_enc | kind | fwd+bwd s | peak MiB |\n|---|---|---|---|---|")
    for l_enc in args.lengths:
        for dec in args.decoder:
            l_dec = dec or l_enc
            for kind in args.kinds:
                if kind == "dense" and l_dec * l_enc * args.heads > args.max_dense_scores:
                    print(f"| {l_dec} | {l_enc} | dense | skipped (scores) | |", flush=True)
                    continue
                common = ["--repeats", str(args.repeats), "--d-model", str(args.d_model)]
                common += ["--heads", str(args.heads), "--hashes", str(args.hashes)]
                cmd = [sys.executable, __file__, "--case", kind, str(l_dec), str(l_enc), *common]
                result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                print(
                    f"| {l_dec} | {l_enc} | {kind} | {result['seconds']:.3f} | {result['peak_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
