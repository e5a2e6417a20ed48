"""The step simulator: replays a step schedule event by event over the machine's resources.

Input: a `StepSchedule` - the real one from `fuyou_ray.schedule.build_step` (what the pipeline runs today),
or the one `build_planned_step` writes for a `Plan` that uses the planner's features (prefetch on copy
streams, CPU caches, activation swapping, optimizer overlap). Both are lists of `Op`s with actor, method,
arguments and dependencies (`after` and `Ref` arguments), so one replay serves both.

Each op is priced as a sequence of stages, each on one resource (see `op_stages`):
  gpu        seconds of compute (FLOPs of the unit call at the profile's rate for the chunk size)
  h2d, d2h   bytes over PCIe; both directions at once share the duplex bandwidth
  ssd_read, ssd_write   bytes; concurrent requests share the SSD bandwidth at the plan's queue depth
  cache_read, cache_write   bytes the SSD actor copies between the host cache's /dev/shm files and ring
             slots (fuyou_ray/cache.py); concurrent copies share the profile's `cpu.memcpy_gbps`
  cpu        AdamW elements; each optimizer actor at its thread count's rate, the pool capped by the rate of
             all its threads together (memory bandwidth)
  wait       a fixed delay that uses nothing (an actor call's overhead, the commit's fsyncs)
Actors execute as Ray executes them: `gpu`, each `opt<k>` and the copy streams `h2d`/`d2h` run their ops
one at a time in submission order; `ssd` (a threaded actor) runs up to `ssd_concurrency` at once, starting
ops as their dependencies resolve, host-cache copies among them (`ssd.cache_read`, `ssd.cache_write`,
and `ssd.cache_write_through`: the copy, then the SSD write); `host` ops cost nothing. Shared resources are
divided among the stages using them at each instant (processor sharing), so overlap, contention and pipeline
fill/drain come out of the replay rather than a formula. The result carries per-resource busy time as
`fuyou_ray.timeline.Span`s, the same lanes the actors record, so prediction and measurement compare lane
by lane.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, overload

from fuyou_ray.costmodel import (
    GRAD_BYTES,
    ResourceTimes,
    StepAccount,
    Workload,
    account_step,
    backward_method,
)
from fuyou_ray.costmodel import call_seconds as _call_seconds
from fuyou_ray.optim import AdamWStep, shard_ranges
from fuyou_ray.profile import HardwareProfile
from fuyou_ray.ring import RingSpec, SlotHandle, make_spec
from fuyou_ray.schedule import (
    SSD_ACTOR_CONCURRENCY,
    Op,
    Ref,
    StepInputs,
    StepSchedule,
    build_step,
    state_ranges,
)
from fuyou_ray.timeline import Span

if TYPE_CHECKING:
    from fuyou_ray.plan import Plan

RESOURCES = ("gpu", "h2d", "d2h", "ssd_read", "ssd_write", "cache_read", "cache_write", "cpu", "wait")
# Lanes as the actors record them (fuyou_ray/timeline.py; the SSD actor records host-cache copies as
# "cache read" / "cache write", actors/ssd_io.py).
LANE_OF = {
    "gpu": "gpu compute",
    "h2d": "h2d",
    "d2h": "d2h",
    "ssd_read": "ssd read",
    "ssd_write": "ssd write",
    "cache_read": "cache read",
    "cache_write": "cache write",
    "cpu": "cpu adam",
}
CACHE_METHODS = ("cache_read", "cache_write", "cache_write_through")  # SSD-actor calls on cached records
SSD_CONCURRENCY = SSD_ACTOR_CONCURRENCY  # the SSD actor's max_concurrency (fuyou_ray/executor.py)
RAY_ACTORS = ("gpu", "ssd", "opt")  # ops on these are Ray actor calls and pay the call overhead


class SimulationError(RuntimeError):
    """The schedule cannot run to completion (a dependency cycle or an op no actor can start)."""


@dataclass(frozen=True)
class Stage:
    resource: str
    amount: float  # seconds (gpu, wait), bytes (h2d, d2h, ssd_*, cache_*) or elements (cpu)


@dataclass(frozen=True)
class SimEnv:
    """What the replay prices ops with."""

    profile: HardwareProfile
    workload: Workload
    plan: Plan
    ssd_queue_depth: int
    ssd_concurrency: int = SSD_CONCURRENCY


# ---------------------------------------------------------------------------------------------- pricing


def op_stages(op: Op, env: SimEnv, memo: dict[tuple[int, str], float] | None = None) -> list[Stage]:
    """The resource stages of one op, in order. Covers the vocabulary of both schedule builders."""
    w, prof = env.workload, env.profile
    memo = {} if memo is None else memo

    def call_seconds(w: Workload, unit: int, method: str, prof: HardwareProfile) -> float:
        if (unit, method) not in memo:
            memo[unit, method] = _call_seconds(w, unit, method, prof)
        return memo[unit, method]

    stages: list[Stage] = []
    if prof.call_overhead_s > 0 and op.actor.startswith(RAY_ACTORS):
        stages.append(Stage("wait", prof.call_overhead_s))
    method = op.method
    if op.actor in ("gpu", "cuda"):
        unit = op.unit
        p_bytes = w.spec.units[unit].numel * w.param_bytes if unit >= 0 else 0
        # build_step's calls on a synchronous device (the CPU fallback): copy in, then compute.
        if method == "forward":
            stages += [Stage("h2d", p_bytes), Stage("gpu", call_seconds(w, unit, "forward", prof))]
        elif method in ("head", "backward"):
            secs = call_seconds(
                w, unit, method if method == "head" else backward_method(w, unit, "keep"), prof
            )
            stages += [Stage("h2d", p_bytes), Stage("gpu", secs)]
        # ... on CUDA (see current_step): the call copies its params in; compute follows on the stream.
        elif method == "load":
            stages.append(Stage("h2d", p_bytes))
        elif method == "emit_grad":
            stages.append(Stage("d2h", op.nbytes))
        # compute only (the CUDA stream of build_step's calls, and build_planned_step's compute calls)
        elif method.startswith("compute_"):
            stages.append(Stage("gpu", call_seconds(w, unit, method.removeprefix("compute_"), prof)))
    elif op.actor in ("h2d", "d2h"):
        stages.append(Stage(op.actor, op.nbytes))
    elif op.actor == "ssd":
        if method in ("read", "read_range"):
            stages.append(Stage("ssd_read", op.nbytes))
        elif method in ("write", "write_range"):
            stages.append(Stage("ssd_write", op.nbytes))
        elif method == "cache_read":
            stages.append(Stage("cache_read", op.nbytes))
        elif method == "cache_write":
            stages.append(Stage("cache_write", op.nbytes))
        elif method == "cache_write_through":  # CachedStore.write_from: the cache file, then the SSD
            stages += [Stage("cache_write", op.nbytes), Stage("ssd_write", op.nbytes)]
        elif method == "lend":  # CachedStore.lend: the version read, copied into the new version's file
            stages.append(Stage("cache_write", op.nbytes))
        elif method == "adopt_write_through":  # a lent record's new version: no copy, but to SSD
            stages.append(Stage("ssd_write", op.nbytes))
        elif method in ("commit", "publish"):
            stages.append(Stage("wait", prof.commit_s))  # a manifest / journal record, fsync'd
    elif op.actor.startswith("opt") and method == "update":
        stages.append(Stage("cpu", op.nbytes))
    return [s for s in stages if s.amount > 0]


def _capacity(actor: str, env: SimEnv) -> tuple[int, bool]:
    """(ops at once, in submission order?) for an actor."""
    if actor == "ssd":
        return env.ssd_concurrency, False
    if actor == "host":
        return 1 << 30, False
    return 1, True


# ---------------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class SimResult:
    """The replay of one step: its length, each resource's busy time, and the busy intervals."""

    step_s: float
    busy: dict[str, float]  # seconds each lane was busy (union of its intervals); 'pcie', 'ssd', 'memcpy' too
    spans: Sequence[Span] = field(repr=False)
    op_end: tuple[float, ...] = field(repr=False)


