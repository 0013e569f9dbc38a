"""The ``reformer train`` and ``reformer eval`` commands: flags, presets overridden by them, resuming."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from ..config import KEY_RULES, default_key_rule, read_json_object
from ..files import atomic_write_text
from ..model import ReformerLM
from .checkpoints import checkpoint_dirs
from .config import (
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    SEQ2SEQ_TASKS,
    TASKS,
    TRAIN_CONFIG_FILE,
    TrainConfig,
    TrainingError,
    schedule_change,
)
from .encoder_commands import add_encoder_arguments, encoder_settings, run_encoder_eval, run_task
from .encoder_tasks import ENCODER_TASKS
from .evaluation import evaluate_run, sample_text
from .loop import train

# Flags of `reformer train` that map onto ReformerConfig fields.
MODEL_FLAGS = (
    "d_model", "n_heads", "n_layers", "d_ff", "bucket_size", "n_hashes", "lsh_key_rule", "local_chunk_size",
    "dropout", "hash_seed", "reversible", "position_embedding",
)  # fmt: skip
# Flags of the encoder-decoder tasks (train/seq2seq.py), also model settings.
MODEL_FLAGS += (
    "cross_attention", "cross_n_heads", "cross_n_hashes", "cross_chunk_size", "cross_window",
    "cross_n_buckets",
)  # fmt: skip
# Settings a resumed run may change; everything else must match the saved run.
RESUMABLE_OVERRIDES = (
    "steps", "cosine_steps", "eval_every", "save_every", "log_every", "log", "max_minutes", "progress",
)  # fmt: skip


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", metavar="PATH", help="text/binary files or folders, or enwik8[.zip] "
                   "(default: the Python standard library sources of this machine)")  # fmt: skip
    p.add_argument("--task", choices=TASKS, help="lm: next-byte prediction (default); copy: the paper's "
                   "duplication task 0w0w; mlm, classify, listops: encoders (docs/encoders.md); "
                   "reverse / sort / pairs (--data F.jsonl): encoder-decoder (preset seq2seq)")  # fmt: skip
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="model and run settings to start from (default tiny)"
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    add_encoder_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("--seq-len", type=int, help="tokens per sequence")
    g.add_argument("--batch-size", type=int, help="sequences per optimiser step over all processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    g.add_argument("--steps", type=int, help="optimiser steps in total (a resumed run continues to this)")
    g.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--sequence-parallel", type=int, default=1, metavar="P",
        help="split each sequence over P processes of a torchrun job (P divides --nproc-per-node; the "
        "groups of P are data-parallel replicas); a run may resume with another P",
    )  # fmt: skip
    g.add_argument(
        "--curriculum-start", type=int, metavar="L0",
        help="reverse / sort: train on examples of L0 tokens centred in the --seq-len positions, doubling "
        "the length when the training loss falls below --curriculum-loss (docs/seq2seq.md)",
    )  # fmt: skip
    g.add_argument("--curriculum-loss", type=float, help="the curriculum's loss threshold (default 0.3 nats)")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    g.add_argument("--eval-batches", type=int, help="held-out batches per evaluation")
    g.add_argument("--save-every", type=int, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, help="steps between metrics lines")
    g.add_argument(
        "--log", nargs="+", metavar="NAME",
        help="loggers beside metrics.jsonl: tensorboard (RUN/tensorboard; the [tensorboard] extra) or one "
        "registered with reformer.train.loggers.register_logger",
    )  # fmt: skip
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )
    g.add_argument("--no-sample", action="store_true", help="do not print a sample / eval at the end")
    o = p.add_argument_group("optimiser (AdamW)")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--warmup", type=int, help="linear warm-up steps")
    o.add_argument("--schedule", choices=SCHEDULES, help="rsqrt (independent of --steps) or cosine "
                   "(to --cosine-steps)")  # fmt: skip
    o.add_argument(
        "--cosine-steps", type=int,
        help="horizon of the cosine schedule (default: --steps, also when --resume changes --steps)",
    )  # fmt: skip
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--clip", type=float, help="gradient-norm clipping (0: none)")
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--d-ff", type=int)
    m.add_argument("--attn-layers", help="comma-separated lsh/local/full per layer, or one kind for all")
    m.add_argument("--bucket-size", type=int, help="LSH chunk length")
    m.add_argument("--n-hashes", type=int, help="LSH hash rounds")
    m.add_argument(
        "--lsh-key-rule", choices=KEY_RULES, help="own_bucket: truly causal LSH (keys of the query's own "
        "bucket before it); chunks: trax/HF's sorted chunks (later tokens move earlier outputs)",
    )  # fmt: skip
    m.add_argument("--local-chunk-size", type=int, help="local attention chunk length")
    m.add_argument("--dropout", type=float)
    m.add_argument("--hash-seed", type=int, help="fix the hash rotations (default: fresh every step)")
    m.add_argument(
        "--reversible", action=argparse.BooleanOptionalAction,
        help="reversible residual layers (memory flat in depth; the backward recomputes each layer)",
    )  # fmt: skip
    m.add_argument(
        "--position-embedding", choices=("axial", "sinusoidal"),
        help="learned axial (default) or fixed sinusoidal positions (docs/seq2seq.md)",
    )  # fmt: skip
    m.add_argument("--cross-attention", choices=("full", "lsh"), help="encoder-decoder tasks: exact or LSH")
    m.add_argument("--cross-n-heads", type=int, help="cross-attention heads (default: --n-heads)")
    m.add_argument("--cross-n-hashes", type=int, help="LSH cross-attention hash rounds")
    m.add_argument("--cross-chunk-size", type=int, help="LSH cross-attention query chunk length")
    m.add_argument("--cross-n-buckets", type=int, help="LSH cross-attention buckets (default: 2 per chunk)")
    m.add_argument("--cross-window", type=int, help="LSH cross-attention keys per query chunk")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset settings overridden by the flags given on the command line."""
    preset_name = args.preset or default_preset(args.task)
    preset = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset_name].items()}
    if args.task == "lm" and preset.get("task") == "copy":
        raise ValueError(f"--preset {preset_name} is a copy-task preset; drop --task lm or pick tiny/enwik8")
    cfg = TrainConfig(**preset)
    given = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None
    }
    if "clip" in given and given["clip"] == 0:
        given["clip"] = None
    cfg = replace(cfg, **given)
    if args.data:
        cfg.data = [str(Path(d).resolve()) for d in args.data]
    encoder_settings(args, cfg)
    model = dict(cfg.model)
    for name in MODEL_FLAGS:
        if getattr(args, name, None) is not None:
            model[name] = getattr(args, name)
    if args.attn_layers:
        kinds = tuple(k.strip() for k in args.attn_layers.split(","))
        model["attn_layers"] = kinds * model.get("n_layers", len(kinds)) if len(kinds) == 1 else kinds
        if len(kinds) > 1 and args.n_layers is None:
            model["n_layers"] = len(kinds)
    elif args.n_layers is not None and "attn_layers" in model:
        pattern = model["attn_layers"]
        model["attn_layers"] = tuple(pattern[i % len(pattern)] for i in range(args.n_layers))
    if model.get("axial_pos_shape") and len(model["axial_pos_shape"]) == 1:  # plain learned positions
        model["axial_pos_shape"], model["axial_pos_dims"] = (cfg.seq_len,), (model["d_model"],)
    elif args.seq_len is not None or args.d_model is not None:  # re-derive the axial factorisation
        model.pop("axial_pos_shape", None)
        model.pop("axial_pos_dims", None)
    if args.seq_len is not None:
        model.pop("max_seq_len", None)
    # Recorded in train_config.json, so that a resumed run keeps the rule it started with.
    causal = cfg.task not in ENCODER_TASKS and model.get("causal", True)
    model.setdefault("lsh_key_rule", default_key_rule(causal))
    cfg.model = model
    return cfg


