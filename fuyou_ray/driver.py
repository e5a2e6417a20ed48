"""The driver: the training loop. The only place that knows the whole step.

`train(cfg)` reads top to bottom: prepare the run dir, plan, create the ring and the actors, initialise or
resume the store, then for each step build its schedule, run it, and record what it did. Everything a step
changes on SSD is published by the step's commit; a run stopped at any point resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuyou_ray.config import RunConfig, format_size, save_config
from fuyou_ray.data import TokenDataset
from fuyou_ray.errors import RunStateError
from fuyou_ray.executor import ActorSetup, Executor, LocalExecutor, RayExecutor
from fuyou_ray.memory import MemoryMeter
from fuyou_ray.models import ModelSpec
from fuyou_ray.observer import build_observer
from fuyou_ray.optim import AdamWStep, learning_rate
from fuyou_ray.plan import Plan, check_ssd_space, make_plan
from fuyou_ray.ring import Ring, make_spec, remove_stale_segments
from fuyou_ray.schedule import StepInputs, build_eval, build_step
from fuyou_ray.store import check_ssd_path
from fuyou_ray.timeline import LANES, Span, busy_seconds

log = logging.getLogger("fuyou")


@dataclass
class StepRecord:
    """What one committed step did; one line of metrics.jsonl."""

    step: int  # committed step number (1-based)
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens_per_s: float
    tflops: float
    busy: dict[str, float] = field(default_factory=dict)  # seconds each lane was busy during the step
    eval_loss: float | None = None  # held-out loss after this step (every data.eval_every steps)


@dataclass
class TrainResult:
    """What a call to `train` did: the steps it committed and each process's memory use."""

    run_dir: str
    plan: Plan
    start_step: int
    final_step: int
    steps: list[StepRecord] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    io: dict[str, int] = field(default_factory=dict)
    peak_device_bytes: int = 0  # CUDA memory high-water mark of the compute actor (0 on CPU)


