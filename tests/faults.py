"""Fault injection for the fault suite: find this test session's actor processes and kill them.

Actors are found in /proc among the descendants of this process (the session's Ray cluster, started by
the `ray_cluster` fixture, runs under it), by the title Ray gives an actor's process: `ray::SSDIOActor`
while idle, `ray::fuyou:ssd-io:SSDIOActor.publish` while it runs `publish`. Actors of other sessions on
the same machine are never touched.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KINDS = {"gpu": "GPUComputeActor", "ssd": "SSDIOActor", "opt": "CPUOptimizerActor"}


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def actor_pids(kind: str) -> list[int]:
    """Live actor processes of `kind` ('gpu', 'ssd', 'opt') in this session's cluster."""
    marker = KINDS[kind]
    return [p for p in descendants(os.getpid()) if title(p).startswith("ray::") and marker in title(p)]


def all_actors_up() -> bool:
    """Every kind of actor has a process that is not (re)starting."""
    return all(any("__init__" not in title(p) for p in actor_pids(kind)) for kind in KINDS)


def fuyou_actor_processes() -> list[tuple[int, str]]:
    return [(p, title(p)) for kind in KINDS for p in actor_pids(kind)]


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()


@dataclass
class Kill:
    kind: str
    method: str  # what the actor was running when it died ('' = idle or unknown)
    step: int  # committed steps when it died


@dataclass
class FaultInjector:
    """A background thread that kills actors of a running `train` while it makes progress.

    `plan` lists (kind, method) pairs: kill an actor of `kind` as soon as it runs `method` ('' = at a
    random moment). Each kill waits until the run has recovered from the previous one (the actor is back
    and the run has made progress), so that kills land in steps, not in restarts.
    """

    metrics: Path
    plan: list[tuple[str, str]]
    seed: int = 0
    max_wait_s: float = 60.0
    target_wait_s: float = 5.0  # how long to wait for the chosen call before killing at any point
    sig: int = signal.SIGKILL  # SIGSTOP freezes the actor instead: a hang
    kills: list[Kill] = field(default_factory=list)
    missed: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultInjector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def committed(self) -> int:
        try:
            return len(self.metrics.read_text().splitlines())
        except OSError:
            return 0

    def _run(self) -> None:
        # The first kill waits for a committed step, the others for the previous restart to finish.
        if not wait_until(lambda: self.stop.is_set() or self.committed() > 0, self.max_wait_s, 0.01):
            return
        for kind, method in self.plan:
            if not wait_until(lambda: self.stop.is_set() or all_actors_up(), self.max_wait_s, 0.01):
                return
            time.sleep(self.rng.uniform(0.2, 0.8))
            if self.stop.is_set():
                return
            if not self._kill(kind, method):
                self.missed.append((kind, method))

    def _kill(self, kind: str, method: str) -> bool:
        """Kill an actor of `kind` once it runs `method`; after target_wait_s, whatever it runs."""
        deadline = time.monotonic() + self.max_wait_s
        give_up_target = time.monotonic() + self.target_wait_s
        pids: list[int] = []
        refreshed = 0.0
        while not self.stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() - refreshed > 0.2:  # a /proc scan is slow next to the titles' polling
                pids, refreshed = actor_pids(kind), time.monotonic()
            titles = {p: title(p) for p in pids}
            ready = [p for p, t in titles.items() if t and "__init__" not in t]
            if method and time.monotonic() < give_up_target:
                ready = [p for p in ready if f".{method}" in titles[p]]
            if ready:
                pid = self.rng.choice(ready)
                running = titles[pid].split(".")[-1].strip() if "." in titles[pid] else ""
                try:
                    os.kill(pid, self.sig)
                except ProcessLookupError:
                    continue
                self.kills.append(Kill(kind, running, self.committed()))
                wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 60, 0.01)
                return True
            time.sleep(0.0002 if method else 0.01)
        return False


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    target = str(path.resolve())
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def starting(kind: str) -> list[int]:
    """Actor processes of `kind` inside their constructor (Ray titles them `...__init__`)."""
    return [p for p in actor_pids(kind) if "__init__" in title(p)]


def opening_store(lock_file: Path) -> list[int]:
    """SSD actor processes inside their constructor that have the store's lock file open: they are opening
    the store (waiting for its lock, while a test holds it)."""
    return [p for p in starting("ssd") if has_open(p, lock_file)]


def kill_first(find: Callable[[], list[int]], timeout: float = 60.0) -> int:
    """kill -9 the first process `find` returns (polling until one shows up); returns once it is gone."""
    found: list[int] = []

    def look() -> bool:
        found[:] = find()
        return bool(found)

    if not wait_until(look, timeout, 0.05):
        raise TimeoutError(f"no process to kill showed up within {timeout:.0f} s")
    pid = found[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, 0.01)
    return pid