def simulate(sched: StepSchedule, env: SimEnv) -> SimResult:
    """Replay `sched` on the resources of `env.profile`; see the module docstring for the rules."""
    ops = sched.ops
    n = len(ops)
    deps = [set(op.after) | {a.op for a in op.args if isinstance(a, Ref)} for op in ops]
    waiting = [len(x) for x in deps]
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, before in enumerate(deps):
        for j in before:
            if j >= i:
                raise SimulationError(f"op {i} ({ops[i].actor}.{ops[i].method}) depends on a later op {j}")
            dependents[j].append(i)
    memo: dict[tuple[int, str], float] = {}
    stages = [op_stages(op, env, memo) for op in ops]

    prof, plan = env.profile, env.plan
    adam_one = prof.cpu.adam_rate(plan.optimizer_threads)
    copy_bps = prof.cpu.memcpy_bps()
    pcie_memo: dict[tuple[bool, bool], tuple[float, float]] = {}
    ssd_memo: dict[tuple[int, int], tuple[float, float]] = {}
    cpu_memo: dict[int, float] = {}
    queues: dict[str, deque[int]] = {}
    ready: dict[str, list[tuple[float, int]]] = {}
    running: dict[str, int] = {}
    caps: dict[str, tuple[int, bool]] = {}
    for i, op in enumerate(ops):
        if op.actor not in caps:
            caps[op.actor] = _capacity(op.actor, env)
            queues[op.actor] = deque()
            ready[op.actor] = []
            running[op.actor] = 0
        if caps[op.actor][1]:
            queues[op.actor].append(i)
    now = 0.0
    end = [0.0] * n
    active: dict[int, list[float]] = {}  # op -> [stage index, remaining amount, stage start]
    spans: list[tuple[str, int, float, float, int]] = []  # lane, op, start, end, amount
    finished = 0

    def release(i: int) -> None:
        nonlocal finished
        finished += 1
        end[i] = now
        running[ops[i].actor] -= 1
        for j in dependents[i]:
            waiting[j] -= 1
            if waiting[j] == 0 and not caps[ops[j].actor][1]:
                heapq.heappush(ready[ops[j].actor], (now, j))

    for i, op in enumerate(ops):
        if waiting[i] == 0 and not caps[op.actor][1]:
            heapq.heappush(ready[op.actor], (0.0, i))

    def start_ready() -> None:
        progress = True
        while progress:
            progress = False
            for actor, (cap, in_order) in caps.items():
                while running[actor] < cap:
                    if in_order:
                        q = queues[actor]
                        if not q or waiting[q[0]] > 0:
                            break
                        i = q.popleft()
                    else:
                        if not ready[actor]:
                            break
                        i = heapq.heappop(ready[actor])[1]
                    running[actor] += 1
                    if stages[i]:
                        active[i] = [0, stages[i][0].amount, now]
                    else:
                        release(i)
                        progress = True

    start_ready()
    while active:
        # Rates of every active stage under the sharing rules.
        by_res: dict[str, list[int]] = {}
        for i, st in active.items():
            by_res.setdefault(stages[i][int(st[0])].resource, []).append(i)
        rate: dict[int, float] = {}
        for res, members in by_res.items():
            k = len(members)
            if res in ("gpu", "wait"):
                r = 1.0 / k if res == "gpu" else 1.0
                for i in members:
                    rate[i] = r
            elif res in ("h2d", "d2h"):
                key = ("h2d" in by_res, "d2h" in by_res)
                if key not in pcie_memo:
                    pcie_memo[key] = prof.pcie.rates(*key)
                up, down = pcie_memo[key]
                for i in members:
                    rate[i] = (up if res == "h2d" else down) / k
            elif res in ("ssd_read", "ssd_write"):
                nr, nw = len(by_res.get("ssd_read", ())), len(by_res.get("ssd_write", ()))
                if (nr, nw) not in ssd_memo:
                    ssd_memo[nr, nw] = prof.ssd.shared_bps(env.ssd_queue_depth, nr, nw)
                rr, ww = ssd_memo[nr, nw]
                for i in members:
                    rate[i] = (rr / nr) if res == "ssd_read" else (ww / nw)
            elif res in ("cache_read", "cache_write"):
                # Every copy in flight, either way, shares the host's copy rate.
                copies = len(by_res.get("cache_read", ())) + len(by_res.get("cache_write", ()))
                for i in members:
                    rate[i] = copy_bps / copies
            elif res == "cpu":
                if k not in cpu_memo:
                    cpu_memo[k] = min(adam_one, prof.cpu.adam_rate(plan.optimizer_threads * k) / k)
                for i in members:
                    rate[i] = cpu_memo[k]
        dt = min(active[i][1] / rate[i] for i in active)
        now += dt
        done: list[int] = []
        for i, st in active.items():
            st[1] -= rate[i] * dt
            if st[1] <= 1e-9 * max(1.0, stages[i][int(st[0])].amount):
                done.append(i)
        for i in sorted(done):
            st = active[i]
            stage = stages[i][int(st[0])]
            if stage.resource in LANE_OF:
                spans.append((LANE_OF[stage.resource], i, st[2], now, int(stage.amount)))
            nxt = int(st[0]) + 1
            if nxt < len(stages[i]):
                active[i] = [nxt, stages[i][nxt].amount, now]
            else:
                del active[i]
                release(i)
        start_ready()
    if finished != n:
        stuck = next(i for i in range(n) if end[i] == 0.0 and waiting[i] >= 0 and i not in active)
        raise SimulationError(
            f"the schedule stalls: {n - finished} of {n} ops never ran (first: op {stuck} "
            f"{ops[stuck].actor}.{ops[stuck].method}, waiting on {sorted(deps[stuck])})"
        )
    busy = {lane: _union(spans, (lane,)) for lane in LANE_OF.values()}
    busy["pcie"] = _union(spans, ("h2d", "d2h"))
    busy["ssd"] = _union(spans, ("ssd read", "ssd write"))
    busy["memcpy"] = _union(spans, ("cache read", "cache write"))
    return SimResult(now, busy, _Spans(spans, ops), tuple(end))


