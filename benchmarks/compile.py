"""torch.compile against eager on the benchmark model, side by side in one process.

The model is the benchmark protocol's (DESIGN.md): byte-level LM, 6 reversible LSH layers, d_model 256,
d_ff 1024, 4 heads, bucket 64, 2 hashes, batch 1. For each length it times, alternating eager and
compiled steps so that both see the same machine load:

* ``train``: ``model.loss`` and its backward. The reversible stack runs eagerly in both (it is
  one opaque region for torch.compile); the embeddings and the chunked loss head are compiled.
* ``infer``: the eval forward under ``torch.no_grad()``, compiled whole (``fullgraph=True``).

It also prints the largest difference between compiled and eager outputs and parameter gradients.
Inductor in torch 2.13 on CPU miscompiles the gradient of an embedding lookup whose indices are
``arange(n) // k`` when the result is broadcast over the batch inside the graph (a row of the first
axial position table gets no gradient; minimal repro below), so a ``positions.weights.0`` gradient
difference there is Inductor's, not this library's::

    w = torch.randn(8, 16, requires_grad=True)
    def f(ids):  # ids: (2, 50)
        pos = torch.arange(ids.shape[1])
        return F.embedding(pos // 16 % 8, w).expand(2, -1, -1) * 1.0
    # torch.compile(f) gives row 3 of w's gradient as 0 (eager: the sum over positions 48, 49)

Usage: ``python benchmarks/compile.py [--lengths 4096 16384] [--steps 3] [--modes train infer]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import reformer


def build(length: int) -> reformer.ReformerLM:
    torch.manual_seed(0)
    config = reformer.ReformerConfig(
        vocab_size=256, d_model=256, n_heads=4, n_layers=6, d_ff=1024, bucket_size=64, n_hashes=2,
        max_seq_len=length,
    )  # fmt: skip
    return reformer.ReformerLM(config)


def train_step(fn, model: reformer.ReformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same rotations for eager and compiled
    loss = fn(ids, targets=ids.roll(-1, 1))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def infer_step(fn, model: reformer.ReformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        return fn(ids), []


def compare(length: int, mode: str, steps: int) -> None:
    model = build(length)
    model.train(mode == "train")
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1234))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=mode == "infer")
    step = train_step if mode == "train" else infer_step
    start = time.perf_counter()
    out_c, grads_c = step(compiled, model, ids)
    first_s = time.perf_counter() - start
    grads_c = [g.clone() for g in grads_c]
    out_e, grads_e = step(model, model, ids)
    out_diff = (out_c.float() - out_e.float()).abs().max().item()
    grad_diffs = {
        name: (gc - ge).abs().max().item()
        for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e, strict=False)
    }
    worst = max(grad_diffs, key=grad_diffs.get) if grad_diffs else None
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for name, fn in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            step(fn, model, ids)
            times[name].append(time.perf_counter() - start)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    grad_note = f", max grad diff {grad_diffs[worst]:.1e} ({worst})" if worst else ""
    print(
        f"{mode:5s} L={length:6d}  eager {eager:7.3f} s  compiled {comp:7.3f} s  "
        f"eager/compiled {eager / comp:5.2f}x  (first compiled call {first_s:6.1f} s; "
        f"max output diff {out_diff:.1e}{grad_note})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for length in args.lengths:
        for mode in args.modes:
            compare(length, mode, args.steps)


if __name__ == "__main__":
    main()
