"""``reformer train``: the flags (made from the settings dataclasses of the run, the model and the chosen
task), the preset and ``--config`` file they override, resuming, and the run itself."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import read_json_object
from ..tasks import get_task, presets, task_names
from ..tasks import settings as typed
from .config import (
    LEGACY_TASK_KEYS,
    NESTED,
    TrainConfig,
    TrainingError,
    current_layout,
    default_preset,
    from_legacy_dict,
    other_tasks_setting,
    preset_config,
    read_train_config,
    saved_task,
)
from .loop import train
from .runs import load_run

OPTIMISER_SETTINGS = ("lr", "warmup", "schedule", "cosine_steps", "weight_decay", "clip")
# Settings a resumed run may change; everything else must match the saved run.
RESUMABLE_OVERRIDES = (
    "steps", "cosine_steps", "eval_every", "save_every", "log_every", "log", "max_minutes", "skip_nonfinite",
    "keep_best", "progress",
)  # fmt: skip
FOREIGN = "other_task."  # the dest prefix of the flags of other tasks (refused with their tasks named)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every run; :func:`add_task_arguments` adds those of the chosen task."""
    tasks = "; ".join(f"{name}: {get_task(name).about}" for name in task_names())
    p.add_argument("--task", help=f"what to train: {tasks}. `--task NAME --help` lists the task's flags")
    starts = "; ".join(f"{name}: {preset.about}" for name, preset in sorted(presets().items()))
    p.add_argument(
        "--preset", choices=sorted(presets()),
        help=f"model and run settings to start from: {starts} (default: the task's, tiny for lm)",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="FILE",
        help="settings to start from, in train_config.json's layout (any part of it; a saved run's file "
        "repeats the run); flags override them",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None,
        help="run folder (default: runs/<preset> with --preset, else runs/<task> with --task, else "
        "runs/tiny)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )


def add_task_arguments(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """The settings flags for the task ``argv`` chooses (``--task``, else that of ``--config``,
    ``--preset`` or the resumed run, else lm), their help ending with the value the run will use."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--task", "--preset", "--config", "--out"):
        pre.add_argument(flag)
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(list(argv))
    try:
        task = get_task(choose_task(known))
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    try:
        base = start_config(known, task.name)
    except (ValueError, FileNotFoundError):
        base = None  # reported when the command runs
    run = p.add_argument_group("run")
    typed.add_arguments(run, TrainConfig, base, skip=set(OPTIMISER_SETTINGS))
    run.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    run.add_argument(
        "--sequence-parallel", type=int, default=1, metavar="P",
        help="split each sequence over P processes of a torchrun job (P divides --nproc-per-node; the "
        "groups of P are data-parallel replicas); a run may resume with another P",
    )  # fmt: skip
    run.add_argument("--no-sample", action="store_true", help="do not print a sample / eval at the end")
    optimiser = p.add_argument_group("optimiser (AdamW)")
    skip = {f.name for f in typed.flag_fields(TrainConfig)} - set(OPTIMISER_SETTINGS)
    typed.add_arguments(optimiser, TrainConfig, base, skip=skip)
    typed.add_arguments(p.add_argument_group("model"), task.Model, base and base.model)
    if typed.flag_fields(task.Settings):
        group = p.add_argument_group(f"--task {task.name}")
        typed.add_arguments(group, task.Settings, base and base.task_settings)
    present = {a.dest for a in p._actions}
    for other in task_names():
        for cls in (get_task(other).Model, get_task(other).Settings):
            for f in typed.flag_fields(cls):
                if f.name not in present:
                    present.add(f.name)
                    p.add_argument(
                        typed.flag_name(f), dest=FOREIGN + f.name, nargs="*", help=argparse.SUPPRESS
                    )


def parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    """``reformer train``'s flags parsed from ``argv`` (for scripts)."""
    p = argparse.ArgumentParser(prog="reformer train")
    add_train_arguments(p)
    add_task_arguments(p, argv)
    return p.parse_args(list(argv))


def choose_task(known: argparse.Namespace, resumed: str | None = None) -> str:
    """--task, else the --config file's task, the --preset's, the resumed run's, else lm."""
    if known.task:
        return known.task
    if known.config and "task" in config_file(known.config):
        return config_file(known.config)["task"]
    if known.preset:
        preset = presets().get(known.preset)
        if preset is not None:
            return preset.task
    if resumed is None and known.resume:
        resumed = saved_task(Path(known.out or f"runs/{known.preset or known.task or 'tiny'}"))
    return resumed or TrainConfig.task


def config_file(path: str) -> dict[str, Any]:
    """A ``--config`` file as a partial ``train_config.json`` of the current layout."""
    data = read_json_object(Path(path), "give a JSON object in train_config.json's layout")
    if "format" not in data and any(k in data for k in LEGACY_TASK_KEYS):  # a run saved in the flat layout
        data = from_legacy_dict(data).to_dict()
    return current_layout(data, path)


def start_config(known: argparse.Namespace, task: str) -> TrainConfig:
    """The preset's settings for ``task`` with the ``--config`` file's over them."""
    preset = known.preset or default_preset(task)
    cfg = preset_config(preset, task)
    layer = config_file(known.config) if known.config else {}
    run = {k: v for k, v in layer.items() if k not in NESTED}
    model = typed.replace(cfg.model, layer.get("model", {}), f"--task {task} model")
    task_settings = typed.replace(cfg.task_settings, layer.get("task_settings", {}), f"--task {task}")
    return dataclasses.replace(cfg, **run, model=model, task_settings=task_settings)


def config_from_args(args: argparse.Namespace, resumed: str | None = None) -> TrainConfig:
    """The preset's settings, then the ``--config`` file's, then the flags given (``resumed``: the task
    of the run being resumed, used when nothing names one)."""
    task = get_task(choose_task(args, resumed))
    foreign = sorted(k for k, v in vars(args).items() if k.startswith(FOREIGN) and v is not None)
    if foreign:
        raise ValueError(other_tasks_setting(foreign[0][len(FOREIGN) :], task.name))
    cfg = start_config(args, task.name)
    layer = config_file(args.config) if args.config else {}
    run_given = typed.given(args, TrainConfig)
    if run_given.get("clip") == 0:
        run_given["clip"] = None
    model_given = typed.given(args, task.Model)
    task_given = typed.given(args, task.Settings)
    cfg = dataclasses.replace(
        cfg, **run_given, task_settings=typed.replace(cfg.task_settings, task_given, f"--task {task.name}")
    )
    seq_len_given = "seq_len" in run_given or "seq_len" in layer
    changes = {**layer.get("model", {}), **model_given}
    cfg.model = cfg.model.with_changes(changes, cfg.seq_len, seq_len_given, task.causal)
    task.finish_config(cfg, {*run_given, *model_given, *task_given})
    return cfg


def resumed_config(args: argparse.Namespace, run: Path) -> TrainConfig:
    """The saved run's settings with the run-control flags (``RESUMABLE_OVERRIDES``) applied.

    Other flags, ``--preset``, ``--config`` and ``--data`` included, may repeat the command line that
    started the run: each must agree with the saved run, and every one that does not is named with both
    values.
    """
    saved = read_train_config(run)
    stored = _flat(saved.to_dict())
    described = _flat(config_from_args(args, resumed=saved.task).to_dict())
    task = get_task(described["task"])
    # (flag, setting): the flags given, then what --preset and --config set.
    checks = [
        (f.name, f.name) for f in typed.flag_fields(TrainConfig) if getattr(args, f.name, None) is not None
    ]
    checks += [("task", "task")] if args.task else []
    for prefix, cls in (("model.", task.Model), ("task_settings.", task.Settings)):
        checks += [
            (f.name, prefix + f.name)
            for f in typed.flag_fields(cls)
            if getattr(args, f.name, None) is not None
        ]
    if args.preset:
        preset = presets()[args.preset]
        checks += [("preset", key) for key in ("task", *preset.run)]
        checks += [("preset", key) for key in sorted({*stored, *described}) if key.startswith("model.")]
        checks += [("preset", "task_settings." + key) for key in preset.task_settings]
    if args.config:
        checks += [("config", key) for key in _flat(config_file(args.config))]
    changes, conflicts, checked = {}, [], set()
    for flag, key in checks:
        if key in checked:
            continue
        checked.add(key)
        if key in RESUMABLE_OVERRIDES:
            if flag == key:  # a preset's run-control values do not move a resumed run; flags do
                changes[key] = described[key]
            continue
        value, saved_value = described.get(key), stored.get(key)
        if value != saved_value:
            name = key.rpartition(".")[2]
            if flag in ("preset", "config"):
                who = f"--preset {args.preset}" if flag == "preset" else f"--config {args.config}"
                who = f"{who} sets {name} {value!r},"
            else:
                who = f"{_flag(flag)} {value}"
            conflicts.append((flag, f"{who} differs from the resumed run's {saved_value!r}"))
    if conflicts:
        drop = ", ".join(dict.fromkeys(_flag(flag) for flag, _ in conflicts))
        raise ValueError(
            "; ".join(text for _, text in conflicts)
            + ". A resumed run keeps its settings and may only change "
            + ", ".join(_flag(n) for n in RESUMABLE_OVERRIDES)
            + f": drop {drop} or give the saved values"
        )
    return dataclasses.replace(saved, **changes)


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """``train_config.json``'s layout with the nested settings as ``model.NAME`` / ``task_settings.NAME``."""
    out = {}
    for key, value in data.items():
        if key in ("model", "task_settings"):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "format":
            out[key] = value
    return out


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
    try:
        result = train(
            cfg, out, resume=args.resume, device=args.device, sequence_parallel=args.sequence_parallel
        )
    except (TrainingError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    print(
        f"saved {out} (step {result.step}): " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    )
    if not args.no_sample:
        device = torch.device("cpu")
        _, task, model = load_run(out, device)
        for line in task.report(model, device):
            print(line)
    return 0
