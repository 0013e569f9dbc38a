"""Reproduce the Reformer paper's Table 2: the duplication task with LSH attention.

Trains one model per training hash count (1, 2, 4) at the ``copy-paper`` size (sequences ``0w0w`` of
1024 tokens, one layer, d_model 256, 4 heads) and evaluates each with 1, 2, 4 and 8 hash rounds and with
exact (full, shared-QK) attention; writes the table next to the paper's to ``docs/copy_table2.md``.

    .venv/bin/python benchmarks/copy_table2.py                       # paper size; meant for a GPU
    .venv/bin/python benchmarks/copy_table2.py --preset copy --steps 2000 --out runs/table2-cpu

Runs already trained in ``--out`` are resumed (or reused when finished), so the script can be
interrupted and started again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from reformer.tasks import settings
from reformer.train import checkpoint_dirs, evaluate_run, preset_config, train

TRAIN_HASHES = (1, 2, 4)
EVAL_SETTINGS = ("full", 8, 4, 2, 1)
# Table 2 of the paper (accuracy on the duplication task, length 1024); rows: hashes in training.
PAPER = {
    1: {"full": 0.008, 8: 0.999, 4: 0.996, 2: 0.948, 1: 0.779},
    2: {"full": 0.008, 8: 1.000, 4: 0.999, 2: 0.971, 1: 0.868},
    4: {"full": 0.008, 8: 1.000, 4: 0.999, 2: 0.994, 1: 0.919},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="copy-paper", choices=("copy", "copy-paper"))
    parser.add_argument("--steps", type=int, help="training steps per model (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--out", default="runs/table2")
    parser.add_argument("--eval-tokens", type=int, default=64 * 1024, help="tokens evaluated per cell")
    parser.add_argument("--table", default="docs/copy_table2.md")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    results: dict[int, dict] = {}
    for hashes in TRAIN_HASHES:
        cfg = preset_config(args.preset)
        cfg.model = settings.replace(cfg.model, {"n_hashes": hashes}, "model")
        cfg.progress = True
        if args.steps:
            cfg.steps = args.steps
        if args.batch_size:
            cfg.batch_size = args.batch_size
        run = Path(args.out) / f"lsh-{hashes}"
        done = checkpoint_dirs(run)
        started = time.monotonic()
        if not done or int(done[-1].name[5:]) < cfg.steps:
            train(cfg, run, resume=bool(done), device=args.device)
        minutes = (time.monotonic() - started) / 60
        row = {}
        for setting in EVAL_SETTINGS:
            metrics = evaluate_run(
                run, n_hashes=None if setting == "full" else setting, full_attention=setting == "full",
                max_tokens=args.eval_tokens, device=args.device,
            )  # fmt: skip
            row[setting] = metrics["accuracy"]
        results[hashes] = row
        print(
            f"trained with LSH-{hashes} ({minutes:.1f} min): "
            + ", ".join(f"{k}: {v:.3f}" for k, v in row.items())
        )

    table = render(results, args)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(table)
    print(table)


def render(results: dict[int, dict], args: argparse.Namespace) -> str:
    head = "| trained with | " + " | ".join(_label(s) for s in EVAL_SETTINGS) + " |"
    rule = "|---" * (len(EVAL_SETTINGS) + 1) + "|"
    lines = [
        f"# Duplication task (paper Table 2): preset `{args.preset}`",
        "",
        f"Command: `python benchmarks/copy_table2.py --preset {args.preset}"
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size else "")
        + "`. Accuracy on the second half of `0w0w` sequences; ours / paper.",
        "",
        head,
        rule,
    ]
    for hashes, row in results.items():
        cells = [f"{row[s]:.1%} / {PAPER[hashes][s]:.1%}" for s in EVAL_SETTINGS]
        lines.append(f"| LSH-{hashes} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(setting) -> str:
    return "full attention" if setting == "full" else f"eval LSH-{setting}"


if __name__ == "__main__":
    main()
