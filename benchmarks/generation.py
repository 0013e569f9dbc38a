"""Cached incremental decoding against recomputing the whole prefix, by prefix length.

Prints a markdown table: per new token, cached decoding (median of the timed steps after one warm-up)
and, where asked, recomputation (one forward over prefix + 1 with the same bucket count and rotations);
the prefill time; the cache's size; the process's resident memory. The model is the paper's enwik8
configuration (12 layers alternating local/LSH, d_model 1024, d_ff 4096, 8 heads, LSH bucket 64, local
chunk 128, 2 hashes), random weights, batch 1, float32, on the CPU threads torch is given.

``--key-rule own_bucket`` times the truly causal LSH rule (docs/causal_lsh.md) and its ring cache instead
of the ``chunks`` rule's; the model's bucket count is then fixed by ``max_seq_len``.

``--agreement`` instead measures how often cached and recomputed greedy decoding agree on small random
models that mix local and LSH layers (see docs/generation.md).

    .venv/bin/python benchmarks/generation.py --lengths 1024,4096,16384,65536 --recompute 1024,4096 \
        --real-prefill-max 4096 --hf 1024,4096          # --hf needs transformers (the [bench] extra)
    .venv/bin/python benchmarks/generation.py --key-rule own_bucket --lengths 1024,16384,65536 \
        --recompute 16384 --real-prefill-max 1024
    .venv/bin/python benchmarks/generation.py --key-rule own_bucket --interleaved --lengths 1024,16384,65536
    .venv/bin/python benchmarks/generation.py --agreement
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention import KVCache, LocalCache, LSHCache, OwnBucketCache
from reformer.bench import rss_bytes
from reformer.generation import GenerationCache, decode_step, prefill, run_settings

MIB = 2**20


def enwik8_config(max_seq_len: int, key_rule: str = "chunks") -> ReformerConfig:
    return ReformerConfig(
        vocab_size=258, d_model=1024, n_heads=8, n_layers=12, d_ff=4096,
        attn_layers=("local", "lsh") * 6, bucket_size=64, local_chunk_size=128, n_hashes=2,
        max_seq_len=max_seq_len, causal=True, lsh_key_rule=key_rule,
    )  # fmt: skip


def synthetic_cache(model: ReformerLM, length: int, capacity: int, settings) -> GenerationCache:
    """A cache of ``length`` random states of the right shapes (hashed with the run's rotations): the
    decode step's cost depends on the sizes, not on the values. For prefixes too long to prefill here."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for block, rotations in zip(model.layers.blocks, settings.rotations, strict=True):
        attn = block.attention
        shape = (1, attn.n_heads, length, attn.d_head)
        a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        lengths = torch.tensor([length])
        if rotations is not None and settings.own_bucket:
            window = attn.n_chunks_before * attn.bucket_size
            layers.append(
                OwnBucketCache.from_prefix(a, b, lengths, rotations, settings.n_buckets, window, capacity)
            )
        elif rotations is not None:
            layers.append(
                LSHCache.from_prefix(
                    a,
                    b,
                    lengths,
                    rotations,
                    settings.n_buckets,
                    attn.bucket_size,
                    attn.n_chunks_before,
                    attn.n_chunks_after,
                    capacity,
                )  # fmt: skip
            )
        elif hasattr(attn, "chunk_size"):
            layers.append(LocalCache.from_prefix(a, b, lengths, attn.chunk_size, attn.n_chunks_before))
        else:
            layers.append(KVCache.from_prefix(a, b, capacity))
        del a, b
    return GenerationCache(layers, torch.tensor([length]), length, settings.n_buckets, None)


def time_length(
    model: ReformerLM, length: int, steps: int, recompute: bool, synthetic: bool, decode_threads: int | None
) -> dict:
    gc.collect()
    ids = torch.randint(2, 258, (1, length), generator=torch.Generator().manual_seed(length))
    capacity = length + 2 * (steps + 1) + 1
    settings = run_settings(model, capacity)
    lengths = torch.tensor([length])
    row: dict = {
        "length": length,
        "n_buckets": settings.n_buckets,
        "prefill": "synthetic" if synthetic else "real",
    }
    t0 = time.perf_counter()
    if synthetic:
        cache = synthetic_cache(model, length, capacity, settings)
        row["prefill_s"] = None
    else:
        _, cache = prefill(model, ids, lengths, settings, capacity=capacity)
        row["prefill_s"] = time.perf_counter() - t0
    if recompute:  # one forward over prefix + 1 token, with the same threads as the prefill
        full = torch.cat([ids, torch.tensor([[65]])], dim=1)
        t0 = time.perf_counter()
        prefill(model, full, lengths + 1, settings, keep_cache=False)
        row["recompute_ms"] = 1e3 * (time.perf_counter() - t0)
    threads = torch.get_num_threads()
    next_ids = torch.tensor([65])
    for key, n_threads in (("cached_ms", threads), ("cached_ms_decode_threads", decode_threads)):
        if n_threads is None:
            continue
        torch.set_num_threads(n_threads)
        times = []
        for _ in range(steps + 1):  # the first is the warm-up
            t0 = time.perf_counter()
            logits = decode_step(model, cache, next_ids)
            times.append(time.perf_counter() - t0)
            next_ids = logits.argmax(-1)
        row[key] = 1e3 * statistics.median(times[1:])
    torch.set_num_threads(threads)
    best = min(row["cached_ms"], row.get("cached_ms_decode_threads", float("inf")))
    if recompute:
        row["speedup"] = row["recompute_ms"] / best
    row["cache_mib"] = cache.nbytes() / MIB
    row["rss_mib"] = rss_bytes() / MIB
    return row


def hf_cached_ms(hf_model, length: int, steps: int) -> tuple[float, float]:
    """HF transformers' own cached decoding (``past_buckets_states``) on the same weights: prefill
    seconds and the median ms per new token."""
    ids = torch.randint(2, 258, (1, length), generator=torch.Generator().manual_seed(length))
    t0 = time.perf_counter()
    out = hf_model(ids, use_cache=True)
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        out = hf_model(
            out.logits[:, -1:].argmax(-1), past_buckets_states=out.past_buckets_states, use_cache=True
        )
        times.append(time.perf_counter() - t0)
    return prefill_s, 1e3 * statistics.median(times[1:])


def speed(args: argparse.Namespace) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    recompute = {int(x) for x in args.recompute.split(",")} if args.recompute else set()
    torch.manual_seed(0)
    max_seq_len = max(65536, max(lengths) + 2 * (args.steps + 1) + 1)
    model = ReformerLM(enwik8_config(max_seq_len, args.key_rule)).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# enwik8 preset, {n_params:.0f}M parameters, lsh_key_rule={args.key_rule}, "
          f"torch {torch.__version__}, batch 1, float32", flush=True)  # fmt: skip
    threads = torch.get_num_threads()
    extra = f" cached ms/token ({args.decode_threads} thr) |" if args.decode_threads else ""
    print(f"| prefix | prefill | prefill s | recompute ms/token ({threads} thr) | "
          f"cached ms/token ({threads} thr) |{extra} speedup | cache MiB | RSS MiB |")  # fmt: skip
    print("|---" * (9 if args.decode_threads else 8) + "|", flush=True)
    rows = []
    hf_lengths = {int(x) for x in args.hf.split(",")} if args.hf else set()
    hf_model = model.to_hf().eval() if hf_lengths else None  # the same weights in HF transformers
    for module in hf_model.modules() if hf_model is not None else ():
        if hasattr(module, "chunk_size_feed_forward"):
            # HF can only chunk lengths that are multiples of the chunk (our ff_chunk_size 4096): unchunked.
            module.chunk_size_feed_forward = 0
    with torch.no_grad():
        for length in lengths:
            synthetic = length > args.real_prefill_max
            row = time_length(model, length, args.steps, length in recompute, synthetic, args.decode_threads)
            if length in hf_lengths:
                row["hf_prefill_s"], row["hf_cached_ms"] = hf_cached_ms(hf_model, length, args.steps)
            rows.append(row)
            pre = "-" if row["prefill_s"] is None else f"{row['prefill_s']:.1f}"
            rec = f"{row['recompute_ms']:.0f}" if "recompute_ms" in row else "-"
            spd = f"{row['speedup']:.0f}x" if "speedup" in row else "-"
            dec = f" {row['cached_ms_decode_threads']:.1f} |" if args.decode_threads else ""
            print(
                f"| {length} | {row['prefill']} | {pre} | {rec} | {row['cached_ms']:.1f} |{dec} {spd} | "
                f"{row['cache_mib']:.0f} | {row['rss_mib']:.0f} |",
                flush=True,
            )
    for row in rows:
        if "hf_cached_ms" in row:
            print(
                f"HF transformers, same weights, prefix {row['length']}: "
                f"prefill {row['hf_prefill_s']:.1f} s, "
                f"cached {row['hf_cached_ms']:.1f} ms/token; ours {row['cached_ms']:.1f} ms/token "
                f"({row['hf_cached_ms'] / row['cached_ms']:.1f}x faster)",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def interleaved(args: argparse.Namespace) -> None:
    """Cached per-token time at every length of ``--lengths``, measured round-robin (one step per length
    per round) in one process, so that a shared machine's load falls on every length alike; prints the
    medians and their ratios to the first length's."""
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    max_seq_len = max(65536, max(lengths) + args.steps + 2)
    model = ReformerLM(enwik8_config(max_seq_len, args.key_rule)).eval()
    caches = {}
    for length in lengths:
        settings = run_settings(model, length + args.steps + 2)
        caches[length] = synthetic_cache(model, length, length + args.steps + 2, settings)
    times: dict[int, list[float]] = {length: [] for length in lengths}
    next_ids = torch.tensor([65])
    with torch.no_grad():
        for step in range(args.steps + 1):  # the first round is the warm-up
            for length in lengths:
                t0 = time.perf_counter()
                decode_step(model, caches[length], next_ids)
                if step:
                    times[length].append(time.perf_counter() - t0)
    base = statistics.median(times[lengths[0]])
    print(f"# enwik8 preset, lsh_key_rule={args.key_rule}, {args.steps} interleaved rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| prefix | cached ms/token (median) | / first | cache MiB |\n|---|---|---|---|")
    for length in lengths:
        ms = 1e3 * statistics.median(times[length])
        print(f"| {length} | {ms:.1f} | {ms / 1e3 / base:.2f} | {caches[length].nbytes() / MIB:.0f} |")


def agreement(args: argparse.Namespace) -> None:
    """Greedy cached vs recomputed decoding on random models mixing local and LSH layers."""
    print("| layers | init std | prompt | runs | identical runs | median first divergence | "
          "teacher-forced top-1 agreement | max abs logit diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    new = args.new_tokens
    for layers in (("local", "lsh") * 2, ("lsh", "local") * 2, ("lsh",) * 4):
        for std in (0.02, 0.3):
            for prompt in (16, 64, 100):
                torch.manual_seed(0)
                cfg = ReformerConfig(
                    vocab_size=256, d_model=64, n_heads=2, n_layers=4, d_ff=128, attn_layers=layers,
                    bucket_size=16, local_chunk_size=32, n_hashes=2, max_seq_len=1024, ff_chunk_size=None,
                )  # fmt: skip
                model = ReformerLM(cfg).eval()
                with torch.no_grad():
                    for p in model.parameters():
                        if p.dim() > 1:
                            p.normal_(0, std)
                same, firsts, top1, worst = 0, [], [], 0.0
                for run in range(args.runs):
                    ids = torch.randint(0, 256, (1, prompt), generator=torch.Generator().manual_seed(run))
                    a = model.generate(ids, new, temperature=0.0)
                    b = model.generate(ids, new, temperature=0.0, use_cache=False)
                    diff = (a[0, prompt:] != b[0, prompt:]).nonzero()
                    same += int(len(diff) == 0)
                    firsts.append(new if len(diff) == 0 else int(diff[0]))
                    # Teacher forcing on the cached run's tokens: does each step's argmax agree?
                    settings = run_settings(model, prompt + new)
                    with torch.no_grad():
                        logits, cache = prefill(model, ids, torch.tensor([prompt]), settings, prompt + new)
                        for step in range(new):
                            seq = a[:, : prompt + step]
                            ref, _ = prefill(
                                model, seq, torch.tensor([seq.shape[1]]), settings, keep_cache=False
                            )
                            top1.append(int(ref.argmax(-1)) == int(logits.argmax(-1)))
                            worst = max(worst, (ref - logits).abs().max().item())
                            logits = decode_step(model, cache, a[:, prompt + step])
                print(
                    f"| {','.join(layers)} | {std} | {prompt} | {args.runs} | {same}/{args.runs} | "
                    f"{statistics.median(firsts)} of {new} | {100 * sum(top1) / len(top1):.1f}% | "
                    f"{worst:.2g} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="1024,4096,16384,65536", help="prefix lengths")
    parser.add_argument("--recompute", default="1024,4096", help="lengths at which to time recomputation")
    parser.add_argument(
        "--steps", type=int, default=8, help="timed decode steps per length (after a warm-up)"
    )
    parser.add_argument(
        "--real-prefill-max", type=int, default=65536,
        help="longer prefixes get a synthetic cache (random states of the right shapes) instead of a prefill",
    )  # fmt: skip
    parser.add_argument(
        "--decode-threads", type=int, default=None,
        help="also time the decode steps with this many torch threads (a shared machine: try 1)",
    )  # fmt: skip
    parser.add_argument(
        "--hf", default="", help="lengths at which to time HF transformers' cached decoding (same weights)"
    )
    parser.add_argument(
        "--key-rule", default="chunks", choices=("chunks", "own_bucket"), help="the LSH layers' lsh_key_rule"
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--agreement", action="store_true", help="measure cached vs recomputed agreement")
    parser.add_argument(
        "--interleaved", action="store_true",
        help="only cached steps, round-robin over --lengths (synthetic caches): ratios on a shared machine",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="prompts per agreement setting")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per agreement run")
    args = parser.parse_args()
    if args.agreement:
        agreement(args)
    elif args.interleaved:
        interleaved(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
