"""Progress of a run in the job log: one line per logged step, or a tqdm bar on a terminal.

`ray job logs --follow` and CI capture stdout as a file, where a redrawing bar turns into noise, so away
from a terminal every logged step is one self-contained line (what Ray's `tqdm_ray` does for workers):

    step 12/40 loss 2.3456 grad_norm 0.812 lr 2.85e-03 0.42s 4,876 tok/s 0.0031 TFLOPS eta 0:00:12 \
bottleneck gpu compute 81%

On a terminal the same numbers ride on a tqdm bar. `parse_line` reads a line back (`fuyou-ray status`
falls back to it when the cluster exports no metrics).
"""

from __future__ import annotations

import math
import re
import sys
from collections import deque
from typing import Any, TextIO

from fuyou_ray.metrics import StepStats

ETA_WINDOW = 20  # steps the ETA averages over


def format_duration(seconds: float) -> str:
    """0:00:12, 3:25:07, 2d 03:25:07; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    clock = f"{hours}:{minutes:02d}:{s:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{s:02d}" if days else clock


class EtaEstimator:
    """Seconds left, from the mean duration of recent steps (the first step of a process, which pays for
    warm-up, is dropped once others are known)."""

    def __init__(self, total: int, window: int = ETA_WINDOW) -> None:
        self.total = total
        self.recent: deque[float] = deque(maxlen=window)
        self.first: float | None = None

    def update(self, step: int, seconds: float) -> float:
        if self.first is None:
            self.first = seconds
        else:
            self.recent.append(seconds)
        mean = sum(self.recent) / len(self.recent) if self.recent else self.first
        return max(0, self.total - step) * mean


def format_line(
    stats: StepStats, total: int, *, grad_norm: float, lr: float, eta_s: float | None = None
) -> str:
    """The log line of one step (see the module docstring)."""
    loss = f"{stats.loss:.4f}" if math.isfinite(stats.loss) else str(stats.loss)
    line = (
        f"step {stats.step}/{total} loss {loss} grad_norm {grad_norm:.3f} lr {lr:.2e} "
        f"{stats.seconds:.2f}s {stats.tokens_per_s:,.0f} tok/s {stats.tflops:.4f} TFLOPS"
    )
    if eta_s is not None:
        line += f" eta {format_duration(eta_s)}"
    if stats.bottleneck:
        line += f" bottleneck {stats.bottleneck} {stats.bottleneck_percent:.0f}%"
    return line


_LINE = re.compile(
    r"step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) grad_norm (?P<grad_norm>\S+) lr (?P<lr>\S+) "
    r"(?P<seconds>[\d.]+)s (?P<tokens_per_s>[\d,.]+) tok/s (?P<tflops>[\d.]+) TFLOPS"
    r"(?: eta (?P<eta>\S+(?: \S+)?))?(?: bottleneck (?P<bottleneck>[a-z0-9 ]+?) (?P<busy>\d+)%)?\s*$"
)


def parse_line(line: str) -> dict[str, Any] | None:
    """The fields of a progress line (as written by `format_line`), or None if it is not one."""
    m = _LINE.search(line)
    if m is None:
        return None
    d = m.groupdict()
    return {
        "step": int(d["step"]),
        "total": int(d["total"]),
        "loss": float(d["loss"]),
        "grad_norm": float(d["grad_norm"]),
        "lr": float(d["lr"]),
        "seconds": float(d["seconds"]),
        "tokens_per_s": float(d["tokens_per_s"].replace(",", "")),
        "tflops": float(d["tflops"]),
        "eta": d["eta"],
        "bottleneck": d["bottleneck"],
        "bottleneck_percent": float(d["busy"]) if d["busy"] else None,
    }


class Progress:
    """Shows each committed step: a tqdm bar on a terminal, else one line per `log_every` steps.

    Lifecycle: created when the first step is about to run (`start` = steps already committed),
    `update` after each committed step, `close` at the end (also on errors).
    """

    def __init__(
        self,
        start: int,
        total: int,
        *,
        log_every: int = 1,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ) -> None:
        self.total = total
        self.log_every = max(1, log_every)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.eta = EtaEstimator(total)
        self.bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, stats: StepStats, *, grad_norm: float, lr: float) -> float:
        """Show one committed step; returns the ETA in seconds."""
        eta_s = self.eta.update(stats.step, stats.seconds)
        if self.bar is not None:
            postfix = {
                "loss": f"{stats.loss:.4f}",
                "tok/s": f"{stats.tokens_per_s:,.0f}",
                "TFLOPS": f"{stats.tflops:.3f}",
            }
            if stats.bottleneck:
                postfix["bottleneck"] = f"{stats.bottleneck} {stats.bottleneck_percent:.0f}%"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif stats.step % self.log_every == 0 or stats.step >= self.total:
            print(format_line(stats, self.total, grad_norm=grad_norm, lr=lr, eta_s=eta_s), file=self.stream)
            self.stream.flush()
        return eta_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
