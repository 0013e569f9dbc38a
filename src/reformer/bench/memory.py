"""Peak memory probes on Linux: the resident set (``/proc/self/statm``), sampled by a thread, and the
kernel's high-water mark ``VmHWM``, resettable through ``/proc/self/clear_refs``."""

from __future__ import annotations

import os
import threading

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


def hwm_bytes() -> int:
    """The kernel's peak resident set (``VmHWM``) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmHWM is not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mem_total_bytes() -> int:
    """Physical memory of the machine in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Records the largest resident set seen every ``interval_s`` while active (a daemon thread)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