def model_fingerprint(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    """What the store must agree with to be resumed by this config."""
    return {"model": cfg.to_dict()["model"], "param_dtype": plan.param_dtype, "seed": cfg.seed}


def train(cfg: RunConfig, *, stop_after: int | None = None, executor: str | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg`; `stop_after` stops once that step is committed."""
    meter = MemoryMeter("driver")
    # Everything that can be checked is checked before anything is written.
    spec = ModelSpec(cfg.model)
    plan = make_plan(cfg, spec)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    for path in cfg.ssd.paths:
        check_ssd_path(path)
    run_dir = prepare_run_dir(cfg)
    remove_stale_segments()
    with (
        Ring(make_spec(plan.slot_bytes, plan.num_slots)) as ring,
        build_executor(executor or cfg.runtime.executor, ActorSetup(cfg, plan, ring.spec)) as ex,
    ):
        start = open_store(ex, cfg, plan, spec)
        # Written only once the store has accepted this config: a refused start changes nothing.
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        result = TrainResult(str(run_dir), plan, start, start)
        last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        observer = build_observer(cfg, plan, run_dir, start, ex)
        with observer, open(run_dir / "metrics.jsonl", "a") as metrics:
            for step in range(start, last):
                record, spans = run_step(ex, cfg, plan, spec, data, step)
                if eval_due(cfg, record.step):
                    record.eval_loss = run_eval(ex, cfg, plan, spec, data)
                write_timeline(run_dir / "timeline.json", record.step, spans)
                result.steps.append(record)
                result.final_step = record.step
                metrics.write(json.dumps(record.__dict__) + "\n")
                metrics.flush()
                observer.on_step(record, spans)
        reports = [*_memory(ex), meter.report()]
        result.memory = [r.__dict__ | {"peak_above_baseline": r.peak_above_baseline} for r in reports]
        result.io = ex.get(ex.call("ssd", "stats"))
        result.peak_device_bytes = ex.get(ex.call("gpu", "peak_device_bytes"))
    (run_dir / "summary.json").write_text(json.dumps(_summary(result), indent=2))
    observer.on_end(result)
    return result


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunStateError(f"run_dir {run_dir} cannot be created ({exc.strerror}): fix run_dir") from exc
    return run_dir


def build_executor(kind: str, setup: ActorSetup) -> Executor:
    if kind == "local":
        return LocalExecutor(setup)
    connect_ray(setup.config)
    return RayExecutor(setup)


def connect_ray(cfg: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    num_cpus = cfg.runtime.ray_num_cpus or max(2, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def open_store(ex: Executor, cfg: RunConfig, plan: Plan, spec: ModelSpec) -> int:
    """Initialise a new store or check that an existing one is this run's; returns the committed step."""
    committed, meta = ex.get(ex.call("ssd", "committed"))
    fingerprint = model_fingerprint(cfg, plan)
    if committed < 0:
        check_ssd_space(cfg, plan)
        nbytes = ex.get(ex.call("ssd", "initialize", cfg.seed, plan.param_dtype, fingerprint))
        log.info("initialised %s of weights and optimizer state on SSD", format_size(nbytes))
        return 0
    stored = meta.get("fingerprint", {k: meta.get(k) for k in fingerprint})
    if stored != fingerprint:
        raise RunStateError(
            f"the store in {cfg.ssd.paths[0]} holds a different model or dtype ({stored}) than this config "
            f"({fingerprint}); use a new run_dir/ssd.paths or the config the run started with"
        )
    if committed > cfg.steps:
        raise RunStateError(f"the store is at step {committed}, beyond steps={cfg.steps}; raise steps")
    log.info("resuming from committed step %d", committed)
    return int(committed)


def run_step(
    ex: Executor, cfg: RunConfig, plan: Plan, spec: ModelSpec, data: TokenDataset, step: int
) -> tuple[StepRecord, list[Span]]:
    """Run 0-based step `step` to its commit; returns what it measured and its timeline."""
    t0 = time.perf_counter()
    batch = data.batch(step, cfg.batch.global_batch, cfg.batch.seq_len)
    o = cfg.optimizer
    lr = learning_rate(o, step, cfg.steps)
    hp = AdamWStep(step + 1, lr, o.betas[0], o.betas[1], o.eps, o.weight_decay)
    inputs = StepInputs(
        step=step,
        inputs=batch.inputs,
        targets=batch.targets,
        micro_batch=cfg.batch.micro_batch,
        hp=hp,
        max_grad_norm=o.max_grad_norm,
        param_dtype=plan.param_dtype,
        pool_size=plan.optimizer_actors,
        commit_meta={"fingerprint": model_fingerprint(cfg, plan), "lr": lr, "data_step": step + 1},
    )
    sched = build_step(spec, ex.ring_spec, inputs)
    futures = ex.run(sched)
    summary = ex.get(futures[sched.summary])
    ex.get(futures[sched.commit])
    seconds = time.perf_counter() - t0
    spans = [s for role in ex.roles for s in ex.get(ex.call(role, "drain_timeline"))]
    tokens = cfg.batch.global_batch * cfg.batch.seq_len
    flops = spec.flops_per_token(cfg.batch.seq_len) * tokens
    return StepRecord(
        step=step + 1,
        loss=summary["loss"],
        grad_norm=summary["grad_norm"],
        lr=lr,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        tflops=flops / seconds / 1e12,
        busy={
            lane: round(busy_seconds(spans, lane), 6) for lane in LANES if any(s.lane == lane for s in spans)
        },
    ), spans


def eval_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.data.eval_every
    return every > 0 and (step % every == 0 or step == cfg.steps)


def run_eval(ex: Executor, cfg: RunConfig, plan: Plan, spec: ModelSpec, data: TokenDataset) -> float:
    """Held-out loss of the committed weights: the fixed eval batches, streamed like training."""
    total, scored = 0.0, 0
    for batch in data.eval_batches(cfg.data.eval_batches, cfg.batch.global_batch, cfg.batch.seq_len):
        sched = build_eval(
            spec, ex.ring_spec, batch.inputs, batch.targets, cfg.batch.micro_batch, plan.param_dtype
        )
        loss_sum, count = ex.get(ex.run(sched)[sched.summary])
        total, scored = total + loss_sum, scored + count
    for role in ex.roles:  # evaluation is not part of the next step's timeline
        ex.get(ex.call(role, "drain_timeline"))
    return total / max(scored, 1)


def write_timeline(path: Path, step: int, spans: list[Span]) -> None:
    """The most recent step's per-lane busy intervals (seconds from the step's first span)."""
    t0 = min((s.start for s in spans), default=0.0)
    rows = [
        {**asdict(s), "start": s.start - t0, "end": s.end - t0} for s in sorted(spans, key=lambda s: s.start)
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "spans": rows}))
    os.replace(tmp, path)


def _memory(ex: Executor) -> list[Any]:
    return [ex.get(ex.call(role, "memory_report")) for role in ex.roles]


def _summary(result: TrainResult) -> dict[str, Any]:
    return {
        "run_dir": result.run_dir,
        "start_step": result.start_step,
        "final_step": result.final_step,
        "plan": result.plan.to_dict(),
        "memory": result.memory,
        "io": result.io,
        "last_loss": result.steps[-1].loss if result.steps else None,
    }
