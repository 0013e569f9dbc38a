"""Per-rank peak memory and step time of sequence parallelism on CPU (gloo), P=1 against P=2.

The model is the benchmark protocol's (DESIGN.md): byte-level LM, 6 reversible LSH layers, d_model 256,
d_ff 1024, 4 heads, bucket 64, 2 hashes, batch 1, fp32. Each P runs in fresh processes (one per rank,
one thread each): ``--warmup`` forward+backward steps of ``loss(ids, ids)``, then ``--steps`` measured
ones. Per rank it reports the peak resident set during the measured steps (kernel ``VmHWM``, reset
before them), the resident set before them (weights, gradients, libraries), the median step time
and the share of it spent in the all-to-all exchanges, the logits gather and the loss all-reduce
(timed around each collective; ``P=1`` runs the plain model and has none).

Usage: ``python benchmarks/sequence_parallel.py [--length 65536] [--sizes 1 2] [--steps 1] [--warmup 1]``.
Timings on a shared machine are rough; memory is not disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reformer
from reformer.attention import sequence_shard
from reformer.bench.memory import hwm_bytes, reset_hwm, rss_bytes
from reformer.bench.workloads import BUCKET, D_FF, D_MODEL, INPUT_SEED, MODEL_HASHES, N_HEADS, VOCAB
from reformer.parallel import SequenceParallelLM
from reformer.parallel import sequence as sp_module

COMM = {"seconds": 0.0}


def _timed(fn):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COMM["seconds"] += time.perf_counter() - start

    return run


def _worker(rank: int, size: int, port: int, args, results) -> None:
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        sequence_shard._exchange = _timed(sequence_shard._exchange)
        sp_module.dist.all_gather = _timed(dist.all_gather)
        sp_module.dist.all_reduce = _timed(dist.all_reduce)
    torch.manual_seed(0)
    config = reformer.ReformerConfig(
        vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, n_layers=args.layers, d_ff=D_FF,
        bucket_size=BUCKET, n_hashes=MODEL_HASHES, max_seq_len=args.length, reversible=True,
    )  # fmt: skip
    model = reformer.ReformerLM(config).train()
    net = SequenceParallelLM(model) if size > 1 else model
    ids = torch.randint(0, VOCAB, (1, args.length), generator=torch.Generator().manual_seed(INPUT_SEED))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        net.loss(ids, ids).backward()
        if size > 1:
            net.sum_gradients()

    for _ in range(args.warmup):
        step()
    reset_hwm()
    before = rss_bytes()
    times, comm = [], []
    for _ in range(args.steps):
        COMM["seconds"] = 0.0
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        comm.append(COMM["seconds"])
    results.put(
        {
            "size": size,
            "rank": rank,
            "peak_mb": hwm_bytes() / 2**20,
            "before_mb": before / 2**20,
            "step_s": statistics.median(times),
            "comm_s": statistics.median(comm),
        }  # fmt: skip
    )
    if size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes:
        results = ctx.SimpleQueue()
        mp.spawn(_worker, args=(size, _free_port(), args, results), nprocs=size)
        rows += sorted((results.get() for _ in range(size)), key=lambda r: r["rank"])
    print(
        f"{args.layers}-layer reversible LSH model, {args.length} tokens, fp32, CPU gloo, 1 thread per rank"
    )
    print(f"{'P':>2} {'rank':>4} {'peak MB':>9} {'before MB':>9} {'step s':>8} {'comm share':>10}")
    for r in rows:
        share = r["comm_s"] / r["step_s"]
        sizes = f"{r['size']:>2} {r['rank']:>4} {r['peak_mb']:>9.0f} {r['before_mb']:>9.0f}"
        print(f"{sizes} {r['step_s']:>8.1f} {share:>10.1%}")
    base = max(r["peak_mb"] for r in rows if r["size"] == rows[0]["size"])
    for size in args.sizes[1:]:
        worst = max(r["peak_mb"] for r in rows if r["size"] == size)
        print(f"per-rank peak, P={size} / P={args.sizes[0]}: {worst / base:.2f}")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
