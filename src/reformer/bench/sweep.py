"""The sweep: every configuration in a fresh worker process (``python -m reformer.bench``), one row each,
and the environment the rows were measured in."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .memory import mem_total_bytes
from .protocol import emit_result, is_oom, limit_memory, measure, run_worker
from .workloads import BenchConfig, build_step


def run_in_process(cfg: BenchConfig) -> dict[str, Any]:
    """Build and measure ``cfg`` in this process; returns ``status`` and the measurement (never raises
    for a failing configuration)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    try:
        if cfg.device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(cfg.device))  # memory statistics follow this device
        step = build_step(cfg)
        out.update(measure(step, cfg.repeats, cfg.device), status="ok")
    except Exception as err:
        out.update(status="oom" if is_oom(err) else "error", error=f"{type(err).__name__}: {err}")
    return out


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``python -m reformer.bench CONFIG_JSON MEM_LIMIT_GIB``; prints one result line."""
    cfg = BenchConfig(**json.loads(argv[0]))
    mem_limit_gib = float(argv[1]) if len(argv) > 1 else 0.0
    if not cfg.device.startswith("cuda"):
        limit_memory(mem_limit_gib)
    emit_result(run_in_process(cfg))
    return 0


def base_row(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "impl": cfg.impl,
        "what": cfg.what,
        "length": cfg.length,
        "batch": cfg.batch,
        "tokens": cfg.batch * cfg.length,
        "hashes": cfg.hashes,
        "layers": cfg.layers,
        "reversible": cfg.reversible,
        "dtype": cfg.dtype,
        "repeats": cfg.repeats,
        "ms": None,
        "peak_mib": None,
        "status": None,
    }


def run_config(cfg: BenchConfig, timeout_s: float, mem_limit_gib: float = 0.0) -> dict[str, Any]:
    """Measure ``cfg`` in a fresh subprocess; returns its row (``status`` says how it went)."""
    row = base_row(cfg)
    src = str(Path(__file__).resolve().parents[2])  # importable even when the package is not installed
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "reformer.bench", json.dumps(asdict(cfg)), str(mem_limit_gib)]
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return {**row, **run_worker(cmd, timeout_s, env)}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, threads: int) -> dict[str, Any]:
    from ..version import __version__

    return {
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "threads": threads if threads > 0 else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": round(mem_total_bytes() / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "reformer_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def sweep(
    configs: Sequence[BenchConfig],
    timeout_s: float,
    mem_limit_gib: float = 0.0,
    env: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration (a tqdm bar on stderr); rows carry the environment's device name,
    torch version and threads."""
    from tqdm.auto import tqdm

    env = env or environment(configs[0].device if configs else "cpu", configs[0].threads if configs else 0)
    shared = {k: env[k] for k in ("device", "device_name", "torch_version", "threads")}
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        configs, desc="reformer bench", unit="config", disable=None if progress is None else not progress
    )
    # Without a terminal the bar is off; unless asked for silence, log one line per configuration instead.
    log_lines = progress is None and bar.disable
    for n, cfg in enumerate(bar, 1):
        label = f"{cfg.impl} L={cfg.length}" + (f" batch={cfg.batch}" if cfg.batch > 1 else "")
        bar.set_postfix_str(label)
        row = run_config(cfg, timeout_s, mem_limit_gib)
        rows.append({**row, **{k: row.get(k, v) for k, v in shared.items()}})
        if row["status"] == "ok":
            detail = f"{row['ms']:.1f} ms, {row['peak_mib']:.0f} MiB"
        else:
            detail = f"{row['status']}: {row.get('error', '')}"
        if log_lines or row["status"] != "ok":
            bar.write(f"[{n}/{len(configs)}] {label}: {detail}", file=sys.stderr)
    bar.close()
    return rows