class _Spans(Sequence[Span]):
    """The replay's busy intervals as timeline Spans, built on first access (the search never needs them)."""

    def __init__(self, raw: list[tuple[str, int, float, float, int]], ops: list[Op]) -> None:
        self._raw, self._ops = raw, ops
        self._spans: list[Span] | None = None

    def _all(self) -> list[Span]:
        if self._spans is None:
            self._spans = [
                Span(lane, f"{self._ops[i].method} {self._ops[i].unit}", start, end, amount)
                for lane, i, start, end, amount in self._raw
            ]
        return self._spans

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, index: int) -> Span: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Span]: ...

    def __getitem__(self, index: int | slice) -> Span | Sequence[Span]:
        return self._all()[index]


def _union(spans: list[tuple[str, int, float, float, int]], lanes: tuple[str, ...]) -> float:
    """Length of the union of the intervals of `lanes`."""
    total, cur_start, cur_end = 0.0, 0.0, -1.0
    for start, end in sorted((s[2], s[3]) for s in spans if s[0] in lanes):
        if start > cur_end:
            total += max(0.0, cur_end - cur_start)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + max(0.0, cur_end - cur_start)


# ---------------------------------------------------------------------------------------------- schedules


def current_step(w: Workload, plan: Plan, device: str = "cuda") -> StepSchedule:
    """The schedule the pipeline runs today (`fuyou_ray.schedule.build_step`) for this workload.

    It ignores the planner's schedule fields: every unit keeps its input and recomputes in backward, and
    with clipping the gradients are logged and the optimizer runs after the last backward, with the next
    step's forward behind it (lookahead: the step modelled is a steady one, whose own forward ran ahead).
    It keeps the plan's host cache (`cpu_cached_state`, `cpu_cached_params`, a "cpu" gradient log,
    write-through), which the pipeline implements: see `host_cache_ops`. How the GPU actor executes its calls
    (actors/gpu_compute.py) is modelled too: on CUDA a forward / backward / head call returns once its
    params are copied in and leaves the compute queued on the device's stream, so the next call's copy
    overlaps it; `emit_grad` first waits for every compute queued so far, then copies the gradient out (as
    do `step_summary` and `clip_coefficient`, which read device values). On the CPU fallback every call is
    synchronous.
    """
    ring = make_spec(plan.slot_bytes, plan.num_slots)
    inputs = StepInputs(
        step=0,
        inputs=None,
        targets=None,
        micro_batch=w.micro_batch,
        hp=AdamWStep(1, 1e-4, 0.9, 0.95, 1e-8, 0.0),
        max_grad_norm=1.0 if w.clipping else 0.0,
        param_dtype=plan.param_dtype,
        pool_size=plan.optimizer_actors,
        commit_meta={},
        lent_state=frozenset(plan.cpu_cached_state),
        lend_copy=plan.lend_copy,
        state_range=plan.optimizer_range,
        grad_log_cached=plan.grad_log_tier == "cpu",
        # A steady step with exact clipping (runtime.lookahead): its forward ran during the previous step's
        # optimizer, and it runs the next one's. Its length is then the period from one commit to the next
        # (or to the end of that forward, if later).
        forward_done=w.clipping,
        lookahead=(None, None) if w.clipping else None,
    )
    sched = host_cache_ops(build_step(w.spec, ring, inputs), plan, ring, w.num_units)
    return _device_streams(sched, w, frozenset(plan.parked_inputs)) if device == "cuda" else sched


