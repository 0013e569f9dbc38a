"""torch.compile against eager: compile time, speed and agreement, each case in a fresh process.

The model is the benchmark protocol's (DESIGN.md): byte-level LM, 6 reversible LSH layers, d_model 256,
d_ff 1024, 4 heads, bucket 64, 2 hashes, batch 1. Modes:

* ``train``: ``model.loss(ids, ids.roll(-1, 1))`` and its backward in train mode. The reversible stack is
  one eager region for torch.compile; inside it every layer's attention runs compiled code.
* ``infer``: the eval forward under ``torch.no_grad()``, ``fullgraph=True``.
* ``eval-grad``: the eval-mode loss and its backward, ``fullgraph=True`` (one graph, no break).
* ``layer``: one causal LSH attention layer with its projections (d_model 256, 4 heads of 64, bucket 64,
  4 hashes), forward + backward of ``(layer(x) * g).sum()``, as ``benchmarks/attention_peers.py``.

Per case, in a fresh process with its own (by default empty) Inductor cache: the first compiled call, a
warm-up eager call, then ``--steps`` rounds of one eager and one compiled step, alternating so that both
see the same machine. Compile time is the first compiled call minus the median compiled step; the
ratio is eager / compiled (medians). With ``--hf`` the ``train`` and ``layer`` cases also time
HF transformers' model or layer (``benchmarks/attention_peers.py``'s settings) in the same rounds. The
largest differences between compiled and eager outputs (and gradients) are printed too.

``--buckets L`` explains a compiled/eager difference of the inference logits at length L: it runs both
with the attention layers' inputs captured, hashes each layer's two inputs with that layer's own
rotations, and prints per layer how far the inputs are apart, how many (head, round, position) buckets
differ, the margin of those hashes (the gap between the best and the second-best of ``[xR, -xR]``), and
how many differ when one input is hashed by compiled and by eager code.

Usage::

    python benchmarks/compile.py --lengths 4096 16384 --modes train infer eval-grad --steps 3
    python benchmarks/compile.py --lengths 16384 --modes train layer --hf
    python benchmarks/compile.py --buckets 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import reformer

MODES = ("train", "infer", "eval-grad", "layer")


def build_lm(length: int) -> reformer.ReformerLM:
    torch.manual_seed(0)
    config = reformer.ReformerConfig(
        vocab_size=256, d_model=256, n_heads=4, n_layers=6, d_ff=1024, bucket_size=64, n_hashes=2,
        max_seq_len=length,
    )  # fmt: skip
    return reformer.ReformerLM(config)


def lm_step(model, ids):
    """The training (or eval-grad) step: returns the loss and the parameters' gradients."""

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same fresh rotations for eager and compiled
        loss = fn(ids, targets=ids.roll(-1, 1))
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    return step


