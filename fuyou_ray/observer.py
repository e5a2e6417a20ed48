"""Watching a run: the one object the driver tells about each committed step.

The driver builds a `RunObserver` with `build_observer(...)` once its actors are up and calls
`on_step(record, spans)` after each committed step and `on_end(result)` after the run's summary.json is
written. The observer fans each step out to:
- the progress display (fuyou_ray.progress): a line per step in job logs, a bar on a terminal;
- Ray metrics (fuyou_ray.metrics), when this process is connected to Ray;
- the run report (fuyou_ray.report), rebuilt in a background thread every `report_every` steps (and at
  least `report_min_s` apart) and once more at the end.
Cluster facts that a step does not carry (bytes on SSD, actor restarts) are sampled every `sample_s`.

Nothing here may stop training: a failing metric, report or probe is logged and skipped.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fuyou_ray.metrics import RunMetrics, step_stats
from fuyou_ray.progress import Progress
from fuyou_ray.timeline import Span

log = logging.getLogger("fuyou")

REPORT_EVERY = 10  # steps between report refreshes during a run
REPORT_MIN_S = 60.0  # ... and at least this many seconds
SAMPLE_S = 10.0  # seconds between samples of SSD bytes and actor restarts


class ClusterProbe:
    """Samples what the actors know and the steps don't: bytes on SSD and restarts per actor.

    `executor` is the run's Executor (`call`/`get`/`roles`); restarts are read from Ray's actor table
    when the actors are Ray actors (a process of its own has none).
    """

    def __init__(self, executor: Any, names: Mapping[str, str], timeout_s: float = 10.0) -> None:
        self.executor = executor
        self.names = dict(names)  # role -> actor name, e.g. "ssd" -> "fuyou:ssd-io"
        self.timeout_s = timeout_s

    def ssd_bytes(self) -> int | None:
        stats = self.executor.get(self.executor.call("ssd", "stats"), timeout=self.timeout_s)
        value = stats.get("bytes_on_ssd", stats.get("bytes_stored"))
        return int(value) if value is not None else None

    def restarts(self) -> dict[str, int]:
        """Restarts of each of this run's actors, keyed by role tag (gpu-compute, ssd-io, cpu-opt-0, ...)."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized() or not hasattr(self.executor, "handles"):
            return {}
        # ray.util.state needs a dashboard, which a CLI run's local cluster has not: read the GCS table.
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        by_name = {a.get("Name"): a for a in state.actors(job_id=ray.JobID.from_hex(job)).values()}
        out = {}
        for name in self.names.values():
            if name in by_name:
                out[name.removeprefix("fuyou:")] = int(by_name[name].get("NumRestarts", 0))
        return out


class RunObserver:
    """Progress, metrics and report of one `train` call.

    Lifecycle: built by the driver (`build_observer`) before its first step, used as a context manager
    around the step loop (leaving it closes the progress display; leaving it with an error refreshes the
    report so it shows the last committed step), `on_step` per committed step, `on_end` once at the end.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        start: int,
        total: int,
        tokens_per_step: int,
        log_every: int = 1,
        ring_slots: int | None = None,
        metrics: RunMetrics | None = None,
        probe: ClusterProbe | None = None,
        progress: Progress | None = None,
        report_every: int = REPORT_EVERY,
        report_min_s: float = REPORT_MIN_S,
        sample_s: float = SAMPLE_S,
        build_report: Callable[..., Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total = total
        self.tokens_per_step = tokens_per_step
        self.ring_slots = ring_slots
        self.metrics = metrics
        self.probe = probe
        self.progress = progress or Progress(start, total, log_every=log_every)
        self.report_every = report_every
        self.report_min_s = report_min_s
        self.sample_s = sample_s
        if build_report is None:
            from fuyou_ray.report import build_report as build_report_default

            build_report = build_report_default
        self._build_report = build_report
        self._last_report_step = start
        self._last_report_t = time.monotonic()
        self._last_sample_t = -float("inf")
        self._report_thread: threading.Thread | None = None
        if metrics is not None and ring_slots is not None:
            metrics.record_plan(ring_slots)
        self._sample()

    # ------------------------------------------------------------------------------ the driver's hooks

    def on_step(self, record: Any, spans: Sequence[Span]) -> None:
        """After a committed step: `record` is its StepRecord, `spans` every actor's timeline of it."""
        stats = step_stats(record, spans, self.ring_slots)
        grad_norm, lr = float(record.grad_norm), float(record.lr)
        eta_s = self.progress.update(stats, grad_norm=grad_norm, lr=lr)
        if self.metrics is not None:
            self.metrics.record_step(stats, self.tokens_per_step, grad_norm=grad_norm, lr=lr, eta_s=eta_s)
        if time.monotonic() - self._last_sample_t >= self.sample_s:
            self._sample()
        steps_since = stats.step - self._last_report_step
        if steps_since >= self.report_every and time.monotonic() - self._last_report_t >= self.report_min_s:
            self._refresh_report_in_background(stats.step)

    def on_end(self, result: Any = None) -> None:
        """Once the run's summary.json is written: final metrics sample and the final report."""
        self.close()
        io = getattr(result, "io", None) or {}
        if self.metrics is not None and "bytes_stored" in io:
            self.metrics.record_cluster(int(io.get("bytes_on_ssd", io["bytes_stored"])), {})
        self._wait_for_report()
        self._report(final=True)

    # ------------------------------------------------------------------------------ context manager

    def __enter__(self) -> RunObserver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if exc_type is not None:
            self._wait_for_report()
            self._report(final=False)

    def close(self) -> None:
        self.progress.close()

    # ------------------------------------------------------------------------------ helpers

    def _sample(self) -> None:
        self._last_sample_t = time.monotonic()
        if self.metrics is None or self.probe is None:
            return
        try:
            self.metrics.record_cluster(self.probe.ssd_bytes(), self.probe.restarts())
        except Exception as exc:
            log.debug("sampling the cluster for metrics failed: %s", exc)

    def _report(self, final: bool) -> None:
        try:
            files = self._build_report(self.run_dir, final=final)
            if final:
                log.info("run report: %s", getattr(files, "html", files))
        except Exception as exc:
            log.warning("writing the run report failed (training goes on): %s", exc)

    def _refresh_report_in_background(self, step: int) -> None:
        if self._report_thread is not None and self._report_thread.is_alive():
            return  # the previous refresh is still being written
        self._last_report_step = step
        self._last_report_t = time.monotonic()
        self._report_thread = threading.Thread(
            target=self._report, args=(False,), name="fuyou-report", daemon=True
        )
        self._report_thread.start()

    def _wait_for_report(self) -> None:
        if self._report_thread is not None:
            self._report_thread.join()
            self._report_thread = None


def build_observer(cfg: Any, plan: Any, run_dir: str | Path, start: int, executor: Any) -> RunObserver:
    """The observer of a `train` call: Ray metrics when connected to Ray, progress, report."""
    metrics = None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            job = ray.get_runtime_context().get_job_id()
            metrics = RunMetrics(Path(run_dir).name, cfg.steps, job=job)
        except Exception as exc:
            log.warning("Ray metrics are off for this run: %s", exc)
    from fuyou_ray.executor import display_name

    probe = ClusterProbe(executor, {role: display_name(role) for role in executor.roles})
    return RunObserver(
        run_dir,
        start=start,
        total=cfg.steps,
        tokens_per_step=cfg.batch.global_batch * cfg.batch.seq_len,
        log_every=cfg.log_every,
        ring_slots=plan.num_slots,
        metrics=metrics,
        probe=probe,
    )
