"""Does a Reformer learn as well as a Transformer? The same model trained with different attention.

Every variant is the same shape (d_model 128, 4 heads, 4 layers, d_ff 512, reversible, byte vocabulary)
trained through ``reformer train`` on the default corpus with the same seed, data order, optimiser,
schedule and tokens; only the attention changes:

    exact         full attention (separate Q and K, SDPA) in every layer
    local         local chunked attention in every layer (chunk 128, one chunk back)
    mix           local, lsh, local, lsh: the enwik8 preset's pattern (bucket 64, 2 rounds)
    mix-own       the mix with the truly causal LSH key rule (lsh_key_rule=own_bucket, now the default)
    lsh2 / lsh4   LSH in every layer with 2 / 4 rounds (lsh4-own: 4 rounds, own_bucket)
    mix-exact     ablation: local, full, local, full (exact attention in the LSH slots)
    mix-own-bf16  precision: mix-own trained under bfloat16 autocast (every other variant: float32)
    exact-shared  ablation: exact attention with shared QK and the self-mask (too slow on CPU to finish)

Steps (run them in this order; each resumes where it stopped, finished runs are skipped)::

    python benchmarks/quality.py train --max-minutes 60      # the 4K equal-steps runs
    python benchmarks/quality.py speed                       # quiet machine: step time per variant
    python benchmarks/quality.py train --long                # the 16K equal-wall-clock runs
    python benchmarks/quality.py report                      # held-out evaluation, tables and plots

``speed`` must run alone on the machine: it times a few steps of every variant side by side and the
16K runs get as many steps as fit the same wall-clock budget at the measured speed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path("runs/quality")
DOCS = Path("docs")
COMMON = [
    "--d-model", "128", "--n-heads", "4", "--d-ff", "512", "--bucket-size", "64",
    "--local-chunk-size", "128", "--reversible", "--batch-size", "1", "--lr", "4e-3", "--warmup", "50",
    "--schedule", "cosine", "--eval-every", "25", "--eval-batches", "4", "--save-every", "25",
    "--no-progress", "--no-sample", "--precision", "fp32",
]  # fmt: skip
VARIANTS: dict[str, list[str]] = {
    "exact": ["--attn-layers", "full,full,full,full"],
    "local": ["--attn-layers", "local,local,local,local"],
    "mix": ["--attn-layers", "local,lsh,local,lsh", "--n-hashes", "2", "--lsh-key-rule", "chunks"],
    "mix-own": ["--attn-layers", "local,lsh,local,lsh", "--n-hashes", "2", "--lsh-key-rule", "own_bucket"],
    "lsh2": ["--attn-layers", "lsh,lsh,lsh,lsh", "--n-hashes", "2", "--lsh-key-rule", "chunks"],
    "lsh4": ["--attn-layers", "lsh,lsh,lsh,lsh", "--n-hashes", "4", "--lsh-key-rule", "chunks"],
    "lsh4-own": ["--attn-layers", "lsh,lsh,lsh,lsh", "--n-hashes", "4", "--lsh-key-rule", "own_bucket"],
    # Ablations: exact attention with the LSH layers' shared QK and self-mask (one chunk spanning the
    # sequence), and the mix with exact attention in place of LSH.
    "exact-shared": ["--attn-layers", "lsh,lsh,lsh,lsh", "--n-hashes", "1", "--bucket-size", "4096"],
    "mix-exact": ["--attn-layers", "local,full,local,full"],
}
# Precision: the mix-own variant under bfloat16 autocast (the last --precision flag wins).
VARIANTS["mix-own-bf16"] = [*VARIANTS["mix-own"], "--precision", "bf16"]
SHORT = dict(seq_len=4096, steps=300)
# (variant, seed) in the order they run: the comparison the targets need first, second seeds last.
SHORT_RUNS = [("mix", 0), ("exact", 0), ("mix-own", 0), ("lsh2", 0), ("local", 0), ("mix", 1),
              ("exact", 1), ("mix-own", 1), ("lsh4", 0), ("lsh4-own", 0), ("mix-exact", 0),
              ("exact-shared", 0), ("mix-own-bf16", 0)]  # fmt: skip
LONG = dict(seq_len=16384, minutes=4.0)  # the wall-clock budget of each 16K run, at the measured speed
LONG_RUNS = [("mix-own", 0), ("exact", 0)]


def run_dir(variant: str, seed: int, seq_len: int) -> Path:
    return OUT / f"{variant}-L{seq_len}-s{seed}"


def finished_step(run: Path) -> int:
    """The last logged step of a run (0 if it has not started)."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((m["step"] for m in lines), default=0)