def case_steps(mode: str, length: int, hf: bool):
    """``(eager_step, compiled_step, hf_step or None)``: zero-argument calls returning (output, grads)."""
    if mode == "layer":
        sys.path.insert(0, str(Path(__file__).parent))
        import attention_peers as peers

        x, g = peers._inputs(length)
        torch.manual_seed(0)
        layer = reformer.LSHSelfAttention(d_model=256, n_heads=4, bucket_size=64, n_hashes=4, causal=True)
        compiled = torch.compile(layer)

        def run(fn):
            def step():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                torch.manual_seed(1)
                out = fn(x)
                (out * g).sum().backward()
                return out.detach(), [x.grad, *(p.grad for p in layer.parameters())]

            return step

        hf_step = None
        if hf:
            hf_case = peers.attention_hf(peers.Spec("attention", "hf", length))

            def hf_step():
                for t in hf_case.grads:
                    t.grad = None
                hf_case.loss().backward()
                return None, []

        return run(layer), run(compiled), hf_step
    model = build_lm(length)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1234))
    model.train(mode == "train")
    compiled = torch.compile(model, fullgraph=mode != "train")
    if mode == "infer":

        def run(fn):
            def step():
                with torch.no_grad():
                    return fn(ids), []

            return step

        return run(model), run(compiled), None
    step = lm_step(model, ids)
    hf_step = None
    if hf and mode == "train":
        sys.path.insert(0, str(Path(__file__).parent))
        import attention_peers as peers

        hf_case = peers.lm_hf(peers.Spec("model", "hf", length, layers=6))

        def hf_step():
            for t in hf_case.grads:
                t.grad = None
            hf_case.loss().backward()
            return None, []

    return (lambda: step(model)), (lambda: step(compiled)), hf_step


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_case(mode: str, length: int, steps: int, hf: bool) -> dict:
    eager, compiled, hf_step = case_steps(mode, length, hf)
    first_s, (out_c, grads_c) = timed(compiled)
    grads_c = [g.clone() for g in grads_c]
    _, (out_e, grads_e) = timed(eager)  # warm-up
    if hf_step is not None:
        hf_step()
    out_diff = (out_c.float() - out_e.float()).abs().max().item()
    grad_diff = max(((a - b).abs().max().item() for a, b in zip(grads_c, grads_e, strict=True)), default=0.0)
    times: dict[str, list[float]] = {"eager": [], "compiled": [], "hf": []}
    for _ in range(steps):
        times["eager"].append(timed(eager)[0])
        times["compiled"].append(timed(compiled)[0])
        if hf_step is not None:
            times["hf"].append(timed(hf_step)[0])
    row = {"mode": mode, "length": length, "first_compiled_s": first_s, "out_diff": out_diff}
    row["grad_diff"] = grad_diff
    for name, values in times.items():
        if values:
            row[f"{name}_s"] = statistics.median(values)
    if "compiled_s" in row:
        row["compile_s"] = first_s - row["compiled_s"]
        row["eager_over_compiled"] = row["eager_s"] / row["compiled_s"]
    if "hf_s" in row:
        row["compiled_over_hf"] = row["compiled_s"] / row["hf_s"]
        row["eager_over_hf"] = row["eager_s"] / row["hf_s"]
    return row


def bucket_report(length: int) -> None:
    """Per LSH layer: the inputs of the compiled and the eager inference, hashed alike (see the docstring)."""
    model = build_lm(length).eval()
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1234))
    captured: list[torch.Tensor] = []
    layers = [block.attention for block in model.layers.blocks]
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        eager_logits = model(ids)
        eager_inputs = captured[:]
        captured.clear()
        compiled_logits = torch.compile(model, fullgraph=True)(ids)
        compiled_inputs = captured[:]
        diff = (compiled_logits - eager_logits).abs()
        print(f"L={length}: logits max |compiled - eager| {diff.max().item():.3g}, "
              f"positions with a difference above 1e-3: {int((diff.amax(-1) > 1e-3).sum())}")  # fmt: skip
        for i, (layer, x_e, x_c) in enumerate(zip(layers, eager_inputs, compiled_inputs, strict=True)):
            buckets = [position_buckets(layer, x) for x in (x_e, x_c)]
            flipped = (buckets[0] != buckets[1])[0]  # (heads, rounds, length)
            margins = hash_margins(layer, x_e, flipped)
            # The compiled hashing of the same input (its own rounding of x R):
            same_input = int((torch.compile(position_buckets)(layer, x_c) != buckets[1]).sum())
            print(
                f"layer {i}: inputs max |diff| {(x_c - x_e).abs().max().item():.2e}; buckets differ for "
                f"{int(flipped.sum())} of {flipped.numel()} (head, round, position); hash margins there: "
                f"{', '.join(f'{m:.1e}' for m in margins[:8]) or '-'}"
                + (f" (largest {max(margins):.1e})" if margins else "")
                + f"; compiled vs eager hashing of one input: {same_input} differ",
                flush=True,
            )


