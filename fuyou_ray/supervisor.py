"""Supervision of the step loop: a failed or hung actor costs at most the step in progress.

The driver runs each step through `Supervisor.run`. When an actor dies (kill -9, OOM, a crash in native
code) or stops making progress, the step's futures fail; the supervisor then

1. lets the step's other calls settle, so nothing is still writing while it rolls back;
2. waits for Ray to restart the dead actors (`max_restarts=-1`: Ray always restarts; this class decides
   when to give up) - a restarted actor re-runs `__init__`, which maps the ring again and, for the SSD
   actor, reopens the store: what the failed attempt staged is dropped, what it published stays;
3. counts the restarts: more than `runtime.max_restarts` in `runtime.restart_window_s` stops the run with
   a `RestartLimitError` naming the actors and the last failure, instead of looping;
4. rolls the SSD actor back to the committed state plus the published units, and replays the step. The
   batch of step s depends only on (seed, s) and every input of an update is read again from SSD, so the
   replay computes exactly what the first attempt would have; units already published are skipped.

The same holds before the first step: opening or initialising the store (`start`) is replayed after a
restart, and an actor that dies in its constructor (mapping the ring, opening the store) is restarted and
counted like any other; one whose constructor raises stops the run with that error, under its own name.

A hang is a step that makes no progress (no call finishes) for `runtime.hang_timeout_s`: the actors of
the calls that should be running are killed and restarted, and the step replays as above. Errors raised by
the actors' own code (a corrupted record, a full disk, a bad config) are not retried: the attempt is rolled
back and the error stops the run with its own message; committed state is intact and a re-run resumes.

`run_guard()` turns SIGTERM (`ray job stop`, `kill`) into the same clean unwinding as Ctrl-C.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from fuyou_ray.config import RuntimeConfig
from fuyou_ray.errors import NonFiniteStepError, RestartLimitError, RunStateError, find_cause
from fuyou_ray.executor import Executor
from fuyou_ray.schedule import StepInputs, StepSchedule

log = logging.getLogger("fuyou.supervisor")

T = TypeVar("T")

MAX_CONSECUTIVE_SKIPS = 3  # with on_nonfinite: skip, more non-finite steps in a row than this stop the run
RESTART_TIMEOUT_S = 300.0  # how long a restarted actor may take to be ready again


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`ray job stop`, `kill`): unwind like Ctrl-C, cleaning up on the way out."""


@contextlib.contextmanager
def run_guard(on_signal: Callable[[], None] = lambda: None) -> Iterator[None]:
    """While training, SIGTERM raises `Terminated` in the main thread so every `with` and `finally` runs
    (ring segments removed, actors stopped, staged files deleted). `on_signal` runs first, at once: `ray
    job stop` follows SIGTERM with SIGKILL a few seconds later, so the ring's segments go before anything
    that may take longer. Off the main thread (where signals cannot be caught) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(Exception):
            on_signal()
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def step_key(inputs: StepInputs) -> str:
    """A digest of everything a step's updates depend on besides the stored state: hyper-parameters,
    clipping, micro-batching and the batch itself. Units of one step are published only under one key."""
    h = hashlib.sha256()
    h.update(repr((inputs.step, inputs.hp, inputs.max_grad_norm, inputs.micro_batch)).encode())
    h.update(repr(inputs.param_dtype).encode())
    for t in (inputs.inputs, inputs.targets):
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class ResumePoint:
    """Where the store stands for the step about to run."""

    done_units: frozenset[int] = frozenset()  # units whose update of this step is already durable
    committed_meta: Mapping[str, Any] | None = None  # set when the step turns out to be committed already


class RestartBudget:
    """Counts actor restarts in a sliding window; more than `limit` in `window_s` raises."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.events: collections.deque[tuple[float, str]] = collections.deque()
        self.total = 0

    def record(self, roles: list[str], reason: str, committed: int | None) -> None:
        """Count restarts of `roles`; `committed` is the committed step (None before the run has opened
        its store)."""
        now = self.clock()
        for role in roles:
            self.events.append((now, role))
        self.total += len(roles)
        while self.events and now - self.events[0][0] > self.window_s:
            self.events.popleft()
        if len(self.events) > self.limit:
            counts = collections.Counter(role for _, role in self.events)
            who = ", ".join(f"{role} x{n}" for role, n in counts.most_common())
            at = "" if committed is None else f" at step {committed}"
            raise RestartLimitError(
                f"{len(self.events)} actor restarts in the last {self.window_s / 60:.0f} min ({who}), more "
                f"than runtime.max_restarts = {self.limit}; last failure: {reason}. Committed state is "
                f"intact{at}: fix the cause and re-run to resume (or raise runtime.max_restarts / lower "
                "runtime.restart_window_s)"
            )


