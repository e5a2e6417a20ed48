"""The data-parallel training loop: N pipelines, one batch split N ways, one committed step for the job.

`train_data_parallel(cfg)` is what `fuyou_ray.train` runs when `runtime.data_parallel > 1`. It reads like
the single-pipeline driver: check everything, build the pipelines, reconcile their stores to one committed
step, then per step build every pipeline's schedule, run them as one, and commit the job in two phases
(each store votes that the step is whole in it, then the driver commits every store).

Failures: an actor that dies or hangs takes the step in progress with it. The driver tears every pipeline
down, counts it against `runtime.max_restarts` within `runtime.restart_window_s` (exceeded: exit code 6,
`RestartLimitError`), builds the pipelines again and replays the step on all of them from the stores'
committed state (fuyou_ray/parallel/commit.py). A killed driver is the same failure seen from outside: the
same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuyou_ray.config import ConfigError, RunConfig, format_size, save_config
from fuyou_ray.data import TokenDataset
from fuyou_ray.driver import (
    StepRecord,
    TrainResult,
    connect_ray,
    eval_due,
    model_fingerprint,
    prepare_run_dir,
    recorded_step,
    write_timeline,
)
from fuyou_ray.errors import BudgetError, NonFiniteStepError, RunStateError, find_cause
from fuyou_ray.memory import MemoryMeter
from fuyou_ray.models import ModelSpec
from fuyou_ray.observer import ClusterProbe, RunObserver
from fuyou_ray.optim import AdamWStep, learning_rate
from fuyou_ray.parallel.commit import StoreState, reconcile
from fuyou_ray.parallel.executor import PipelineSetup, PipelinesExecutor, actor_name
from fuyou_ray.parallel.schedule import PipelineStep, build_pipeline_step, merge, role
from fuyou_ray.parallel.shards import (
    JobLayout,
    ShardGeometry,
    check_layout,
    pipeline_config,
    read_layout,
    write_layout,
)
from fuyou_ray.plan import Plan, make_plan
from fuyou_ray.ring import SHM_DIR, RingError, remove_stale_segments
from fuyou_ray.schedule import StepInputs, build_eval
from fuyou_ray.store import check_ssd_path
from fuyou_ray.supervisor import MAX_CONSECUTIVE_SKIPS, RestartBudget, run_guard, step_key
from fuyou_ray.timeline import LANES, Span, busy_seconds

log = logging.getLogger("fuyou.parallel")


@dataclass(frozen=True)
class JobPlan:
    """The pipelines of a job (each with its config and plan) and how the state is split among them."""

    pipelines: list[PipelineSetup]
    geometry: ShardGeometry

    @property
    def world(self) -> int:
        return len(self.pipelines)

    @property
    def plan(self) -> Plan:
        return self.pipelines[0].plan

    def to_dict(self) -> dict[str, Any]:
        """plan.json of a data-parallel run: pipeline 0's plan plus the job's shape."""
        return {
            **self.plan.to_dict(),
            "data_parallel": self.world,
            "pipeline_ssd_paths": [list(p.config.ssd.paths) for p in self.pipelines],
            "pipeline_ssd_bytes_needed": [p.plan.ssd_bytes_needed for p in self.pipelines],
        }


def plan_job(cfg: RunConfig, spec: ModelSpec, cpu_count: int | None = None) -> JobPlan:
    """Each pipeline's plan: its share of the batch and of the machine's cores, its store's space."""
    world = cfg.runtime.data_parallel
    geometry = ShardGeometry(spec, world)
    cpus = max(1, (cpu_count or os.cpu_count() or 1) // world)
    pipelines = []
    for rank in range(world):
        pcfg = pipeline_config(cfg, rank)
        plan = make_plan(pcfg, spec, cpu_count=cpus)
        if plan.optimizer_range:
            raise BudgetError(
                f"data parallelism updates whole optimizer shards, but budgets.cpu_mem = "
                f"{format_size(pcfg.budgets.cpu_mem)} per pipeline only fits ring slots of optimizer ranges "
                f"({plan.optimizer_range:,} elements): raise budgets.cpu_mem, or run with "
                "runtime.data_parallel 1 (a single pipeline updates in ranges)"
            )
        pb = 2 if plan.param_dtype == "bfloat16" else 4
        need = geometry.state_bytes(rank, pb) + geometry.scratch_bytes(rank, pb, plan.exact_clipping)
        pipelines.append(PipelineSetup(rank, world, pcfg, dataclasses.replace(plan, ssd_bytes_needed=need)))
    return JobPlan(pipelines, geometry)


def train_data_parallel(
    cfg: RunConfig, *, stop_after: int | None = None, executor: str | None = None
) -> TrainResult:
    """Train (or resume) `cfg` over runtime.data_parallel pipelines; `stop_after` stops once that step is
    committed. The result's steps and memory cover every pipeline."""
    if (executor or cfg.runtime.executor) != "ray":
        raise ConfigError("runtime.data_parallel > 1 runs its pipelines as Ray actors: use executor 'ray'")
    meter = MemoryMeter("driver")
    spec = ModelSpec(cfg.model)
    job = plan_job(cfg, spec)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    for p in job.pipelines:
        for path in p.config.ssd.paths:
            check_ssd_path(path)
    run_dir = prepare_run_dir(cfg)
    check_layout(cfg, run_dir, job.geometry)
    layout = read_layout(run_dir) or JobLayout.new(cfg, job.geometry)
    remove_stale_segments()
    _check_shm(job)
    connect_ray(cfg)
    budget = RestartBudget(cfg.runtime.max_restarts, cfg.runtime.restart_window_s)
    results: list[TrainResult] = []  # one TrainResult across rebuilds, made once the stores are open
    while True:
        t0 = time.monotonic()
        ex = PipelinesExecutor(job.pipelines)
        log.info("%d pipelines ready in %.1f s", job.world, time.monotonic() - t0)
        try:
            with ex, run_guard(on_signal=ex.remove_rings):
                _train(ex, cfg, spec, job, layout, data, run_dir, stop_after, meter, results)
            break
        except Exception as exc:
            if not ex.is_actor_failure(exc):
                raise
            committed = results[0].final_step if results else 0
            budget.record([f"p{p.rank}" for p in job.pipelines], _one_line(exc), committed)
            log.warning(
                "an actor failed (%s): rebuilding all %d pipelines and replaying step %d",
                _one_line(exc),
                job.world,
                committed + 1,
            )
    (run_dir / "summary.json").write_text(json.dumps(_summary(results[0], job), indent=2))
    return results[0]


def _train(
    ex: PipelinesExecutor,
    cfg: RunConfig,
    spec: ModelSpec,
    job: JobPlan,
    layout: JobLayout,
    data: TokenDataset,
    run_dir: Path,
    stop_after: int | None,
    meter: MemoryMeter,
    results: list[TrainResult],
) -> None:
    """One incarnation of the pipelines: from the stores' committed step to the last step (or a failure).
    Appends to `results[0]` (created here on the first incarnation)."""
    start, meta = open_stores(ex, cfg, spec, job, layout, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    _restore_last_metrics(run_dir / "metrics.jsonl", start, meta)
    (run_dir / "plan.json").write_text(json.dumps(job.to_dict(), indent=2))
    if not results:
        results.append(TrainResult(str(run_dir), job.plan, start, start))
    result = results[0]
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    observer = _observer(cfg, job, run_dir, start, ex)
    skips = 0
    with observer, open(run_dir / "metrics.jsonl", "a") as metrics:
        for step in range(start, last):
            record, spans, skipped = run_step(ex, cfg, spec, job, layout, data, step)
            skips = skips + 1 if skipped else 0
            if skips > MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteStepError(
                    f"{skips} non-finite steps in a row (up to step {record.step}); stopping"
                )
            if eval_due(cfg, record.step):
                record.eval_loss = run_eval(ex, cfg, spec, job, data)
            write_timeline(run_dir / "timeline.json", record.step, spans)
            result.steps.append(record)
            result.final_step = record.step
            metrics.write(json.dumps(record.__dict__) + "\n")
            metrics.flush()
            observer.on_step(record, spans)
            if cfg.checkpoint.every and record.step % cfg.checkpoint.every == 0:
                cp = {"data_step": record.step, "seed": cfg.seed, "data_seed": cfg.data.seed}
                ex.get(
                    [ex.call(role(k, "ssd"), "checkpoint", cp, cfg.checkpoint.keep) for k in range(job.world)]
                )
        reports = [ex.get(ex.call(name, "memory_report")) for name in ex.roles] + [meter.report()]
        result.memory = [r.__dict__ | {"peak_above_baseline": r.peak_above_baseline} for r in reports]
        stats = ex.get([ex.call(role(k, "ssd"), "stats") for k in range(job.world)])
        result.io = {key: sum(s[key] for s in stats) for key in stats[0]}
        result.peak_device_bytes = max(
            ex.get([ex.call(role(k, "gpu"), "peak_device_bytes") for k in range(job.world)])
        )
    observer.on_end(result)


def open_stores(
    ex: PipelinesExecutor, cfg: RunConfig, spec: ModelSpec, job: JobPlan, layout: JobLayout, run_dir: Path
) -> tuple[int, Mapping[str, Any]]:
    """Bring every pipeline's store to the job's committed step (initialise a new job, finish an
    interrupted commit); returns that step and its meta. Refuses stores that do not belong together."""
    states = [
        StoreState.from_dict(s) for s in ex.get([ex.call(role(k, "ssd"), "state") for k in range(job.world)])
    ]
    fingerprint = model_fingerprint(cfg, job.plan)
    rec = reconcile(states, layout, fingerprint, spec.num_units)
    metrics = run_dir / "metrics.jsonl"
    if rec.committed < 0 and metrics.is_file() and metrics.stat().st_size > 0:
        raise RunStateError(
            f"{metrics} records committed steps, but the pipelines' stores are empty: were the SSD "
            "directories removed or replaced? Restore them (or a checkpoint), or use a new run_dir"
        )
    if rec.initialize:
        if rec.committed < 0:
            _check_ssd_space(job)
        write_layout(run_dir, layout)  # before the stores: they name the run it records
        calls = [
            ex.call(
                role(k, "ssd"),
                "initialize_shard",
                cfg.seed,
                job.plan.param_dtype,
                {"fingerprint": fingerprint, "shard": layout.shard_meta(k)},
            )
            for k in rec.initialize
        ]
        nbytes = ex.get(calls)
        log.info(
            "initialised %s of weights and optimizer shards on SSD (%d pipelines)",
            format_size(sum(nbytes)),
            job.world,
        )
        return 0, {}
    for k in rec.commit:
        log.warning("pipeline %d: finishing the commit of step %d (interrupted)", k, rec.committed)
        ex.get(
            ex.call(role(k, "ssd"), "commit", rec.committed, {**rec.meta, "shard": layout.shard_meta(k)}, {})
        )
    for k in rec.skip:
        ex.get(ex.call(role(k, "ssd"), "skip", rec.committed, {**rec.meta, "shard": layout.shard_meta(k)}))
    if rec.committed > cfg.steps:
        raise RunStateError(f"the stores are at step {rec.committed}, beyond steps={cfg.steps}; raise steps")
    log.info("resuming from committed step %d (%d pipelines)", rec.committed, job.world)
    return rec.committed, rec.meta


def run_step(
    ex: PipelinesExecutor,
    cfg: RunConfig,
    spec: ModelSpec,
    job: JobPlan,
    layout: JobLayout,
    data: TokenDataset,
    step: int,
) -> tuple[StepRecord, list[Span], bool]:
    """Run 0-based step `step` on every pipeline and commit it for the job; returns what it measured,
    pipeline 0's timeline, and whether the step was skipped (runtime.on_nonfinite: skip)."""
    t0 = time.perf_counter()
    b, world = cfg.batch, job.world
    batch = data.batch(step, b.global_batch, b.seq_len)
    o = cfg.optimizer
    lr = learning_rate(o, step, cfg.steps)
    whole = StepInputs(
        step=step,
        inputs=batch.inputs,
        targets=batch.targets,
        micro_batch=b.micro_batch,
        hp=AdamWStep(step + 1, lr, o.betas[0], o.betas[1], o.eps, o.weight_decay),
        max_grad_norm=o.max_grad_norm,
        param_dtype=job.plan.param_dtype,
        pool_size=job.plan.optimizer_actors,
        commit_meta={},
    )
    key = step_key(whole)  # the same key as a single-pipeline run of this step
    meta = {"fingerprint": model_fingerprint(cfg, job.plan), "lr": lr, "data_step": step + 1, "step_key": key}
    _check_pending(ex, job, step, key)
    per = b.global_batch // world
    schedules = []
    for p in job.pipelines:
        rows = slice(p.rank * per, (p.rank + 1) * per)
        mine = dataclasses.replace(
            whole, inputs=batch.inputs[rows].clone(), targets=batch.targets[rows].clone(), step_key=key
        )
        pstep = PipelineStep(p.rank, world, mine, accum=b.global_batch // b.micro_batch)
        schedules.append(build_pipeline_step(spec, ex.rings[p.rank], job.geometry, pstep))
    plan = merge(schedules)
    pb = 2 if job.plan.param_dtype == "bfloat16" else 4
    ex.get(
        [
            ex.call(role(k, "ssd"), "reserve", job.geometry.scratch_bytes(k, pb, job.plan.exact_clipping))
            for k in range(world)
        ]
    )
    futures = ex.run(plan.sched)
    try:
        ex.wait_prepared(plan, futures, cfg.runtime.hang_timeout_s)
    except Exception as exc:
        cause = find_cause(exc, NonFiniteStepError)
        if cause is None or ex.is_actor_failure(exc):
            raise
        if cfg.runtime.on_nonfinite != "skip":
            raise cause from exc
        # Exact clipping refuses a non-finite step on every pipeline before any update: commit it unchanged.
        ex.settle(futures, timeout_s=60.0)
        skipped = {**meta, "skipped": str(cause)}
        ex.get(
            [
                ex.call(role(k, "ssd"), "skip", step + 1, {**skipped, "shard": layout.shard_meta(k)})
                for k in range(world)
            ]
        )
        log.warning("step %d skipped (runtime.on_nonfinite: skip): %s", step + 1, cause)
        return recorded_step(step, {"lr": lr}), [], True
    summary = ex.get(futures[plan.summaries[0]])
    # Phase 2: every pipeline voted; the step becomes the job's committed step store by store (a crash in
    # between is finished by the next start: fuyou_ray/parallel/commit.py).
    ex.get(
        [
            ex.call(role(k, "ssd"), "commit", step + 1, {**meta, "shard": layout.shard_meta(k)}, summary)
            for k in range(world)
        ]
    )
    seconds = time.perf_counter() - t0
    spans: list[Span] = []
    for name in ex.roles:
        drained = ex.get(ex.call(name, "drain_timeline"))
        if name.startswith(role(0, "")):
            spans += drained
    tokens = b.global_batch * b.seq_len
    flops = spec.flops_per_token(b.seq_len) * tokens
    return (
        StepRecord(
            step=step + 1,
            loss=summary["loss"],
            grad_norm=summary["grad_norm"],
            lr=lr,
            seconds=seconds,
            tokens_per_s=tokens / seconds,
            tflops=flops / seconds / 1e12,
            busy={
                lane: round(busy_seconds(spans, lane), 6)
                for lane in LANES
                if any(s.lane == lane for s in spans)
            },
        ),
        spans,
        False,
    )


def _check_pending(ex: PipelinesExecutor, job: JobPlan, step: int, key: str) -> None:
    """A step partly published before an interruption must be replayed with the same inputs."""
    for k, pending in enumerate(ex.get([ex.call(role(k, "ssd"), "pending") for k in range(job.world)])):
        if pending is None:
            continue
        pending_step, units, pending_meta = pending
        if pending_step != step + 1 or pending_meta.get("step_key") != key:
            raise RunStateError(
                f"pipeline {k}: step {pending_step} was interrupted after updating units {units}, with other "
                "inputs than this config gives it (optimizer, batch or data settings changed): re-run with "
                "the config the run was started with, or restore a checkpoint"
            )
        if units:
            log.info("pipeline %d: step %d had units %s published; replaying the step", k, step + 1, units)


def run_eval(
    ex: PipelinesExecutor, cfg: RunConfig, spec: ModelSpec, job: JobPlan, data: TokenDataset
) -> float:
    """Held-out loss of the committed weights, through pipeline 0 (every store holds the full params)."""
    total, scored = 0.0, 0
    b = cfg.batch
    for batch in data.eval_batches(cfg.data.eval_batches, b.global_batch, b.seq_len):
        sched = build_eval(
            spec, ex.rings[0], batch.inputs, batch.targets, b.micro_batch, job.plan.param_dtype
        )
        merged = merge([sched]).sched
        loss_sum, count = ex.get(ex.run(merged)[merged.summary])
        total, scored = total + loss_sum, scored + count
    for name in ex.roles:
        ex.get(ex.call(name, "drain_timeline"))
    return total / max(scored, 1)


# ---------------------------------------------------------------------------------------------- checks


def _check_shm(job: JobPlan) -> None:
    """The rings of the pipelines placed on this node must fit /dev/shm (all of them, on one node)."""
    need = sum(p.plan.ring_bytes for p in job.pipelines)
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise RingError(
            f"/dev/shm has {free / 2**20:.0f} MiB free but the {job.world} pipelines' rings need "
            f"{need / 2**20:.0f} MiB: enlarge /dev/shm (docker --shm-size) or lower budgets.cpu_mem"
        )


def _check_ssd_space(job: JobPlan) -> None:
    """Refuse a new job when a filesystem lacks room for the pipeline stores it holds (each pipeline's
    need spread evenly over its directories)."""
    need: dict[int, int] = {}
    free: dict[int, tuple[int, str]] = {}
    for p in job.pipelines:
        for path in p.config.ssd.paths:
            st = os.statvfs(path)
            dev = os.stat(path).st_dev
            free[dev] = (st.f_bavail * st.f_frsize, path)
            need[dev] = need.get(dev, 0) + p.plan.ssd_bytes_needed // len(p.config.ssd.paths)
    for dev, n in need.items():
        have, path = free[dev]
        if have < n * 1.01:
            raise BudgetError(
                f"{path}: {format_size(have)} free but the pipeline stores on that filesystem need "
                f"{format_size(n)} (full params and 1/{job.world} of the optimizer state each, plus a step's "
                "new versions); free space or add directories to ssd.paths"
            )


# ---------------------------------------------------------------------------------------------- records


def _restore_last_metrics(path: Path, committed: int, meta: Mapping[str, Any]) -> None:
    """A job killed between its commit and the metrics line of that step: write the missing line."""
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1])["step"] if lines else 0
    if committed != last + 1 or committed == 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(recorded_step(committed - 1, meta).__dict__) + "\n")