def default_preset(task: str | None) -> str:
    """The preset a task starts from when --preset is not given."""
    presets = {
        "copy": "copy",
        "listops": "listops",
        "reverse": "seq2seq",
        "sort": "seq2seq",
        "pairs": "seq2seq",
    }
    return presets.get(task, "tiny")


def resumed_config(args: argparse.Namespace, run: Path) -> TrainConfig:
    """The saved run's settings with the run-control flags (``RESUMABLE_OVERRIDES``) applied.

    Other flags, ``--preset`` and ``--data`` included, may repeat the command line that started the run:
    each must agree with the saved run, and every one that does not is named with both values.
    """
    saved = TrainConfig.from_dict(read_json_object(run / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    stored, described = saved.to_dict(), config_from_args(args).to_dict()
    # (flag, setting, whether it is a model setting): the flags given, then what --preset sets.
    checks = [(f.name, f.name, False) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None]
    checks += [(n, n, True) for n in (*MODEL_FLAGS, "attn_layers") if getattr(args, n, None) is not None]
    if args.preset:
        checks += [("preset", n, False) for n in PRESETS[args.preset] if n != "model"]
        checks += [("preset", n, True) for n in sorted({*stored["model"], *described["model"]})]
    changes, conflicts, checked = {}, [], set()
    for flag, name, in_model in checks:
        if (name, in_model) in checked:
            continue
        checked.add((name, in_model))
        if not in_model and name in RESUMABLE_OVERRIDES:
            if flag == name:  # a preset's run-control values do not move a resumed run; flags do
                changes[name] = described[name]
            continue
        value = (described["model"] if in_model else described).get(name)
        saved_value = (stored["model"] if in_model else stored).get(name)
        if value != saved_value:
            who = (
                f"--preset {args.preset} sets {name} {value!r},"
                if flag == "preset"
                else f"{_flag(flag)} {value}"
            )
            conflicts.append((flag, f"{who} differs from the resumed run's {saved_value!r}"))
    if conflicts:
        drop = ", ".join(dict.fromkeys(_flag(flag) for flag, _ in conflicts))
        raise ValueError(
            "; ".join(text for _, text in conflicts)
            + ". A resumed run keeps its settings and may only change "
            + ", ".join(_flag(n) for n in RESUMABLE_OVERRIDES)
            + f": drop {drop} or give the saved values"
        )
    resumed = replace(saved, **changes)
    checkpoints = checkpoint_dirs(run)
    try:  # a damaged checkpoint is reported by the loop, which resumes from it
        step = (
            int(read_json_object(checkpoints[-1] / "trainer_state.json", "")["step"]) if checkpoints else None
        )
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        step = None
    note = None if step is None else schedule_change(saved, resumed, step)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr)
    return resumed


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = Path(args.out or f"runs/{args.preset or args.task or 'tiny'}")
    try:
        cfg = resumed_config(args, out) if args.resume else config_from_args(args)
        cfg.validate()
        cfg.model_config()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.resume and int(os.environ.get("RANK", "0")) == 0:  # the run's settings now: --steps ...
        atomic_write_text(out / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    try:
        result = train(
            cfg, out, resume=args.resume, device=args.device, sequence_parallel=args.sequence_parallel
        )
    except (TrainingError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    print(
        f"saved {out} (step {result.step}): " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    )
    if not args.no_sample and cfg.task in SEQ2SEQ_TASKS:
        from .seq2seq import evaluate_seq2seq_run

        metrics = evaluate_seq2seq_run(out, n_hashes=8)
        print(f"held-out token accuracy with 8 hashes: {metrics['accuracy']:.4f}")
        return 0
    if not args.no_sample and cfg.task in ("lm", "copy"):
        model = ReformerLM.from_pretrained(out)
        if cfg.task == "lm":
            print("sample:\n" + sample_text(model))
        else:
            acc = evaluate_run(out, n_hashes=8)["accuracy"]
            print(f"copy-task accuracy with 8 hashes: {acc:.4f}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by reformer train (or a model folder)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this corpus's test split instead")
    p.add_argument("--n-hashes", type=int, help="LSH hash rounds at evaluation (default: as trained)")
    p.add_argument("--full-attention", action="store_true", help="exact attention in the LSH layers")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--truncate", action="store_true", help="classify: cut texts over max_seq_len")
    p.add_argument("--n-examples", type=int, default=2000, help="listops: generated test expressions")
    p.add_argument("--min-len", type=int, help="listops: test expressions are longer than this (default: "
                   "the run's --eval-min-len, else its --min-len)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="sequences per forward pass")
    p.add_argument("--device", help="cpu or cuda")


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if run_task(args.run) in ENCODER_TASKS:
        return run_encoder_eval(args)
    saved = Path(args.run) / TRAIN_CONFIG_FILE
    if saved.is_file() and read_json_object(saved, "the run folder is damaged").get("task") in SEQ2SEQ_TASKS:
        from .seq2seq import evaluate_seq2seq_run

        metrics = evaluate_seq2seq_run(args.run, n_hashes=args.n_hashes, device=args.device)
        print("\n".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return 0
    try:
        metrics = evaluate_run(
            args.run, data=args.data, n_hashes=args.n_hashes, max_tokens=args.max_tokens,
            batch_size=args.batch_size, full_attention=args.full_attention, device=args.device,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"loss={metrics['loss']:.4f} nats")
    key = "accuracy" if "accuracy" in metrics else "bits_per_byte"
    print(f"{key}={metrics[key]:.4f}")
    return 0
