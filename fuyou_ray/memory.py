"""Honest accounting of a process's own memory use, and the per-process logging set-up of actors."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass


def setup_logging(role: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    return logging.getLogger(f"fuyou.{role}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class MemoryReport:
    """A process's resident memory: at its baseline (after imports) and at its peak since then."""

    role: str
    pid: int
    baseline_rss: int
    peak_rss: int

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak_rss - self.baseline_rss)


class MemoryMeter:
    """Measures peak RSS above the interpreter + torch baseline of this process.

    The peak counter (VmHWM) is reset by writing 5 to /proc/self/clear_refs - at construction, and again by
    `reset()` once the process has finished starting (for a Ray actor: after its first call, when the
    worker's own threads and buffers exist) - so the peak covers fuyou-ray's own allocations (ring pages
    touched, working buffers) from then on.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.baseline = 0
        self.reset()

    def reset(self) -> None:
        """Start measuring from now: baseline = current RSS, peak counter reset to it."""
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.baseline = _status_kib("VmRSS") * 1024

    def report(self) -> MemoryReport:
        peak = _status_kib("VmHWM") * 1024
        return MemoryReport(self.role, os.getpid(), self.baseline, max(peak, self.baseline))
