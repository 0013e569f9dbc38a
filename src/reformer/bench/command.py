"""``reformer bench``: its options, the configurations they plan, and the run that prints and writes."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..devices import default_device
from .memory import mem_total_bytes
from .report import plot, table, write_json
from .sweep import environment, sweep
from .workloads import (
    DEFAULT_ATTENTION_LENGTHS,
    DEFAULT_HASHES,
    DEFAULT_LAYERS,
    DEFAULT_MODEL_LENGTHS,
    DTYPES,
    MODEL_HASHES,
    N_HEADS,
    PAPER_LENGTHS,
    PAPER_TOKENS,
    BenchConfig,
    attention_configs,
    model_configs,
)

DEFAULT_TIMEOUT_S = 300.0
SEQUENCE_PARALLEL_LENGTH = 65536
SEQUENCE_PARALLEL_LAYERS = 6


def _positive_ints(what: str, example: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values = []
        for part in (p.strip() for p in text.split(",")):
            try:
                n = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{part!r} is not an integer; give a comma list of positive integers, e.g. {example}"
                ) from None
            if n <= 0:
                raise argparse.ArgumentTypeError(
                    f"{n} is not a positive {what}; give a comma list of positive integers, e.g. {example}"
                )
            values.append(n)
        return values

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, e.g. 300") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds, e.g. 300")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer, e.g. 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1, e.g. 3")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``reformer bench`` options."""
    p.add_argument(
        "--device", help="cpu or cuda / cuda:N (default: cuda when available; --sequence-parallel: cpu)"
    )
    p.add_argument("--what", choices=("attention", "model"), default="attention", help="default: attention")
    p.add_argument(
        "--lengths",
        type=_positive_ints("length", "1024,4096"),
        default=None,
        help="comma list of sequence lengths (default: attention "
        f"{','.join(map(str, DEFAULT_ATTENTION_LENGTHS))}; "
        f"model {','.join(map(str, DEFAULT_MODEL_LENGTHS))})",
    )
    p.add_argument(
        "--hashes",
        type=_positive_ints("hash count", "1,2,4,8"),
        default=None,
        help=f"LSH hash rounds, one line each (attention; default {','.join(map(str, DEFAULT_HASHES))})",
    )
    p.add_argument(
        "--layers",
        type=_positive_ints("layer count", "2,6,12"),
        default=None,
        help=f"model depths (--what model; default {','.join(map(str, DEFAULT_LAYERS))})",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default: float32")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed steps after 1 warm-up (median)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per configuration, start-up included (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per configuration (0: torch default)"
    )
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=round(0.8 * mem_total_bytes() / 1024**3, 1),
        help="CPU: address-space cap per configuration, so a blow-up is recorded as 'oom' (0: none; "
        "default 80%% of RAM)",
    )
    p.add_argument(
        "--paper-figure",
        action="store_true",
        help="the Reformer paper's speed figure: attention at 32768 tokens per batch (batch = 32768 // L), "
        "L = 1K..32K, full vs LSH with 1,2,4,8 hashes; writes paper_figure.png unless --plot is given",
    )
    p.add_argument(
        "--sequence-parallel",
        type=_positive_int,
        default=None,
        metavar="P",
        help="--what model: one sequence split over P CPU processes (gloo) against one process; per-rank "
        "peak memory, step time and communication share (default length 65536, 6 layers)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the rows here")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE", help="write a log-log PNG here")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write the table as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[BenchConfig]:
    """Check the options together and list the configurations (``parser.error`` on bad input)."""
    device = args.device = args.device or str(default_device())
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        parser.error(f"--device {device!r} is unknown; use cpu or cuda (cuda:N for one GPU)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                f"torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else f"torch {torch.__version__} sees no GPU"
            )
            parser.error(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    common = dict(device=device, dtype=args.dtype, repeats=args.repeats, threads=args.threads)
    if args.paper_figure:
        if args.what != "attention" or args.layers is not None:
            parser.error("--paper-figure measures attention layers; drop --what model / --layers")
        lengths = args.lengths or list(PAPER_LENGTHS)
        too_long = [n for n in lengths if n > PAPER_TOKENS]
        if too_long:
            parser.error(
                f"--lengths {','.join(map(str, too_long))} is over the {PAPER_TOKENS} tokens per batch of "
                f"--paper-figure; use lengths up to {PAPER_TOKENS}"
            )
        hashes = args.hashes or list(DEFAULT_HASHES)
        return attention_configs(
            lengths, hashes, kinds=("full", "lsh"), tokens_per_batch=PAPER_TOKENS, **common
        )
    if args.what == "attention":
        if args.layers is not None:
            parser.error(f"--layers {','.join(map(str, args.layers))} applies to --what model only")
        return attention_configs(
            args.lengths or DEFAULT_ATTENTION_LENGTHS, args.hashes or DEFAULT_HASHES, **common
        )
    if args.hashes is not None:
        parser.error(
            f"--hashes {','.join(map(str, args.hashes))} applies to --what attention only "
            f"(the models use {MODEL_HASHES} hashes)"
        )
    return model_configs(args.lengths or DEFAULT_MODEL_LENGTHS, args.layers or DEFAULT_LAYERS, **common)


def _check_sequence_parallel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    size = args.sequence_parallel
    if args.what != "model":
        parser.error(f"--sequence-parallel {size} measures the model; add --what model")
    if args.device not in (None, "cpu"):
        parser.error(
            f"--sequence-parallel {size} runs CPU processes over gloo; drop --device {args.device} "
            "(on GPUs, time `torchrun ... -m reformer train --sequence-parallel P`, docs/distributed.md)"
        )
    if size < 2 or N_HEADS % size:
        parser.error(f"--sequence-parallel {size} must be 2 or more and divide the model's {N_HEADS} heads")
    for flag in ("hashes", "paper_figure", "plot", "markdown", "threads"):
        if getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} does not apply to --sequence-parallel")
    if args.dtype != "float32":
        parser.error(f"--dtype {args.dtype}: --sequence-parallel measures float32 only")
    for length in args.lengths or ():
        if length % size:
            parser.error(f"--lengths {length} is not divisible by --sequence-parallel {size}")


