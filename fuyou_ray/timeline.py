"""Per-resource busy intervals: what each lane (GPU compute, H2D, D2H, SSD read/write, CPU Adam) did when.

Each actor owns a `Timeline` and wraps its work in `span(lane, label)`; the driver drains the actors'
timelines after a step and merges them (wall-clock times from `time.time()`, comparable across the
processes of one machine). Reports draw the lanes; benchmarks sum busy time per lane.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# "cache read" / "cache write": the SSD actor serving a record from / into the host cache (/dev/shm).
LANES = (
    "gpu compute",
    "h2d",
    "d2h",
    "ssd read",
    "ssd write",
    "cache read",
    "cache write",
    "cpu adam",
    "driver",
)


@dataclass(frozen=True)
class Span:
    """One busy interval of one lane."""

    lane: str
    label: str
    start: float
    end: float
    nbytes: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Timeline:
    """A bounded, thread-safe list of spans; `drain()` hands them over and starts afresh."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.enabled = True

    @contextlib.contextmanager
    def span(self, lane: str, label: str, nbytes: int = 0) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(Span(lane, label, start, time.time(), nbytes))

    def add(self, span: Span) -> None:
        if not self.enabled:
            return
        with self._lock:
            if len(self._spans) < self.capacity:
                self._spans.append(span)

    def drain(self) -> list[Span]:
        with self._lock:
            spans, self._spans = self._spans, []
        return spans


def busy_seconds(spans: Sequence[Span], lane: str) -> float:
    """Time a lane was busy: the length of the union of its intervals (overlapping spans count once)."""
    intervals = sorted((s.start, s.end) for s in spans if s.lane == lane)
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total