def as_pipeline(plan: Plan) -> Plan:
    """`plan` as the pipeline runs it today: the planner's schedule fields reset (`Plan.as_current`), its
    parked block inputs ("recompute") and host cache kept (the driver hands the cached units, a "cpu"
    gradient log and write-through to the SSD actor: fuyou_ray.cache.cache_spec)."""
    built = {"keep", "recompute"}  # the activation policies the pipeline implements (parked block inputs)
    return replace(
        plan.as_current(),
        activation_policy=plan.activation_policy if set(plan.activation_policy) <= built else (),
        cpu_cached_params=plan.cpu_cached_params,
        cpu_cached_state=plan.cpu_cached_state,
        cache_write_through=plan.cache_write_through,
        grad_log="cpu" if plan.grad_log_tier == "cpu" and plan.exact_clipping else "",
    )


def host_cache_ops(sched: StepSchedule, plan: Plan, ring: RingSpec, num_units: int) -> StepSchedule:
    """build_step's SSD-actor reads and writes of the records `plan` caches turned into host-cache copies.

    The records are those the driver gives the SSD actor (`fuyou_ray.cache.cache_spec`), which serves them
    through its `CachedStore`: a read copies the record's cache file into the ring slot (`ssd.cache_read`);
    a write copies the slot into a new cache file (`ssd.cache_write`), and in write-through mode a durable
    record also goes to SSD (`ssd.cache_write_through`; the gradient log is transient and stays in the
    cache). Steady state: the cache holds every cached record (the first step after a start reads them from
    SSD once). Other records keep their SSD calls.
    """
    from fuyou_ray.cache import cache_spec

    spec = cache_spec(plan, ring, 0)
    names = spec.record_names(num_units)
    if not names:
        return sched
    ops: list[Op] = []
    for op in sched.ops:
        if op.actor == "ssd" and op.method in ("read", "write") and _record_of(op, sched.ops) in names:
            if op.method == "read":
                method = "cache_read"
            else:
                transient = bool(op.args[2])  # write(slot, version, transient)
                method = "cache_write_through" if spec.write_through and not transient else "cache_write"
            op = replace(op, method=method)
        elif op.actor == "ssd" and op.method == "adopt" and spec.write_through:
            op = replace(op, method="adopt_write_through")
        ops.append(op)
    return StepSchedule(ops, commit=sched.commit, summary=sched.summary)


