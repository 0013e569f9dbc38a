"""The benchmark protocol shared by ``reformer bench`` and ``benchmarks/``: one warm-up and the median of
timed forward+backward steps with the peak memory above a baseline, each configuration in a fresh worker
process (its own peak memory, a hang cut off) that reports one tagged result line."""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .memory import RssSampler, hwm_bytes, reset_hwm, rss_bytes

MIB = 1024 * 1024
RESULT_TAG = "@@reformer-bench "


def measure(step: Callable[[], None], repeats: int, device: str) -> dict[str, Any]:
    """One warm-up ``step()`` and ``repeats`` timed ones: median ms and peak MiB above the baseline."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        sync()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = rss_bytes()
        hwm_ok = reset_hwm()

    t0 = time.perf_counter()
    step()
    sync()
    warmup_ms = (time.perf_counter() - t0) * 1e3

    times: list[float] = []
    if cuda:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() - baseline
        how = "cuda max_memory_allocated"
    else:
        with RssSampler() as sampler:
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        # Without a reset VmHWM holds the start-up peak, so only the sampler counts then.
        peak = max(sampler.peak, hwm_bytes()) if hwm_ok else sampler.peak
        peak -= baseline
        how = "rss sampler + VmHWM" if hwm_ok else "rss sampler"
    return {
        "ms": round(statistics.median(times), 3),
        "times_ms": [round(t, 3) for t in times],
        "warmup_ms": round(warmup_ms, 3),
        "peak_mib": round(max(peak, 0) / MIB, 2),
        "baseline_mib": round(baseline / MIB, 2),
        "memory": how,
    }


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def limit_memory(gib: float) -> None:
    """Cap this process's address space at ``gib`` GiB (0: no cap), so a blow-up fails as out of memory."""
    if gib > 0:
        limit = int(gib * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def emit_result(result: dict[str, Any]) -> None:
    """The worker's answer: one tagged JSON line on stdout, which :func:`run_worker` reads."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run_worker(cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the worker command ``cmd`` and return its result (:func:`emit_result`) plus ``wall_s``; a worker
    that runs past ``timeout_s``, is killed (most likely by the kernel's out-of-memory killer) or crashes
    gets ``status`` ``timeout``, ``oom-killed`` or ``crashed`` and an ``error``."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over --timeout {timeout_s:g} s", "wall_s": timeout_s}
    wall_s = round(time.perf_counter() - start, 3)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            if result.get("status") != "ok" and proc.stderr.strip():
                result["stderr_tail"] = _tail(proc.stderr)
            return {**result, "wall_s": wall_s}
    status = "oom-killed" if proc.returncode == -9 else "crashed"
    return {"status": status, "error": f"exit code {proc.returncode}: {_tail(proc.stderr)}", "wall_s": wall_s}