def _run_sequence_parallel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .sequence_parallel import WARMUP_LENGTH, layout_table, measure_layouts

    _check_sequence_parallel(args, parser)
    env = environment("cpu", 1)
    start = time.perf_counter()
    rows = []
    for length in args.lengths or [SEQUENCE_PARALLEL_LENGTH]:
        for layers in args.layers or [SEQUENCE_PARALLEL_LAYERS]:
            rows += measure_layouts(length, layers, (1, args.sequence_parallel), steps=args.repeats)
            print(
                f"ReformerLM loss forward+backward, {layers} reversible LSH layers (d_model 256, d_ff 1024, "
                f"2 hashes), {length} tokens, batch 1, fp32; CPU gloo, 1 thread per rank, "
                f"torch {env['torch_version']}\nmedian of {args.repeats} steps after 1 warm-up step of "
                f"{min(length, WARMUP_LENGTH)} tokens; peak: the process's resident set (VmHWM) over the "
                "measured steps (the whole process)"
            )
            print(layout_table([r for r in rows if r["length"] == length and r["layers"] == layers]))
    wall_s = time.perf_counter() - start
    if args.json:
        write_json(args.json, rows, {**env, "wall_s": round(wall_s, 1)}, sys.argv)
        print(f"rows: {args.json}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``reformer bench``: measure, print the table, write the JSON / plot / Markdown asked for."""
    if args.sequence_parallel is not None:
        return _run_sequence_parallel(args, parser)
    configs = plan(args, parser)
    if args.paper_figure and args.plot is None:
        args.plot = Path("paper_figure.png")
    env = environment(args.device, args.threads)
    start = time.perf_counter()
    rows = sweep(configs, args.timeout, args.mem_limit_gib, env, progress=False if args.no_progress else None)
    wall_s = time.perf_counter() - start

    seconds = bool(args.paper_figure)
    first = configs[0]
    if args.paper_figure:
        title = (
            f"time per step at {PAPER_TOKENS} tokens per batch (batch = {PAPER_TOKENS}/L), "
            f"attention forward+backward"
        )
    elif first.what == "model":
        title = "ReformerLM loss forward+backward (d_model 256, d_ff 1024, 2 hashes), batch 1"
    else:
        title = "causal self-attention + projections forward+backward (d_model 256, 4 heads), batch 1"
    title += f"\n{env['device_name']}, {env['threads']} threads, torch {env['torch_version']}, {args.dtype}"

    memory = "cuda max_memory_allocated" if args.device.startswith("cuda") else "resident set"
    legend = (
        f"{title}\nmedian of {args.repeats} steps after 1 warm-up; "
        f"peak: MiB above the built-module baseline ({memory})"
    )
    print(legend)
    print(table(rows, seconds=seconds))
    print(f"{len(rows)} configurations in {wall_s:.0f} s")
    if args.json:
        write_json(args.json, rows, {**env, "wall_s": round(wall_s, 1)}, sys.argv)
        print(f"rows: {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table(rows, markdown=True, seconds=seconds) + "\n")
        print(f"markdown: {args.markdown}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot, title, seconds=seconds)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0