def position_buckets(layer, x: torch.Tensor) -> torch.Tensor:
    """``(1, heads, rounds, length)`` bucket of every position, hashed as ``layer`` hashes in eval mode."""
    from reformer.attention.lsh import lsh_attention

    qk, v = layer.split_heads(layer.to_qk(x)), layer.split_heads(layer.to_v(x))
    _, indices, sorted_buckets = lsh_attention(
        qk, v, bucket_size=layer.bucket_size, n_hashes=layer.n_hashes, n_buckets=layer.n_buckets,
        causal=layer.causal, key_rule=layer.key_rule, hash_seed=layer.eval_hash_seed,
        return_sort_indices=True, return_sorted_buckets=True,
    )  # fmt: skip
    return torch.empty_like(sorted_buckets).scatter_(-1, indices, sorted_buckets)[..., : x.shape[1]]


def hash_margins(layer, x: torch.Tensor, flipped: torch.Tensor) -> list[float]:
    """For (up to 64 of) the ``flipped`` ``(heads, rounds, length)`` hashes: the smallest over the bucket
    factors of the gap between the largest and the second-largest of ``[xR, -xR]`` over that factor's
    columns (an exact tie has margin 0), on ``x``. The benchmark model's layers: automatic bucket counts,
    no padding."""
    from reformer.hashing import auto_hash_width, auto_n_buckets, bucket_factors, draw_column_rotations

    qk = layer.split_heads(layer.to_qk(x)).float()
    _, heads, length, head_dim = qk.shape
    padded = -(-length // layer.bucket_size) * layer.bucket_size
    factors = bucket_factors(auto_n_buckets(padded, layer.bucket_size))
    width = auto_hash_width(padded, layer.bucket_size)
    rotations = draw_column_rotations(heads, head_dim, layer.n_hashes, width, seed=layer.eval_hash_seed)
    margins = []
    for h, r, position in flipped.nonzero().tolist()[:64]:
        rotated = qk[0, h, position] @ rotations[h, :, r]
        gaps, start = [], 0
        for factor in factors:
            part = rotated[start : start + factor // 2]
            top = torch.cat([part, -part]).sort(descending=True).values
            gaps.append(float(top[0] - top[1]))
            start += factor // 2
        margins.append(min(gaps))
    return sorted(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["train", "infer", "eval-grad"])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds after the warm-up (median)")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers (train, layer)")
    parser.add_argument("--warm-cache", action="store_true", help="reuse the Inductor cache (default: empty)")
    parser.add_argument("--buckets", type=int, metavar="L", help="explain the inference difference at L")
    parser.add_argument("--case", nargs=2, metavar=("MODE", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.buckets:
        bucket_report(args.buckets)
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.steps, args.hf)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    header = (
        "| mode | L | compile s | eager s | compiled s | eager / compiled | compiled / HF | max out diff |"
    )
    print(header + "\n|---|---|---|---|---|---|---|---|", flush=True)
    for length in args.lengths:
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ)
                if not args.warm_cache:
                    env["TORCHINDUCTOR_CACHE_DIR"] = cache
                command = [sys.executable, __file__, "--case", mode, str(length), "--steps", str(args.steps)]
                result = subprocess.run(
                    command + ["--hf"] * args.hf, env=env, capture_output=True, text=True, check=False
                )
            if result.returncode != 0:
                print(
                    f"| {mode} | {length} | failed: {result.stderr.strip().splitlines()[-1:]} |", flush=True
                )
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            hf = (
                f"{row['compiled_over_hf']:.2f}x (eager {row['eager_over_hf']:.2f}x)" if "hf_s" in row else ""
            )
            cells = [
                mode,
                length,
                f"{row['compile_s']:.1f}",
                f"{row['eager_s']:.3f}",
                f"{row['compiled_s']:.3f}",
            ]
            cells += [f"{row['eager_over_compiled']:.2f}x", hf, f"{row['out_diff']:.1e}"]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
