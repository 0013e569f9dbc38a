"""Small measurement helpers for the CPU benchmarks: resident memory and step timing.

Memory is read from ``/proc/self`` (Linux only). The peak above a baseline is taken two ways:

* a background thread samples the resident set size (``/proc/self/statm``) every few milliseconds
  while the timed steps run, and
* the kernel's high-water mark ``VmHWM`` (``/proc/self/status``), reset right after the baseline is
  taken by writing ``5`` to ``/proc/self/clear_refs`` where the kernel allows it.

The reported peak is the larger of the two, so a short spike the sampler missed still counts.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MIB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


def status_bytes(name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{name} is not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mem_total_bytes() -> int:
    """Physical memory of the machine, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemTotal is not in /proc/meminfo")


class RssSampler:
    """Context manager that records the largest RSS seen while it is active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            if self._stop.wait(self.interval_s):
                break

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Measurement:
    """Timing and memory of one configuration (seconds and MiB above the baseline RSS)."""

    time_s: float
    times_s: list[float]
    warmup_s: float
    peak_mib: float
    peak_sampled_mib: float
    peak_hwm_mib: float
    baseline_mib: float
    hwm_reset: bool
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(step: Callable[[], None], repeats: int, interval_s: float = 0.005) -> Measurement:
    """Baseline RSS, one warm-up ``step()``, then ``repeats`` timed steps under an RSS sampler.

    ``step`` must leave no state behind that grows from call to call (clear gradients inside it).
    The time is the median of the timed steps; the peak covers warm-up and timed steps through
    VmHWM and the timed steps through the sampler.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    gc.collect()
    baseline = rss_bytes()
    hwm_reset = reset_hwm()

    t0 = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - t0

    times: list[float] = []
    with RssSampler(interval_s) as sampler:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)

    sampled = (sampler.peak - baseline) / MIB
    hwm = (status_bytes("VmHWM") - baseline) / MIB
    return Measurement(
        time_s=statistics.median(times),
        times_s=times,
        warmup_s=warmup_s,
        peak_mib=max(sampled, hwm),
        peak_sampled_mib=sampled,
        peak_hwm_mib=hwm,
        baseline_mib=baseline / MIB,
        hwm_reset=hwm_reset,
        samples=sampler.samples,
    )