class _PipelinesProbe(ClusterProbe):
    """Bytes on SSD summed over the pipelines' stores."""

    def ssd_bytes(self) -> int | None:
        ex = self.executor
        stats = ex.get([ex.call(n, "stats") for n in ex.roles if n.endswith(".ssd")], timeout=self.timeout_s)
        return sum(int(s.get("bytes_stored", 0)) for s in stats)


def _observer(cfg: RunConfig, job: JobPlan, run_dir: Path, start: int, ex: PipelinesExecutor) -> RunObserver:
    import ray

    from fuyou_ray.metrics import RunMetrics

    metrics = None
    try:
        metrics = RunMetrics(run_dir.name, cfg.steps, job=ray.get_runtime_context().get_job_id())
    except Exception as exc:
        log.warning("Ray metrics are off for this run: %s", exc)
    return RunObserver(
        run_dir,
        start=start,
        total=cfg.steps,
        tokens_per_step=cfg.batch.global_batch * cfg.batch.seq_len,
        log_every=cfg.log_every,
        ring_slots=job.plan.num_slots,
        metrics=metrics,
        probe=_PipelinesProbe(ex, {name: actor_name(name) for name in ex.roles}),
    )


def _summary(result: TrainResult, job: JobPlan) -> dict[str, Any]:
    return {
        "run_dir": result.run_dir,
        "start_step": result.start_step,
        "final_step": result.final_step,
        "plan": job.to_dict(),
        "memory": result.memory,
        "io": result.io,
        "last_loss": result.steps[-1].loss if result.steps else None,
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