def _record_of(op: Op, ops: Sequence[Op]) -> str:
    """The record an `ssd.read` / `ssd.write` of build_step moves: a read names it; a write takes a slot
    handle carrying it, or the result of the op that filled the slot (a read, or `emit_grad`'s slot)."""
    if op.method == "read":
        return str(op.args[0])
    arg = op.args[0]
    if isinstance(arg, SlotHandle):
        return arg.tensor
    if isinstance(arg, Ref):
        producer = ops[arg.op]
        if producer.method == "read":
            return str(producer.args[0])
        if producer.method == "emit_grad" and isinstance(producer.args[1], SlotHandle):
            return producer.args[1].tensor
    raise SimulationError(f"op {op.id} (ssd.{op.method}): cannot tell which record it writes")


def _device_streams(sched: StepSchedule, w: Workload, parked: frozenset[int] = frozenset()) -> StepSchedule:
    """build_step's ops with each GPU compute call split into the call itself (`gpu.load`: the params'
    copy, which the host waits for) and its compute (`cuda.compute_*`, in order on the device's stream).
    The inputs of the `parked` blocks (fuyou_ray/activations.py) go out on the D2H stream after the
    forward that made them, and come back on the H2D stream from the call of the unit after them in the
    backward; their backward's compute waits for them."""
    out = StepSchedule()
    new: dict[int, int] = {}
    queued: list[int] = []  # the last compute queued on the device
    parked_out: dict[int, int] = {}  # parked unit -> the D2H copy of its input
    coming_back: dict[int, int] = {}  # parked unit -> the H2D copy of its input
    for op in sched.ops:
        args = tuple(Ref(new[a.op]) if isinstance(a, Ref) else a for a in op.args)
        after = [new[i] for i in op.after]
        info = {"phase": op.phase, "unit": op.unit, "nbytes": op.nbytes}
        if op.actor == "gpu" and op.method in ("forward", "backward", "head"):
            u = op.unit
            load = out.add("gpu", "load", *args, after=after, **info)
            method = op.method if op.method != "backward" else backward_method(w, u, "keep")
            back = []
            if op.method == "backward" and u in parked:
                fetched = coming_back.pop(u, None)
                if fetched is None:  # (nothing prefetched it: the copy starts with this call)
                    fetched = _copy_in(out, u, [load, *_ids(parked_out.pop(u, None))], w, op.phase)
                back = [fetched]
            compute = out.add("cuda", f"compute_{method}", u, after=[load, *back], phase=op.phase, unit=u)
            queued = [compute]
            if op.method == "forward" and u + 1 in parked:
                parked_out[u + 1] = out.add(
                    "d2h", "copy", after=[compute], phase=op.phase, unit=u + 1, nbytes=w.boundary_bytes
                )
            if op.method in ("backward", "head") and u - 1 in parked:
                coming_back[u - 1] = _copy_in(
                    out, u - 1, [load, *_ids(parked_out.pop(u - 1, None))], w, op.phase
                )
            new[op.id] = load
        elif op.actor == "gpu" and op.method in ("emit_grad", "step_summary", "clip_coefficient"):
            new[op.id] = out.add(op.actor, op.method, *args, after=[*after, *queued], **info)
        else:
            new[op.id] = out.add(op.actor, op.method, *args, after=after, **info)
    out.summary, out.commit = new[sched.summary], new[sched.commit]
    return out


