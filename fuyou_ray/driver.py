"""The driver: the training loop. The only place that knows the whole step.

`train(cfg)` reads top to bottom: prepare the run dir, plan, create the ring and the actors, initialise or
resume the store, then for each step build its schedule, run it, and record what it did. Everything a step
changes on SSD is published by the step's commit; a run stopped at any point resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuyou_ray.cache import CacheArea, cache_prefix
from fuyou_ray.config import NEOX_ONLY_FIELDS, ModelConfig, RunConfig, format_size, save_config
from fuyou_ray.data import TokenDataset
from fuyou_ray.errors import ForwardLostError, RunStateError, find_cause
from fuyou_ray.executor import ActorSetup, Executor, LocalExecutor, RayExecutor
from fuyou_ray.memory import MemoryMeter
from fuyou_ray.models import ModelSpec
from fuyou_ray.observer import build_observer
from fuyou_ray.optim import AdamWStep, learning_rate
from fuyou_ray.parallel.shards import check_layout
from fuyou_ray.plan import Plan, cache_bytes, check_ssd_space, make_plan
from fuyou_ray.ring import Ring, make_spec, remove_stale_segments
from fuyou_ray.schedule import StepInputs, build_eval, build_step
from fuyou_ray.store import MANIFEST, STORE_DIR, check_ssd_path, step_scratch_bytes
from fuyou_ray.supervisor import Supervisor, run_guard, step_key
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
    model = cfg.to_dict()["model"]
    # Fields added with arch gpt_neox are left out while at their defaults: stores committed before they
    # existed hold fingerprints without them, and must still resume.
    defaults = ModelConfig()
    for name in NEOX_ONLY_FIELDS:
        if getattr(cfg.model, name) == getattr(defaults, name):
            del model[name]
    return {"model": model, "param_dtype": plan.param_dtype, "seed": cfg.seed}


def train(cfg: RunConfig, *, stop_after: int | None = None, executor: str | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg`; `stop_after` stops once that step is committed."""
    if cfg.runtime.data_parallel > 1:  # N pipelines: fuyou_ray/parallel/
        from fuyou_ray.parallel import train_data_parallel

        return train_data_parallel(cfg, stop_after=stop_after, executor=executor)
    meter = MemoryMeter("driver")
    # Everything that can be checked is checked before anything is written.
    spec = ModelSpec(cfg.model)
    plan = make_plan(cfg, spec)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    for path in cfg.ssd.paths:
        check_ssd_path(path)
    run_dir = prepare_run_dir(cfg)
    check_store_model(cfg, plan)
    check_layout(cfg, run_dir, None)  # a data-parallel run's dir is refused (ShardMismatchError)
    remove_stale_segments()
    with (
        Ring(make_spec(plan.slot_bytes, plan.num_slots)) as ring,
        CacheArea(cache_prefix(ring.spec), cache_bytes(spec, plan)),  # host cache files: removed last
        build_executor(executor or cfg.runtime.executor, ActorSetup(cfg, plan, ring.spec)) as ex,
        run_guard(on_signal=ring.close),  # after ray.init, which sets its own: SIGTERM unwinds like Ctrl-C
    ):
        supervisor = Supervisor(ex, cfg.runtime)  # restarts dead actors, replays the step in progress
        # An actor that dies while the store is opened or initialised is restarted and the opening replayed.
        start = supervisor.start(lambda: open_store(ex, cfg, plan, spec, run_dir))
        # Written only once the store has accepted this config: a refused start changes nothing.
        save_config(cfg, run_dir / "config.yaml")
        supervisor.start(lambda: restore_last_metrics(ex, run_dir / "metrics.jsonl", start))
        (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        result = TrainResult(str(run_dir), plan, start, start)
        last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        observer = build_observer(cfg, plan, run_dir, start, ex)
        ahead = ForwardAhead()
        with observer, open(run_dir / "metrics.jsonl", "a") as metrics:
            for step in range(start, last):
                # The next step's forward may run during this step's optimizer unless something else
                # uses the GPU between them (an evaluation) or there is no next step in this call.
                may_run_ahead = step + 1 < last and not eval_due(cfg, step + 1)
                attempt = functools.partial(
                    run_step, ex, supervisor, cfg, plan, spec, data, step, ahead, may_run_ahead
                )
                record, spans = supervisor.run(step, attempt)
                if eval_due(cfg, record.step):
                    evaluate = functools.partial(run_eval, ex, cfg, plan, spec, data)
                    record.eval_loss = supervisor.retry(record.step, evaluate)
                write_timeline(run_dir / "timeline.json", record.step, spans)
                result.steps.append(record)
                result.final_step = record.step
                metrics.write(json.dumps(record.__dict__) + "\n")
                metrics.flush()
                observer.on_step(record, spans)
                if cfg.checkpoint.every and record.step % cfg.checkpoint.every == 0:
                    meta = {"data_step": record.step, "seed": cfg.seed, "data_seed": cfg.data.seed}
                    supervisor.query(record.step, "ssd", "checkpoint", meta, cfg.checkpoint.keep)
        final = result.final_step
        supervisor.query(final, "ssd", "flush")  # a write-back host cache: the end is durable on SSD
        reports = [*(supervisor.query(final, role, "memory_report") for role in ex.roles), meter.report()]
        result.memory = [r.__dict__ | {"peak_above_baseline": r.peak_above_baseline} for r in reports]
        result.io = supervisor.query(final, "ssd", "stats")
        result.peak_device_bytes = supervisor.query(final, "gpu", "peak_device_bytes")
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
    # No dashboard for a run's own cluster (a `ray start --head` cluster has its own, on 127.0.0.1 in the
    # README's command); should one be turned on, it listens on loopback only.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )


def open_store(ex: Executor, cfg: RunConfig, plan: Plan, spec: ModelSpec, run_dir: Path) -> int:
    """Initialise a new store or check that an existing one is this run's; returns the committed step."""
    committed, meta = ex.get(ex.call("ssd", "committed"))
    fingerprint = model_fingerprint(cfg, plan)
    metrics = run_dir / "metrics.jsonl"
    if committed < 0 and metrics.is_file() and metrics.stat().st_size > 0:
        raise RunStateError(
            f"{metrics} records committed steps, but the store in {', '.join(cfg.ssd.paths)} is empty: was "
            "the SSD directory removed or replaced? Restore it (or a checkpoint), or use a new run_dir"
        )
    if committed < 0:
        check_ssd_space(cfg, plan)
        nbytes = ex.get(ex.call("ssd", "initialize", cfg.seed, plan.param_dtype, fingerprint))
        log.info("initialised %s of weights and optimizer state on SSD", format_size(nbytes))
        return 0
    check_fingerprint(cfg, meta, fingerprint)
    if committed > cfg.steps:
        raise RunStateError(f"the store is at step {committed}, beyond steps={cfg.steps}; raise steps")
    log.info("resuming from committed step %d", committed)
    return int(committed)


def check_fingerprint(cfg: RunConfig, meta: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    """Refuse a store whose committed metadata `meta` is of another model, dtype or seed."""
    stored = meta.get("fingerprint", {k: meta.get(k) for k in fingerprint})
    if not same_model(stored, fingerprint):
        raise RunStateError(
            f"the store in {cfg.ssd.paths[0]} holds a different model or dtype ({stored}) than this config "
            f"({fingerprint}); use a new run_dir/ssd.paths or the config the run started with"
        )


def same_model(stored: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether a store's fingerprint and this config's agree. Model fields added to ModelConfig after the
    store was made are absent from its fingerprint: they agree while this config leaves them at their
    defaults (a run started with an older fuyou-ray resumes with a newer one)."""
    if stored == current:
        return True
    old, new = stored.get("model"), current.get("model")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return False
    rest = {k: v for k, v in stored.items() if k != "model"}
    if rest != {k: v for k, v in current.items() if k != "model"}:
        return False
    defaults = RunConfig().to_dict()["model"]
    if any(k not in new for k in old):
        return False
    return all(old[k] == v if k in old else k in defaults and v == defaults[k] for k, v in new.items())


def check_store_model(cfg: RunConfig, plan: Plan) -> None:
    """Refuse a store of another model before any process opens it. Opening a store deletes the record
    files its manifest does not name (what a crash left staged), which under another model's manifest
    would be this run's own records. A manifest that is missing or unreadable is left to the store."""
    try:
        meta = json.loads((Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST).read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(meta, dict):
        check_fingerprint(cfg, meta, model_fingerprint(cfg, plan))


def restore_last_metrics(ex: Executor, path: Path, committed: int) -> None:
    """A run killed between a commit and the metrics line of that step resumes after the step: write the
    missing line from what the commit recorded, so metrics.jsonl has one line per committed step. A run
    that resumes from an earlier step (a write-back host cache lost with a killed driver: the store went
    back to its last durable step) drops the lines of the steps it will run again."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line and json.loads(line).get("step", 0) <= committed]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        lines = kept
    last = json.loads(lines[-1])["step"] if lines else 0
    if committed != last + 1 or committed == 0:
        return
    _, meta = ex.get(ex.call("ssd", "committed"))
    with open(path, "a") as f:
        f.write(json.dumps(recorded_step(committed - 1, meta).__dict__) + "\n")


@dataclass
class ForwardAhead:
    """Which step's forward the GPU actor ran ahead, during the previous step's optimizer (None: none).

    Set once a step that ran the next forward has committed; taken (and cleared) by the next step, so a
    replay after a failure runs its own forward."""

    step: int | None = None


def run_step(
    ex: Executor,
    supervisor: Supervisor,
    cfg: RunConfig,
    plan: Plan,
    spec: ModelSpec,
    data: TokenDataset,
    step: int,
    ahead: ForwardAhead | None = None,
    may_run_ahead: bool = False,
) -> tuple[StepRecord, list[Span]]:
    """Run 0-based step `step` to its commit (or replay it after a failure); returns what it measured and
    its timeline. With `may_run_ahead` (and exact clipping, runtime.lookahead) the step also runs step
    `step + 1`'s forward, which `ahead` then records."""
    ahead = ahead or ForwardAhead()
    forward_done = ahead.step == step
    ahead.step = None
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
        lent_state=frozenset(plan.cpu_cached_state),
        lend_copy=plan.lend_copy,
        state_range=plan.optimizer_range,
        grad_log_cached=plan.grad_log_tier == "cpu",
    )
    key = step_key(inputs)
    resume = supervisor.resume_point(step, key)
    if resume.committed_meta is not None:  # committed before a failure hid the reply
        return recorded_step(step, resume.committed_meta), []
    lookahead = None
    if may_run_ahead and cfg.runtime.lookahead and o.max_grad_norm > 0 and not resume.done_units:
        following = data.batch(step + 1, cfg.batch.global_batch, cfg.batch.seq_len)
        lookahead = (following.inputs, following.targets)
    inputs = dataclasses.replace(
        inputs,
        done_units=resume.done_units,
        step_key=key,
        forward_done=forward_done and not resume.done_units,
        lookahead=lookahead,
    )
    supervisor.ask("ssd", "reserve", _scratch_bytes(cfg, plan, spec))
    sched = build_step(spec, ex.ring_spec, inputs)
    try:
        futures = supervisor.execute(sched)
    except Exception as exc:
        if inputs.forward_done and find_cause(exc, ForwardLostError) is not None:
            log.warning("step %d: %s", step + 1, find_cause(exc, ForwardLostError))
            supervisor.ask("ssd", "rollback")  # what the attempt staged (nothing was published)
            return run_step(ex, supervisor, cfg, plan, spec, data, step, ahead, may_run_ahead)
        if supervisor.skip_nonfinite(step, exc, inputs.commit_meta):
            return recorded_step(step, {"lr": lr, "loss": math.nan, "grad_norm": math.nan}), []
        raise
    ahead.step = step + 1 if sched.lookahead else None
    summary = ex.get(futures[sched.summary])
    seconds = time.perf_counter() - t0
    spans = [s for role in ex.roles for s in supervisor.ask(role, "drain_timeline")]
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


def _scratch_bytes(cfg: RunConfig, plan: Plan, spec: ModelSpec) -> int:
    """SSD space a step needs beyond the committed state (checked before it starts; see store.py)."""
    return step_scratch_bytes(
        [u.numel for u in spec.units],
        4 if plan.param_dtype == "float32" else 2,
        clipping=cfg.optimizer.max_grad_norm > 0,
        units_in_flight=plan.num_slots // 4 + 2,
    )


def recorded_step(step: int, meta: Mapping[str, Any]) -> StepRecord:
    """The record of a step that ran no computation here (committed before a failure, or skipped)."""
    return StepRecord(
        step=step + 1,
        loss=float(meta.get("loss", math.nan)),
        grad_norm=float(meta.get("grad_norm", math.nan)),
        lr=float(meta.get("lr", 0.0)),
        seconds=0.0,
        tokens_per_s=0.0,
        tflops=0.0,
    )


def write_timeline(path: Path, step: int, spans: list[Span]) -> None:
    """The most recent step's per-lane busy intervals (seconds from the step's first span)."""
    t0 = min((s.start for s in spans), default=0.0)
    rows = [
        {**asdict(s), "start": s.start - t0, "end": s.end - t0} for s in sorted(spans, key=lambda s: s.start)
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "spans": rows}))
    os.replace(tmp, path)


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
