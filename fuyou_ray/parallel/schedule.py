"""One data-parallel step as data: each pipeline's ops, merged into one schedule for the executor.

Pipeline k runs the single-pipeline step (fuyou_ray/schedule.py) on rows [k*B/N, (k+1)*B/N) of the global
batch, with the loss divided by the whole batch's micro-batch count, so the pipelines' gradients add up
to the single pipeline's. Around the optimizer it differs:

- `comm.reduce_scatter(u)` takes the unit's gradient G_u as it leaves the device and leaves in its ring
  slot the sum over all pipelines of pipeline k's element range of it (a gloo reduce-scatter among the
  pipelines' comm actors), plus that range's squared norm for clipping;
- exact clipping: the summed range is logged to SSD (`u00003.grad.shard1of2`), and the coefficient comes
  from `comm.clip_coefficient`, an all-reduce of every range's squared norm (the global norm, exactly);
- the optimizer pool updates pipeline k's range of W, m, v (shard records) and writes the new params of
  that range into a full-unit slot; `comm.all_gather(u)` fills in the other ranges from the other pipelines
  (broadcasts), and the whole new P_u is written to pipeline k's store: every pipeline's next forward
  reads full units from its own SSDs;
- the step ends with `ssd.prepare` (phase 1 of the job's commit, fuyou_ray/parallel/commit.py); the
  driver commits the stores once every pipeline has prepared.

Every pipeline's op list has the same length and order (only element ranges differ), and each actor runs
its calls in list order, so the comm actors meet in their collectives in the same order everywhere: the
earliest unfinished op of any pipeline can always run, and the job cannot deadlock. A replay re-runs every
unit on every pipeline (the collectives need all of them); a unit already published stays as it was, its
writes and publication being idempotent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fuyou_ray.models import ModelSpec
from fuyou_ray.optim import shard_ranges
from fuyou_ray.parallel.shards import ShardGeometry, shard_record
from fuyou_ray.records import OPTIMIZER_STATE, RecordKind, record_name
from fuyou_ray.ring import DTYPES, RingSpec, SlotHandle
from fuyou_ray.schedule import Op, Ref, StepInputs, StepSchedule, _Slots


@dataclass(frozen=True)
class PipelineStep:
    """What pipeline `rank` of `world` runs of one step. `inputs` holds its rows of the batch; its
    `step_key` identifies the whole job's batch (every store publishes the step under the same key)."""

    rank: int
    world: int
    inputs: StepInputs
    accum: int  # micro-batches of the whole job's batch: the loss divisor


@dataclass
class JobSchedule:
    """The pipelines' ops, interleaved into one list; `prepares` are the ops the commit waits for."""

    sched: StepSchedule
    prepares: list[int]
    summaries: list[int]


def role(rank: int, actor: str) -> str:
    """The executor's name of a pipeline's actor: `p1.gpu`, `p1.ssd`, `p1.opt0`, `p1.comm`."""
    return f"p{rank}.{actor}"