def _ids(op: int | None) -> list[int]:
    return [] if op is None else [op]


def _copy_in(out: StepSchedule, unit: int, after: list[int], w: Workload, phase: str) -> int:
    """A parked input's copy back to the device (H2D stream)."""
    return out.add("h2d", "copy", after=after, phase=phase, unit=unit, nbytes=w.boundary_bytes)


class _SlotRing:
    """Round-robin ring slots, as `fuyou_ray.schedule` hands them out: a slot's next producer waits for
    the slot's previous consumers."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.next = 0
        self.fences: dict[int, list[int]] = {}

    def take(self) -> tuple[int, list[int]]:
        slot = self.next
        self.next = (self.next + 1) % self.num_slots
        return slot, self.fences.pop(slot, [])

    def consumed_by(self, slot: int | None, ops: list[int]) -> None:
        if slot is not None:
            self.fences.setdefault(slot, []).extend(ops)


def build_planned_step(w: Workload, plan: Plan) -> StepSchedule:
    """The step of a plan that uses the planner's features, as ops for the simulator.

    The vocabulary extends build_step's: `gpu.compute_<forward|head|backward|backward_swapped>(unit)` is
    compute only; `h2d.copy` / `d2h.copy` are copies on the device's copy streams (in order); `ssd.read` /
    `ssd.write` move records, activations and logged gradients; `opt<k>.update` as in build_step.
    - prefetch: the copy of unit j's params (and swapped activations) waits for the compute that used the
      same device buffer, j - prefetch_depth - 1; with depth 0 copy and compute alternate (today).
    - CPU-cached params / state are neither read from nor written to SSD (write-through writes them): as
      in the pipeline (fuyou_ray/cache.py), they are copied between the host cache and ring slots by the
      SSD actor (`ssd.cache_read`, `ssd.cache_write`, `ssd.cache_write_through`). A "cpu" gradient log is
      the host memory the gradients land in (no copies).
    - activations per policy: keep (nothing moves), recompute (the input goes to host memory and back),
      swap_cpu (everything the backward needs goes to host memory and back), swap_ssd (... and to SSD).
    - optimizer: 'backward' right after the unit's gradient reaches the host; 'after_backward' after the
      clipping coefficient, unit by unit; 'next_forward' ahead of the unit's forward in the next step, whose
      forward takes the new params straight from the optimizer (modelled in steady state: this step's
      forward runs the previous step's updates).
    """
    s = StepSchedule()
    units = w.spec.units
    last = w.num_units - 1
    pb = w.param_bytes
    ring = _SlotRing(plan.num_slots)
    cached_p, cached_s = set(plan.cpu_cached_params), set(plan.cpu_cached_state)
    resident = set(plan.gpu_resident_params)
    overlap = plan.overlap
    log_tier = plan.grad_log_tier
    computes: list[int] = []
    writes: list[int] = []
    act_ready: dict[int, int] = {}
    grads_out: list[int] = []
    logged: dict[int, int] = {}
    refreshed: set[int] = set()  # resident units whose device copy got this step's refresh
    start = s.add("gpu", "start_step", phase="forward")

    def fence(back: int) -> list[int]:
        k = len(computes) - back
        return [computes[k]] if k >= 0 else []

    def read(nbytes: int, phase: str, unit: int, after: list[int], cached: bool = False) -> tuple[int, int]:
        slot, f = ring.take()
        method = "cache_read" if cached else "read"
        op = s.add("ssd", method, after=[*f, *after], phase=phase, unit=unit, nbytes=nbytes)
        return op, slot

    def write(
        nbytes: int, phase: str, unit: int, after: list[int], slot: int | None, cached: bool = False
    ) -> int:
        method = "write"
        if cached:
            method = "cache_write_through" if plan.cache_write_through else "cache_write"
        op = s.add("ssd", method, after=after, phase=phase, unit=unit, nbytes=nbytes)
        ring.consumed_by(slot, [op])
        writes.append(op)
        return op

    def optimizer(
        u: int, phase: str, grad: list[int], g_slot: int | None, extra: list[int]
    ) -> tuple[list[int], int | None]:
        """Unit u's update in the plan's optimizer ranges (one range: the whole unit): the state of each
        range through its own slots, as build_step moves it, the new params into one slot (the gradient
        is modelled whole)."""
        numel = units[u].numel
        ranges = state_ranges(numel, plan.optimizer_range)
        # Slots taken in build_step's order: the params' slot first only when it is held across ranges.
        p_slot, p_fence = ring.take() if len(ranges) > 1 else (None, [])
        updates: list[int] = []
        for lo, hi in ranges:
            reads, slots = [], []
            for _ in range(3):
                r, sl = read((hi - lo) * 4, phase, u, [], cached=u in cached_s)
                reads.append(r)
                slots.append(sl)
            if p_slot is None:
                p_slot, p_fence = ring.take()
            deps = [*reads, *grad, *p_fence, *extra]
            ranged = [
                s.add(f"opt{k}", "update", after=deps, phase=phase, unit=u, nbytes=b - a)
                for k, (a, b) in enumerate(shard_ranges(hi - lo, plan.optimizer_actors))
            ]
            for sl in slots:
                write((hi - lo) * 4, phase, u, ranged, sl, cached=u in cached_s)
            updates += ranged
        ring.consumed_by(g_slot, updates)
        write(numel * pb, phase, u, updates, p_slot, cached=u in cached_p)
        if u in resident and overlap == "next_forward":
            # The device copy is refreshed with the new params right before this step's first use.
            refresh = s.add("h2d", "copy", after=updates, phase=phase, unit=u, nbytes=numel * pb)
            return [refresh], None
        return updates, p_slot

    def previous_step_update(u: int, phase: str) -> tuple[list[int], int | None]:
        """next_forward: this step runs the update of the previous step's gradient of unit u."""
        if log_tier == "ssd":
            r, g_slot = read(units[u].numel * GRAD_BYTES, phase, u, [])
            return optimizer(u, phase, [r], g_slot, [start])
        return optimizer(u, phase, [], None, [start])

    def params_on_device(u: int, phase: str, new_p: tuple[list[int], int | None] | None) -> list[int]:
        if u in resident:
            if new_p is not None:
                refreshed.add(u)
                return new_p[0]
            if u in refreshed:
                return []
            # Steady state: the previous step's update is copied in before this step's first use.
            refreshed.add(u)
            refresh = s.add(
                "h2d",
                "copy",
                after=[start, *fence(plan.prefetch_depth + 1)],
                phase=phase,
                unit=u,
                nbytes=units[u].numel * pb,
            )
            return [refresh]
        src: list[int] = []
        slot: int | None = None
        if new_p is not None:
            src, slot = new_p
        else:
            r, slot = read(units[u].numel * pb, phase, u, [], cached=u in cached_p)
            src = [r]
        h = s.add(
            "h2d",
            "copy",
            after=[start, *src, *fence(plan.prefetch_depth + 1)],
            phase=phase,
            unit=u,
            nbytes=units[u].numel * pb,
        )
        ring.consumed_by(slot, [h])
        return [h]

    # forward through every unit but the head
    for u in range(last):
        new_p = previous_step_update(u, "forward") if overlap == "next_forward" else None
        on_device = params_on_device(u, "forward", new_p)
        c = s.add("gpu", "compute_forward", u, after=[start, *on_device], phase="forward", unit=u)
        computes.append(c)
        policy = plan.policy(u)
        if w.kind(u) == "block" and policy != "keep":
            moved = w.boundary_bytes if policy == "recompute" else w.activation_bytes(u)
            d = s.add("d2h", "copy", after=[c], phase="forward", unit=u, nbytes=moved)
            act_ready[u] = write(moved, "forward", u, [d], None) if policy == "swap_ssd" else d

    # head (forward + backward), then backward of the rest in reverse
    for u in range(last, -1, -1):
        new_p = previous_step_update(u, "backward") if overlap == "next_forward" and u == last else None
        on_device = params_on_device(u, "backward", new_p)
        policy = plan.policy(u)
        acts: list[int] = []
        if w.kind(u) == "block" and policy != "keep":
            moved = w.boundary_bytes if policy == "recompute" else w.activation_bytes(u)
            src = [act_ready[u]]
            if policy == "swap_ssd":
                r = s.add(
                    "ssd",
                    "read",
                    after=[*src, *fence(plan.prefetch_depth + 2)],
                    phase="backward",
                    unit=u,
                    nbytes=moved,
                )
                src = [r]
            acts = [
                s.add(
                    "h2d",
                    "copy",
                    after=[*src, *fence(plan.prefetch_depth + 1)],
                    phase="backward",
                    unit=u,
                    nbytes=moved,
                )
            ]
        method = "compute_" + backward_method(w, u, policy)
        c = s.add("gpu", method, u, after=[start, *on_device, *acts], phase="backward", unit=u)
        computes.append(c)
        g_bytes = units[u].numel * GRAD_BYTES
        to_ring = overlap == "backward" or log_tier == "ssd"
        g_slot, g_fence = ring.take() if to_ring else (None, [])
        d = s.add("d2h", "copy", after=[c, *g_fence], phase="backward", unit=u, nbytes=g_bytes)
        grads_out.append(d)
        if overlap == "backward":
            optimizer(u, "backward", [d], g_slot, [])
        elif log_tier == "ssd":
            logged[u] = write(g_bytes, "backward", u, [d], g_slot)
        else:
            logged[u] = d

    if w.clipping:
        clip = s.add("gpu", "clip_coefficient", 1.0, after=grads_out, phase="optimizer")
        if overlap == "after_backward":
            for u in range(last, -1, -1):
                if log_tier == "ssd":
                    r, g_slot = read(units[u].numel * GRAD_BYTES, "optimizer", u, [logged[u]])
                    optimizer(u, "optimizer", [r], g_slot, [clip])
                else:
                    optimizer(u, "optimizer", [logged[u]], None, [clip])
    s.summary = s.add("gpu", "step_summary", after=[start], phase="commit")
    s.commit = s.add("ssd", "commit", after=[*writes, s.summary], phase="commit")
    return s


# ---------------------------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    """What a plan's step is predicted to take, and why."""

    step_s: float
    tflops: float  # model FLOPs (6 N T + attention) per second, as the driver reports
    busy: dict[str, float]  # simulated busy seconds per lane
    work: ResourceTimes  # each resource's work alone (closed form): the bound
    account: StepAccount
    schedule: str  # "planned" or "current"
    sim: SimResult = field(repr=False)
    plan: Plan | None = field(default=None, repr=False)  # what was simulated (current: as_pipeline's)

    @property
    def bound_s(self) -> float:
        return self.work.bound

    @property
    def bottleneck(self) -> str:
        return self.work.bottleneck

    @property
    def efficiency(self) -> float:
        return self.work.bound / self.step_s if self.step_s > 0 else 0.0


def predict(w: Workload, plan: Plan, profile: HardwareProfile, *, schedule: str = "planned") -> Prediction:
    """Simulate one step of `plan` on `profile`: 'planned' (the plan's features) or 'current' (build_step,
    with the plan's host cache as the pipeline runs it: `as_pipeline`)."""
    if schedule == "planned":
        sched = build_planned_step(w, plan)
    else:
        plan = as_pipeline(plan)
        sched = current_step(w, plan, plan.device)
    env = SimEnv(profile, w, plan, plan.ssd_queue_depth)
    sim = simulate(sched, env)
    account = account_step(w, plan, profile, schedule=schedule)
    work = account.times(profile, plan.ssd_queue_depth, plan.optimizer_actors * plan.optimizer_threads)
    return Prediction(
        step_s=sim.step_s,
        tflops=w.model_flops() / sim.step_s / 1e12 if sim.step_s > 0 else 0.0,
        busy=sim.busy,
        work=work,
        account=account,
        schedule=schedule,
        sim=sim,
        plan=plan,
    )