class Supervisor:
    """Runs steps to their commit through actor failures. Owns the restart budget and the skip count.

    Lifecycle: one per `train` call, created once the actors exist; `run(step, attempt)` per step.
    """

    def __init__(self, ex: Executor, runtime: RuntimeConfig) -> None:
        self.ex = ex
        self.runtime = runtime
        self.budget = RestartBudget(runtime.max_restarts, runtime.restart_window_s)
        self.skips_in_a_row = 0
        self._skipped = False
        self.recoveries = 0
        self.restarts: dict[str, int] = {}
        self.ex.restarted_roles()  # start counting from here

    # ------------------------------------------------------------------------------------ the step

    def run(self, step: int, attempt: Callable[[], T]) -> T:
        """Call `attempt()` (which runs 0-based step `step` to its commit) until it succeeds."""
        self._skipped = False
        result = self._until_done(step, attempt)
        if not self._skipped:
            self.skips_in_a_row = 0
        return result

    def query(self, step: int, role: str, method: str, *args: Any) -> Any:
        """One idempotent call outside a step (stats, checkpoints), repeated after a recovery if needed;
        `step` is the committed step at the time."""
        return self._until_done(step, lambda: self.ask(role, method, *args))

    def retry(self, step: int, work: Callable[[], T]) -> T:
        """Idempotent work between steps (an evaluation): run again after a recovery if an actor dies."""
        return self._until_done(step, work)

    def start(self, work: Callable[[], T]) -> T:
        """Idempotent set-up before the first step (opening or initialising the store, reading what it
        committed): run again after a recovery if an actor dies. A store initialisation cut short commits
        nothing, so the next attempt starts it afresh."""
        return self._until_done(None, work)

    def ask(self, role: str, method: str, *args: Any) -> Any:
        """A control call whose actor must answer within runtime.hang_timeout_s (else it is restarted)."""
        return self.ex.ask(role, method, *args, timeout_s=self.runtime.hang_timeout_s)

    def _until_done(self, step: int | None, attempt: Callable[[], T]) -> T:
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not self.ex.is_actor_failure(exc):
                    self._roll_back(step)
                    raise
                try:
                    self._recover(step, exc)
                except Exception:
                    # The run stops here (the restart limit, a store that moved): drop what the failed
                    # attempt staged, as a recovery would have, so the stop leaves only committed state.
                    self._roll_back(step, timeout_s=15)
                    raise

    def execute(self, sched: StepSchedule) -> list[Any]:
        """Issue the schedule and wait for its commit, watching for hangs; on any failure the step's other
        calls are left to finish (or fail) before the error propagates, so a rollback races nothing."""
        futures = self.ex.run(sched)
        try:
            self.ex.wait_step(sched, futures, self.runtime.hang_timeout_s)
            self.ex.get(futures[sched.commit])
        except KeyboardInterrupt:
            raise  # shutdown stops the actors; the SSD actor drains its own I/O first
        except BaseException:
            self.ex.settle(futures, timeout_s=max(30.0, self.runtime.hang_timeout_s))
            raise
        return futures

    def resume_point(self, step: int, key: str) -> ResumePoint:
        """What the store already holds of 0-based step `step` (replays, resumes after a crash)."""
        committed, meta = self.ask("ssd", "committed")
        if committed == step + 1:
            return ResumePoint(committed_meta=meta)
        if committed != step:
            raise RunStateError(
                f"the store is at step {committed} but the run expected step {step}: was the SSD directory "
                "replaced or restored under a running job? Re-run to resume from the store's step"
            )
        pending = self.ask("ssd", "pending")
        if pending is None:
            return ResumePoint()
        pending_step, units, pending_meta = pending
        if pending_step != step + 1 or pending_meta.get("step_key") != key:
            raise RunStateError(
                f"step {pending_step} was interrupted after updating units {units}, with other inputs than "
                "this config gives it (optimizer, batch or data settings changed): re-run with the config "
                "the run was started with, or restore a checkpoint (fuyou-ray checkpoint --restore)"
            )
        log.info(
            "step %d: units %s were updated before the interruption; replaying the rest", step + 1, units
        )
        return ResumePoint(done_units=frozenset(units))

    def skip_nonfinite(self, step: int, exc: BaseException, meta: Mapping[str, Any]) -> bool:
        """Apply runtime.on_nonfinite to a step that produced NaN/inf: True once the step is committed as
        skipped (weights and moments unchanged); otherwise the error propagates."""
        cause = find_cause(exc, NonFiniteStepError)
        if cause is None:
            return False
        if self.runtime.on_nonfinite != "skip":
            raise cause from exc
        self.skips_in_a_row += 1
        self._skipped = True
        if self.skips_in_a_row > MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteStepError(
                f"{self.skips_in_a_row} non-finite steps in a row (up to step {step + 1}); stopping. {cause}"
            ) from exc
        self.ask("ssd", "skip", step + 1, {**meta, "skipped": str(cause)})
        log.warning("step %d skipped (runtime.on_nonfinite: skip): %s", step + 1, cause)
        return True

    # ------------------------------------------------------------------------------------ recovery

    def _recover(self, step: int | None, exc: BaseException) -> None:
        """Bring the actors back and roll the store back; a failure during recovery (another kill) is
        recovered from in turn, and counts against the same restart budget."""
        while True:
            try:
                self._recover_once(step, exc)
                return
            except Exception as again:
                if not self.ex.is_actor_failure(again):
                    raise
                exc = again

    def _recover_once(self, step: int | None, exc: BaseException) -> None:
        """`step` is the 0-based step in progress; None before the first one (the store being opened)."""
        t0 = time.monotonic()
        reason = _one_line(exc)
        where = "start-up" if step is None else f"step {step + 1}"
        log.warning("%s: %s; recovering", where, reason)
        restarted: list[str] = []

        def count(roles: list[str]) -> None:
            # A role restarted a second time in one recovery died again in its constructor (mapping the
            # ring, opening the store): counted at once, so an actor that can no longer start stops the run
            # at the restart limit instead of being restarted forever.
            again = sorted({r for i, r in enumerate(roles) if r in restarted or r in roles[:i]})
            restarted.extend(roles)
            for role in roles:
                self.restarts[role] = self.restarts.get(role, 0) + 1
            why = f"{', '.join(again)} died again while restarting, after {reason}" if again else reason
            self.budget.record(roles, why, committed=step)  # raises past runtime.max_restarts

        self.ex.wait_alive(RESTART_TIMEOUT_S, self.runtime.hang_timeout_s, on_restart=count)
        if later := self.ex.restarted_roles():
            count(later)
        if not restarted:
            count(["(no restart seen)"])
        committed = self.ask("ssd", "rollback")
        if step is None:
            self.recoveries += 1
            log.warning("recovered in %.1f s (restarted: %s)", time.monotonic() - t0, ", ".join(restarted))
            return
        if committed not in (step, step + 1):
            raise RunStateError(
                f"after restarting {', '.join(restarted)} the store is at step {committed}, not {step}: was "
                "the SSD directory removed or replaced mid-run? Restore it (or a checkpoint) and re-run"
            )
        self.recoveries += 1
        log.warning(
            "recovered in %.1f s (restarted: %s; %d restarts in total); replaying step %d",
            time.monotonic() - t0,
            ", ".join(restarted),
            self.budget.total,
            step + 1,
        )

    def _roll_back(self, step: int | None, timeout_s: float = 60) -> None:
        """Drop what a failed attempt staged (best effort: the error that stops the run matters more).

        An SSD actor that is still restarting refuses calls (ActorUnavailableError); it is asked again
        until `timeout_s`, because its restart is what removes the files its dead predecessor staged (the
        store's open) - a stop that did not wait for it would leave them on the SSD."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.ex.ask("ssd", "rollback", timeout_s=max(1.0, deadline - time.monotonic()))
                return
            except Exception as exc:
                if not self.ex.is_actor_failure(exc) or time.monotonic() >= deadline:
                    return
                time.sleep(0.2)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