def build_pipeline_step(
    spec: ModelSpec, ring: RingSpec, geometry: ShardGeometry, p: PipelineStep
) -> StepSchedule:
    s, rank, world = p.inputs, p.rank, p.world
    if s.done_units:
        raise ValueError("a data-parallel replay re-runs every unit; done_units must be empty")
    sched = StepSchedule()
    slots = _Slots(ring)
    version = s.step + 1
    last = spec.num_units - 1
    clipping = s.max_grad_norm > 0
    p_size = DTYPES[s.param_dtype].itemsize
    sched.add("comm", "start_step", version, phase="forward")
    start = sched.add(
        "gpu", "start_share", s.inputs, s.targets, s.micro_batch, s.step, p.accum, phase="forward"
    )
    publishes: list[int] = []
    reduced: list[int] = []
    logged: dict[int, int] = {}  # unit -> op that wrote its gradient shard to SSD

    def read(
        name: str, unit: int, nbytes: int, phase: str, after: Sequence[int] = ()
    ) -> tuple[int, SlotHandle]:
        slot, fence = slots.take()
        op = sched.add(
            "ssd", "read", name, slot, after=[*fence, *after], phase=phase, unit=unit, nbytes=nbytes
        )
        return op, slot

    def write(
        ref: int, slot: SlotHandle, unit: int, transient: bool, after: Sequence[int], nbytes: int
    ) -> int:
        op = sched.add(
            "ssd",
            "write",
            Ref(ref),
            version,
            transient,
            after=after,
            phase="optimizer",
            unit=unit,
            nbytes=nbytes,
        )
        slots.consumed_by(slot, [op])
        return op

    def optimizer(u: int, grad: Ref, g_slot: SlotHandle, scale: float | Ref) -> None:
        unit = spec.units[u]
        lo, hi = geometry.range(u, rank)
        state = {
            kind: read(shard_record(u, kind, rank, world), u, (hi - lo) * 4, "optimizer")
            for kind in OPTIMIZER_STATE
        }
        p_slot, fence = slots.take()
        p_full = p_slot.carrying(record_name(u, RecordKind.PARAM), s.param_dtype, unit.numel, version)
        # This pipeline's range of the new params, written in place by the pool; the rest come from the
        # other pipelines (all_gather).
        p_mine = dataclasses.replace(
            p_full, offset=p_full.offset + lo * p_size, capacity=p_full.capacity - lo * p_size, numel=hi - lo
        )
        deps = [op for op, _ in state.values()] + [grad.op, *fence]
        if isinstance(scale, Ref):
            deps.append(scale.op)
        updates = [
            sched.add(
                f"opt{j}",
                "update",
                Ref(state[RecordKind.MASTER][0]),
                grad,
                Ref(state[RecordKind.EXP_AVG][0]),
                Ref(state[RecordKind.EXP_AVG_SQ][0]),
                p_mine,
                a,
                b,
                unit.layout.decay_numel - lo,
                s.hp,
                scale,
                after=deps,
                phase="optimizer",
                unit=u,
                nbytes=b - a,
            )
            for j, (a, b) in enumerate(shard_ranges(hi - lo, s.pool_size))
        ]
        slots.consumed_by(g_slot, updates)
        gather = sched.add(
            "comm", "all_gather", u, p_full, after=updates, phase="optimizer", unit=u, nbytes=p_full.nbytes
        )
        unit_writes = [write(op, slot, u, False, updates, (hi - lo) * 4) for op, slot in state.values()]
        unit_writes.append(write(gather, p_slot, u, False, [], p_full.nbytes))
        publishes.append(
            sched.add("ssd", "publish", u, version, s.step_key, after=unit_writes, phase="commit", unit=u)
        )

    def emit(u: int) -> None:
        g_slot, fence = slots.take()
        g_slot = g_slot.carrying(record_name(u, RecordKind.GRAD), "float32", spec.units[u].numel, version)
        e = sched.add(
            "gpu", "emit_grad", u, g_slot, after=fence, phase="backward", unit=u, nbytes=g_slot.nbytes
        )
        r = sched.add("comm", "reduce_scatter", u, Ref(e), phase="backward", unit=u, nbytes=g_slot.nbytes)
        reduced.append(r)
        if clipping:
            logged[u] = write(r, g_slot, u, True, [], geometry.size(u, rank) * 4)
            publishes.append(logged[u])
        else:
            optimizer(u, Ref(r), g_slot, 1.0)

    # forward through every unit but the head, then head + backward in reverse (as fuyou_ray/schedule.py)
    for u in range(last):
        r, slot = read(record_name(u, RecordKind.PARAM), u, spec.units[u].numel * p_size, "forward")
        f = sched.add("gpu", "forward", u, Ref(r), after=[start], phase="forward", unit=u)
        slots.consumed_by(slot, [f])
    for u in range(last, -1, -1):
        r, slot = read(record_name(u, RecordKind.PARAM), u, spec.units[u].numel * p_size, "backward")
        b = sched.add(
            "gpu", "head" if u == last else "backward", u, Ref(r), after=[start], phase="backward", unit=u
        )
        slots.consumed_by(slot, [b])
        if u < last:
            emit(u + 1)
    emit(0)

    if clipping:
        coef = sched.add("comm", "clip_coefficient", s.max_grad_norm, after=reduced, phase="optimizer")
        for u in range(last, -1, -1):
            name = shard_record(u, RecordKind.GRAD, rank, world)
            g_read, g_slot = read(name, u, geometry.size(u, rank) * 4, "optimizer", after=[logged[u]])
            optimizer(u, Ref(g_read), g_slot, Ref(coef))

    local = sched.add("gpu", "step_summary", after=[start], phase="commit")
    sched.summary = sched.add("comm", "step_summary", Ref(local), phase="commit")
    sched.commit = sched.add(
        "ssd", "prepare", version, s.step_key, Ref(sched.summary), after=publishes, phase="commit"
    )
    return sched


def merge(pipelines: Sequence[StepSchedule]) -> JobSchedule:
    """One schedule of every pipeline's ops, interleaved op by op (op i of each pipeline, then op i+1), with
    actors renamed `p<k>.<actor>`. Dependencies still point backwards, so the executor runs it as is."""
    length = len(pipelines[0].ops)
    if any(len(p.ops) != length for p in pipelines):
        raise ValueError("the pipelines' schedules differ in length: their collectives would not match")
    world = len(pipelines)
    new_id = {(k, i): i * world + k for k in range(world) for i in range(length)}
    merged = StepSchedule()
    for i in range(length):
        for k, p in enumerate(pipelines):
            op = p.ops[i]
            args = tuple(Ref(new_id[k, a.op]) if isinstance(a, Ref) else a for a in op.args)
            merged.ops.append(
                dataclasses.replace(
                    op,
                    id=new_id[k, i],
                    actor=role(k, op.actor),
                    args=args,
                    after=tuple(sorted(new_id[k, d] for d in op.after)),
                )
            )
    # (-1: a schedule without that op, such as an evaluation's, which has no commit)
    prepares = [new_id.get((k, p.commit), -1) for k, p in enumerate(pipelines)]
    summaries = [new_id.get((k, p.summary), -1) for k, p in enumerate(pipelines)]
    merged.commit, merged.summary = prepares[-1], summaries[0]
    return JobSchedule(merged, prepares, summaries)


def ops_of(sched: StepSchedule, rank: int) -> list[Op]:
    """Pipeline `rank`'s ops of a merged schedule (for timelines and tests)."""
    prefix = role(rank, "")
    return [op for op in sched.ops if op.actor.startswith(prefix)]
