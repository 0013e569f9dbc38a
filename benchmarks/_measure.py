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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from reformer.bench import RssSampler, hwm_bytes, mem_total_bytes, reset_hwm, rss_bytes

MIB = 1024 * 1024
__all__ = ["Measurement", "RssSampler", "mem_total_bytes", "measure", "reset_hwm", "rss_bytes"]


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
    hwm = (hwm_bytes() - baseline) / MIB
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