def train_run(variant: str, seed: int, seq_len: int, steps: int, max_minutes: float | None) -> None:
    """Train (or resume) one run through ``reformer train``; a finished run is left as it is."""
    run = run_dir(variant, seed, seq_len)
    if finished_step(run) >= steps:
        return
    command = [sys.executable, "-m", "reformer", "train", "--out", str(run), *COMMON, *VARIANTS[variant]]
    command += ["--seq-len", str(seq_len), "--steps", str(steps), "--cosine-steps", str(steps)]
    command += ["--warmup", str(min(30, max(1, steps // 5)))]
    command += ["--seed", str(seed)]
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        command.append("--resume")
    if max_minutes is not None:
        command += ["--max-minutes", f"{max_minutes:.2f}"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def long_steps(speed: dict[str, dict[str, float]], variant: str) -> int:
    seconds = speed[f"{variant}-L{LONG['seq_len']}"]["step_s"]
    return max(1, int(LONG["minutes"] * 60 / seconds))


def cmd_train(args: argparse.Namespace) -> None:
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    if args.long:
        speed = json.loads((OUT / "speed.json").read_text())
        plan = [(v, s, LONG["seq_len"], long_steps(speed, v)) for v, s in LONG_RUNS]
    else:
        plan = [(v, s, SHORT["seq_len"], SHORT["steps"]) for v, s in SHORT_RUNS]
    if args.runs:
        chosen = [(v, int(s)) for v, s in (item.split(":") for item in args.runs.split(","))]
        plan = [p for p in plan if p[:2] in chosen]
    if args.queue:
        index, count = (int(n) for n in args.queue.split("/"))
        plan = plan[index::count]
    for variant, seed, seq_len, steps in plan:
        left = None if deadline is None else (deadline - time.monotonic()) / 60
        if left is not None and left < 0.5:
            print("out of time; run the same command again to continue", flush=True)
            return
        train_run(variant, seed, seq_len, steps, left)


def cmd_speed(args: argparse.Namespace) -> None:
    """Seconds per training step of each variant at 4K and 16K, timed side by side in this process."""
    from reformer.models import ReformerLM
    from reformer.train import config_from_args, parse_train_args

    results = {}
    for seq_len, variants in ((4096, list(VARIANTS)), (16384, [v for v, _ in LONG_RUNS])):
        for variant in variants:
            flags = parse_train_args([*COMMON, *VARIANTS[variant], "--seq-len", str(seq_len)])
            cfg = config_from_args(flags)
            torch.manual_seed(0)
            model = ReformerLM(cfg.model_config())
            ids = torch.randint(0, 256, (1, seq_len))
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                model(ids, labels=ids).loss.backward()
                times.append(time.perf_counter() - start)
            step_s = sorted(times[1:])[len(times[1:]) // 2]
            results[f"{variant}-L{seq_len}"] = {"step_s": step_s, "tokens_per_s": seq_len / step_s}
            print(f"{variant:8s} L={seq_len:6d}  {step_s:7.3f} s/step  {seq_len / step_s:8.0f} tokens/s")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.json").write_text(json.dumps(results, indent=2) + "\n")


@torch.no_grad()
def position_losses(model, windows: torch.Tensor, n_hashes: int | None = None) -> torch.Tensor:
    """Next-byte loss in nats ``(n_windows, length - 1)`` of each position of ``windows``."""
    model.eval()
    losses = []
    for window in windows:
        logits = model(window[None, :-1], n_hashes=n_hashes).float()
        losses.append(torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="none"))
    return torch.stack(losses)


@torch.no_grad()
def cached_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """The same losses computed through the decoding cache, teacher-forced, one token at a time."""
    from reformer.generation.decoding import decode_step, prefill, run_settings

    model.eval()
    batch, length = windows.shape
    settings = run_settings(model, length)
    logits, cache = prefill(model, windows[:, :1], torch.ones(batch, dtype=torch.long), settings, length)
    losses = [torch.nn.functional.cross_entropy(logits, windows[:, 1], reduction="none")]
    for t in range(1, length - 1):
        logits = decode_step(model, cache, windows[:, t])
        losses.append(torch.nn.functional.cross_entropy(logits, windows[:, t + 1], reduction="none"))
    return torch.stack(losses, dim=1)


def held_out_windows(seq_len: int, count: int) -> torch.Tensor:
    """``count`` back-to-back windows of ``seq_len + 1`` bytes from the default corpus's test split."""
    from reformer.data import default_corpus

    data = default_corpus("test")
    return torch.stack(
        [
            torch.from_numpy(data[i * seq_len : i * seq_len + seq_len + 1].astype("int64"))
            for i in range(count)
        ]
    )


def bits(nats: torch.Tensor) -> float:
    return float(nats.mean()) / math.log(2)


def cmd_report(args: argparse.Namespace) -> None:
    from reformer.models import ReformerLM

    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for run in sorted(OUT.glob("*-L*-s*")):
        if run.name in results and not args.again:
            continue
        cfg = json.loads((run / "train_config.json").read_text())
        if finished_step(run) < cfg["steps"]:
            print(f"{run.name}: not finished (step {finished_step(run)} of {cfg['steps']}), skipped")
            continue
        seq_len = cfg["seq_len"]
        model = ReformerLM.from_pretrained(run)
        windows = held_out_windows(seq_len, args.windows * 4096 // seq_len)
        losses = position_losses(model, windows)
        row = {
            "step": finished_step(run),
            "bpb": bits(losses),
            "bpb_first_512": bits(losses[:, :512]),
            "bpb_from_2048": bits(losses[:, 2048:]),
        }
        if "lsh" in cfg["model"]["attn_layers"]:
            row["bpb_8_hashes"] = bits(position_losses(model, windows, n_hashes=8))
            if seq_len == SHORT["seq_len"] and run.name.endswith("-s0"):
                few = windows[: args.cached_windows]
                row["bpb_full_forward_subset"] = bits(position_losses(model, few))
                row["bpb_cached_subset"] = bits(cached_losses(model, few))
        results[run.name] = row
        print(run.name, json.dumps(row), flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot_curves()


def curves(run: Path) -> tuple[list[int], list[float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {m["step"]: m["bits_per_byte"] for m in lines if m["split"] == "eval"}
    steps = sorted(evals)
    return steps, [evals[s] for s in steps]


def plot_curves() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = json.loads((OUT / "speed.json").read_text()) if (OUT / "speed.json").is_file() else {}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    runs = [run for run in sorted(OUT.glob("*-L*-s*")) if (run / "metrics.jsonl").is_file()]
    colours = plt.get_cmap("tab20")
    for index, run in enumerate(runs):
        variant, seq_len = run.name.rsplit("-L", 1)[0], int(run.name.split("-L")[1].split("-s")[0])
        steps, bpb = curves(run)
        step_s = speed.get(f"{variant}-L{seq_len}", {}).get("step_s")
        style = dict(label=run.name, color=colours(index % 20), marker="o", markersize=3)
        if seq_len == SHORT["seq_len"]:
            axes[0].plot([s * seq_len / 1e6 for s in steps], bpb, **style)
            if step_s:
                axes[1].plot([s * step_s / 60 for s in steps], bpb, **style)
        elif step_s:
            axes[2].plot([s * step_s / 60 for s in steps], bpb, **style)
    titles = ("4K, equal steps: held-out bits/byte vs tokens", "4K: the same against wall-clock (measured "
              "step time)", "16K, equal wall-clock (measured step time)")  # fmt: skip
    xlabels = ("tokens (millions)", "minutes on 2 CPU cores", "minutes on 2 CPU cores")
    for ax, title, xlabel, top in zip(axes, titles, xlabels, (4.5, 4.5, 5.5), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits/byte (the run's own eval: 4 windows)")
        ax.set_ylim(top=top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "quality_curves.png", dpi=110)
    print(f"wrote {DOCS / 'quality_curves.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) the runs")
    train.add_argument("--long", action="store_true", help="the 16K equal-wall-clock runs (needs speed)")
    train.add_argument("--runs", help="variant:seed,... to train only these")
    train.add_argument("--queue", help="I/N: only every N-th run from the I-th (parallel queues)")
    train.add_argument("--max-minutes", type=float, help="stop (saving) after this long; rerun to continue")
    speed = sub.add_parser("speed", help="time each variant's training step (alone on the machine)")
    speed.add_argument("--repeats", type=int, default=2)
    report = sub.add_parser("report", help="evaluate the runs, write results.json and the plot")
    report.add_argument("--windows", type=int, default=16, help="held-out windows of 4096 bytes")
    report.add_argument("--cached-windows", type=int, default=2, help="windows run through the cache")
    report.add_argument("--again", action="store_true", help="re-evaluate runs already in results.json")
    args = parser.parse_args()
    {"train": cmd_train, "speed": cmd_speed, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
