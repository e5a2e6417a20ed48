"""What every actor shares: logging set-up and honest accounting of its own memory use."""

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

    The peak counter (VmHWM) is reset at construction by writing 5 to /proc/self/clear_refs, so the peak
    covers fuyou-ray's own allocations (ring pages touched, working buffers) from then on.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.baseline = _status_kib("VmRSS") * 1024

    def report(self) -> MemoryReport:
        peak = _status_kib("VmHWM") * 1024
        return MemoryReport(self.role, os.getpid(), self.baseline, max(peak, self.baseline))
