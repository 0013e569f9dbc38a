"""bf16 autocast against float32: the training step of the benchmark model, side by side in one process.

The model is the benchmark protocol's (DESIGN.md): byte-level LM, 6 reversible LSH layers, d_model 256,
d_ff 1024, 4 heads, bucket 64, 2 hashes, batch 1. One warm-up step of each, then ``--steps`` rounds of one
float32 step and one step under ``torch.autocast(device, torch.bfloat16)`` (what ``--precision bf16``
trains with); it prints the medians, their ratio, and what ``--precision auto`` picks on this machine.
First it times a linear layer's product of 1024 x 1024 inputs by a 1024 x 1024 weight in float32 and under
bfloat16 autocast (median of 3 after a warm-up), the operation that decides the ratio.

Usage: ``python benchmarks/precision.py [--length 4096] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import reformer
from reformer.train.precision import native_bf16, resolve_precision


def linear_gflops(autocast: bool, n: int = 1024) -> float:
    x, layer = torch.randn(n, n), torch.nn.Linear(n, n)
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x)  # warm-up
        for _ in range(3):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    print(
        f"linear 1024 x 1024 x 1024: fp32 {linear_gflops(False):.1f} GFLOP/s, "
        f"bf16 autocast {linear_gflops(True):.2f} GFLOP/s",
        flush=True,
    )
    torch.manual_seed(0)
    config = reformer.ReformerConfig(
        vocab_size=256, d_model=256, n_heads=4, n_layers=6, d_ff=1024, bucket_size=64, n_hashes=2,
        max_seq_len=args.length,
    )  # fmt: skip
    model = reformer.ReformerLM(config).train()
    ids = torch.randint(0, 256, (1, args.length))
    contexts = {
        "fp32": contextlib.nullcontext,
        "bf16": lambda: torch.autocast(device.type, dtype=torch.bfloat16),
    }

    def step(name: str) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with contexts[name]():
            loss = model(ids, targets=ids.roll(-1, 1))
        loss.backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in contexts}
    for name in contexts:
        step(name)  # warm-up
    for _ in range(args.steps):
        for name in contexts:
            times[name].append(step(name))
    fp32, bf16 = (statistics.median(times[name]) for name in contexts)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; native bf16: {native_bf16(device)}; "
        f"--precision auto picks {resolve_precision('auto', device)}"
    )
    print(f"L={args.length}: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s, fp32 / bf16 {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
