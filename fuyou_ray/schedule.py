"""One training step as data: a list of operations on the actors, with their dependencies.

The driver never hard-codes the order of calls: `build_step` writes the step down as `Op`s - which actor,
which method, which arguments (some of them `Ref`s to earlier ops' results) and which earlier ops must be
finished first - and an executor runs the list, through Ray actors or in process. Because every dependency
points backwards in the list, each actor receives its calls in an order that can never deadlock, and Ray
resolves the dependencies itself: no driver round trip between layers.

Ring slots are handed out round robin; a slot's next producer lists the slot's previous consumers among
its dependencies, so a slot is never overwritten before its consumer is done.

The step, with L units (embedding, blocks, head):
1. forward: for u < L-1: read P_u into a slot, forward(u) on the whole batch
2. head: read P_{L-1}, forward + loss + backward of the head, G_{L-1} into a slot
3. backward: for u = L-2 .. 0: read P_u, recompute + backward(u), G_u into a slot
4. optimizer, per unit: read W, m, v (and G when it was logged; a log in the host cache is read in place:
   `view`), AdamW over the pool's element ranges,
   writing the new P into a slot, then write W, m, v, P back. When the host cache holds the unit's state
   (`lent_state`), W, m, v are lent instead: `lend` copies the cached version into a file for the new
   one (early, while the GPU computes), the optimizer updates it in place, `adopt` stages it.
   - exact clipping (max_grad_norm > 0): every G is logged to SSD during backward, because the clipping
     coefficient needs all of them (but the last one out, unit 0's, which its update, the first, takes
     from its slot); the optimizer runs after the last backward, unit by unit in forward order.
     Lookahead (`StepInputs.lookahead`): the next step's forward and head follow it on the GPU, unit u on
     its new params straight from their slot, so they overlap the optimizer (Fuyou); that step then
     opens with `check_forward` (`forward_done`) and starts at its first backward.
   - no clipping: optimizer(u) consumes G_u straight from the ring, overlapping backward(u-1) (Fuyou).
   Once a unit's W, m, v, P are written, `publish` makes its update durable (so the SSD never holds two
   copies of more than the units in flight); a replay after a crash skips the units already published.
   A unit with more elements than `state_range` (the plan's optimizer_range) is updated range by range:
   its gradient is emitted (and logged) per range, W, m, v are read (`read_range`) and written
   (`write_range`) per range through their own slots, and the new P, whole, fills one slot held across
   the ranges: the slots then need not hold a whole unit's fp32 state (175B width: 6.75 GiB a record).
5. commit the step (manifest), after every write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fuyou_ray.models import ModelSpec
from fuyou_ray.optim import AdamWStep, shard_ranges
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import RingSpec, SlotHandle

MIN_SLOTS = 5  # the optimizer of one unit holds W, m, v, G and the new P at once
# Calls the SSD actor runs at once (a threaded Ray actor). 8, not 4: with the host cache, the optimizer's
# four writes of one unit held all 4 threads while the next unit's gradient read waited (0.17 s in the
# cached 13B-width step on the H100); the copies themselves share the cache's thread pool.
SSD_ACTOR_CONCURRENCY = 8


@dataclass(frozen=True)
class Ref:
    """An argument that is the result of op `op`."""

    op: int


@dataclass(frozen=True)
class Op:
    """One actor call of a step. `after` lists ops that must finish first (passed as extra arguments)."""

    id: int
    actor: str  # "gpu", "ssd" or "opt<k>"
    method: str
    args: tuple[Any, ...]
    after: tuple[int, ...] = ()
    phase: str = ""  # forward / backward / optimizer / commit: for timelines and the simulator
    unit: int = -1
    nbytes: int = 0  # bytes this op moves (I/O) or elements it updates (optimizer)


@dataclass
class StepSchedule:
    """The ops of one step and which of them the driver waits for at the end."""

    ops: list[Op] = field(default_factory=list)
    commit: int = -1
    summary: int = -1
    lookahead: bool = False  # whether it runs the next step's forward (StepInputs.lookahead)

    def add(self, actor: str, method: str, *args: Any, after: Sequence[int] = (), **info: Any) -> int:
        op = Op(len(self.ops), actor, method, tuple(args), tuple(sorted(set(after))), **info)
        self.ops.append(op)
        return op.id


class _Slots:
    """Round-robin slot assignment that records, per slot, the ops that must finish before reuse.

    A slot is held from `take` until its consumers are known (`consumed_by`); the round robin passes over
    held slots. (A unit updated range by range holds its new params' slot across all its ranges.)
    """

    def __init__(self, ring: RingSpec) -> None:
        if ring.num_slots < MIN_SLOTS:
            raise ValueError(f"the ring needs at least {MIN_SLOTS} slots, has {ring.num_slots}")
        self.ring = ring
        self.next = 0
        self.fences: dict[int, list[int]] = {}
        self.held: set[int] = set()

    def take(self) -> tuple[SlotHandle, list[int]]:
        for _ in range(self.ring.num_slots):
            index = self.next
            self.next = (self.next + 1) % self.ring.num_slots
            if index not in self.held:
                self.held.add(index)
                return self.ring.slot(index), self.fences.pop(index, [])
        raise ValueError(
            f"every one of the ring's {self.ring.num_slots} slots is held: the schedule needs more"
        )

    def consumed_by(self, slot: SlotHandle, ops: Sequence[int]) -> None:
        self.held.discard(slot.slot)
        self.fences.setdefault(slot.slot, []).extend(ops)


@dataclass(frozen=True)
class StepInputs:
    """What a step's schedule depends on besides the model: all known before the step starts."""

    step: int  # 0-based index of the step; the committed step after it is step + 1
    inputs: Any  # (global_batch, seq_len) tokens
    targets: Any
    micro_batch: int
    hp: AdamWStep
    max_grad_norm: float
    param_dtype: str
    pool_size: int
    commit_meta: Mapping[str, Any]
    # Replay after a crash: units whose update of this step is already published are not updated again.
    done_units: frozenset[int] = frozenset()
    # Units whose optimizer state the host cache holds (the plan's cpu_cached_state): their optimizer
    # updates the cache's files directly (ssd.lend / ssd.adopt) instead of through ring slots.
    lent_state: frozenset[int] = frozenset()
    # A lent record is a copy of the version read (updated in place); False: the lend makes only the new
    # version's file, which the optimizer writes from the version read (the plan's lend_copy).
    lend_copy: bool = True
    step_key: str = ""  # identifies the step's inputs; every unit of one step is published with it
    # Elements per optimizer range (the plan's optimizer_range): a unit with more is updated range by
    # range - gradient, master weights and moments pass through ring slots one range at a time, so the
    # slots need not hold a whole unit's fp32 state. 0 = whole units.
    state_range: int = 0
    # The host cache holds the gradient log (the plan's grad_log "cpu"): the optimizer reads it in place
    # (ssd.view) instead of through a copy into a ring slot.
    grad_log_cached: bool = False
    # The GPU actor already ran this step's forward and head, ahead, during the previous step's optimizer:
    # the step opens with gpu.check_forward instead of start_step, the forward and the head.
    forward_done: bool = False
    # The next step's (inputs, targets): with exact clipping its forward runs at the end of this step, unit
    # u as soon as the optimizer has made u's new params (from their slot, no read). None: not ahead.
    lookahead: tuple[Any, Any] | None = None


def state_ranges(numel: int, state_range: int) -> list[tuple[int, int]]:
    """The element ranges a unit of `numel` elements is updated in (one: the whole unit)."""
    if state_range <= 0 or numel <= state_range:
        return [(0, numel)]
    return [(lo, min(lo + state_range, numel)) for lo in range(0, numel, state_range)]


def build_step(spec: ModelSpec, ring: RingSpec, s: StepInputs) -> StepSchedule:
    sched = StepSchedule()
    slots = _Slots(ring)
    version = s.step + 1
    last = spec.num_units - 1
    clipping = s.max_grad_norm > 0
    if s.forward_done:
        start = sched.add("gpu", "check_forward", s.step, phase="forward")
    else:
        start = sched.add("gpu", "start_step", s.inputs, s.targets, s.micro_batch, s.step, phase="forward")
    writes: list[int] = []
    logged: dict[int, list[int]] = {}  # unit -> the writes of its gradient log (clipping)
    emits: list[int] = []  # every emit_grad: after the last one, the GPU knows the global norm

    def read(unit: int, kind: RecordKind, phase: str, after: Sequence[int] = ()) -> tuple[int, SlotHandle]:
        slot, fence = slots.take()
        nbytes = spec.units[unit].numel * (4 if kind != RecordKind.PARAM else _itemsize(s.param_dtype))
        op = sched.add(
            "ssd",
            "read",
            record_name(unit, kind),
            slot,
            after=[*fence, *after],
            phase=phase,
            unit=unit,
            nbytes=nbytes,
        )
        return op, slot

    def emit_range(u: int, lo: int, hi: int) -> tuple[int, SlotHandle]:
        """D2H of elements [lo, hi) of G_u into a slot."""
        g_slot, fence = slots.take()
        g_slot = g_slot.carrying(record_name(u, RecordKind.GRAD), "float32", hi - lo, version, first=lo)
        # After `start` too: when the step's start fails (check_forward), its emits fail with it.
        e = sched.add(
            "gpu",
            "emit_grad",
            u,
            g_slot,
            after=[*fence, start],
            phase="backward",
            unit=u,
            nbytes=g_slot.nbytes,
        )
        emits.append(e)
        return e, g_slot

    # 1. forward through every unit but the head (unless it ran ahead, in the previous step)
    lend_after: list[int] = []  # the forward's param reads, then the last lend (see _optimizer)
    for u in range(0 if s.forward_done else last):
        r, slot = read(u, RecordKind.PARAM, "forward")
        lend_after.append(r)
        f = sched.add("gpu", "forward", u, Ref(r), after=[start], phase="forward", unit=u)
        slots.consumed_by(slot, [f])

    # 2-3. head (forward + backward), then backward of the rest, in reverse. Unit u's gradient leaves the
    # device (emit_grad) only after unit u-1's backward was issued, so its D2H overlaps that compute.
    direct: dict[int, tuple[int, SlotHandle]] = {}  # clipping: a gradient the optimizer takes from its slot

    def emit(u: int) -> None:
        numel = spec.units[u].numel
        whole = len(state_ranges(numel, s.state_range)) == 1
        if clipping and u == 0 and whole and u not in s.done_units:
            # The last gradient out is not logged: the optimizer starts with this unit (forward order),
            # right after the clipping coefficient, and takes it from its slot.
            direct[u] = emit_range(u, 0, numel)
            return
        if u in s.done_units or clipping:
            # A replay's done unit only lets go of its gradient; with clipping the gradient is logged.
            for lo, hi in state_ranges(numel, s.state_range):
                e, g_slot = emit_range(u, lo, hi)
                if u in s.done_units:
                    slots.consumed_by(g_slot, [e])
                else:
                    logged.setdefault(u, []).append(
                        _write(sched, slots, Ref(e), g_slot, u, version, numel, transient=True, after=[])
                    )
            writes.extend(logged.get(u, []))
        else:
            _optimizer(
                sched,
                slots,
                spec,
                s,
                u,
                lambda lo, hi: emit_range(u, lo, hi),
                1.0,
                read,
                writes,
                lend_after,
            )

    for u in range(last, -1, -1):
        if u == last and s.forward_done:
            continue  # the head (its forward, loss and backward) ran ahead too
        r, p_slot = read(u, RecordKind.PARAM, "backward")
        method = "head" if u == last else "backward"
        b = sched.add("gpu", method, u, Ref(r), after=[start], phase="backward", unit=u)
        slots.consumed_by(p_slot, [b])
        if u < last:
            emit(u + 1)
    emit(0)

    # The step's loss and norm, read before the GPU may take the next step's batch.
    sched.summary = sched.add("gpu", "step_summary", after=[start], phase="commit")

    # 4. with exact clipping: the coefficient from every gradient's norm (known on the GPU once the last
    # gradient is out, without waiting for the log writes), then the optimizer unit by unit, in forward
    # order: the next step's forward (lookahead) can then follow it unit by unit.
    if clipping:
        coef = sched.add("gpu", "clip_coefficient", s.max_grad_norm, after=emits, phase="optimizer")
        ahead: Callable[[int, SlotHandle, Sequence[int]], list[int]] | None = None
        if s.lookahead is not None and not s.done_units:
            ahead = _lookahead(sched, s, last, after=[sched.summary, coef])
            sched.lookahead = True
        for u in (u for u in range(last + 1) if u not in s.done_units):

            def read_log(lo: int, hi: int, u: int = u) -> tuple[int, SlotHandle | None]:
                if u in direct:
                    return direct[u]
                # A range of the log is readable once the whole log record is staged (its last range).
                if (lo, hi) == (0, spec.units[u].numel):
                    if s.grad_log_cached:
                        name = record_name(u, RecordKind.GRAD)
                        return sched.add(
                            "ssd", "view", name, after=logged[u], phase="optimizer", unit=u
                        ), None
                    return read(u, RecordKind.GRAD, "optimizer", after=logged[u])
                return _read_range(sched, slots, u, RecordKind.GRAD, lo, hi, after=logged[u])

            _optimizer(sched, slots, spec, s, u, read_log, Ref(coef), read, writes, lend_after, ahead)

    # 5. commit after every write
    # The commit takes the step's summary so it can refuse to publish a step whose loss is not finite.
    sched.commit = sched.add(
        "ssd", "commit", version, dict(s.commit_meta), Ref(sched.summary), after=writes, phase="commit"
    )
    return sched


def _optimizer(
    sched: StepSchedule,
    slots: _Slots,
    spec: ModelSpec,
    s: StepInputs,
    u: int,
    grad_range: Callable[[int, int], tuple[int, SlotHandle | None]],
    grad_scale: float | Ref,
    read: Any,
    writes: list[int],
    lend_after: list[int],
    ahead: Callable[[int, SlotHandle, Sequence[int]], list[int]] | None = None,
) -> None:
    """Unit u's update: AdamW over the pool, range by range (`state_ranges`; one range = the whole unit),
    the new P into one slot; then every record's new version is written and the unit is published.
    `grad_range(lo, hi)` adds the op that puts G_u[lo:hi] into a slot, and returns it and the slot (None:
    the op lends the cached gradient log instead). Lends wait for `lend_after` (the forward's param reads):
    their copies would otherwise take the memory bandwidth and copy threads that the first forwards wait
    on (the GPU started 0.36 s into the cached 13B-width step). They also run one at a time, in the
    optimizer's order (a chain: `lend_after` becomes the last lend): twelve lends at once held every call
    thread of the SSD actor, so the backward's param reads and the gradient log's writes waited for them
    (the optimizer started 0.47 s after the GPU was done). `ahead(u, params_slot, updates)`, when
    given, adds the ops that read the new params from their slot besides its write (the next step's
    forward) and returns them."""
    unit = spec.units[u]
    version = s.step + 1
    ranges = state_ranges(unit.numel, s.state_range)
    whole = len(ranges) == 1
    state_kinds = (RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)
    lent: dict[RecordKind, int] = {}
    if u in s.lent_state:  # the optimizer updates a copy in the host cache's files: no ring slot
        for kind in state_kinds:
            lent[kind] = sched.add(
                "ssd",
                "lend",
                record_name(u, kind),
                version,
                s.lend_copy,
                after=lend_after,
                phase="optimizer",
                unit=u,
                nbytes=unit.numel * 4 if s.lend_copy else 0,
            )
            lend_after[:] = [lent[kind]]
    p_out: SlotHandle | None = None
    p_fence: list[int] = []

    def take_params_slot() -> tuple[SlotHandle, list[int]]:
        slot, fence = slots.take()
        return slot.carrying(record_name(u, RecordKind.PARAM), s.param_dtype, unit.numel, version), fence

    if not whole:  # held across the ranges, each of which fills its part
        p_out, p_fence = take_params_slot()
    all_updates: list[int] = []
    unit_writes: list[int] = []
    for lo, hi in ranges:
        g_op, g_slot = grad_range(lo, hi)
        state: dict[RecordKind, tuple[int, SlotHandle | None]] = {}
        for kind in state_kinds:
            if kind in lent:
                state[kind] = (lent[kind], None)
            elif whole:
                state[kind] = read(u, kind, "optimizer")
            else:
                state[kind] = _read_range(sched, slots, u, kind, lo, hi, after=[])
        if p_out is None:
            p_out, p_fence = take_params_slot()
        deps = [op for op, _ in state.values()] + [g_op, *p_fence]
        if isinstance(grad_scale, Ref):
            deps.append(grad_scale.op)
        updates = [
            sched.add(
                f"opt{k}",
                "update",
                Ref(state[RecordKind.MASTER][0]),
                Ref(g_op),
                Ref(state[RecordKind.EXP_AVG][0]),
                Ref(state[RecordKind.EXP_AVG_SQ][0]),
                p_out,
                a,
                b,
                unit.layout.decay_numel,
                s.hp,
                grad_scale,
                after=deps,
                phase="optimizer",
                unit=u,
                nbytes=b - a,
            )
            for k, (a, b) in enumerate(_split(lo, hi, s.pool_size))
        ]
        if g_slot is not None:
            slots.consumed_by(g_slot, updates)
        for op, slot in state.values():
            if slot is not None:
                unit_writes.append(
                    _write(
                        sched, slots, Ref(op), slot, u, version, unit.numel, transient=False, after=updates
                    )
                )
        all_updates += updates
    unit_writes += [
        sched.add(
            "ssd", "adopt", Ref(op), after=all_updates, phase="optimizer", unit=u, nbytes=unit.numel * 4
        )
        for op in lent.values()
    ]
    if p_out is None:
        raise ValueError(f"unit {u} has no elements to update")
    p_bytes = unit.numel * _itemsize(s.param_dtype)
    readers = ahead(u, p_out, all_updates) if ahead is not None else []
    unit_writes.append(_write_new_params(sched, slots, p_out, u, version, all_updates, p_bytes, readers))
    # The unit's update becomes durable as a whole once its four records are written (crash consistency
    # without a second copy of the state: see store.py).
    writes.append(
        sched.add("ssd", "publish", u, version, s.step_key, after=unit_writes, phase="commit", unit=u)
    )


def _split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Elements [lo, hi) split over the optimizer pool."""
    return [(lo + a, lo + b) for a, b in shard_ranges(hi - lo, parts)]


def _read_range(
    sched: StepSchedule, slots: _Slots, u: int, kind: RecordKind, lo: int, hi: int, after: Sequence[int]
) -> tuple[int, SlotHandle]:
    slot, fence = slots.take()
    op = sched.add(
        "ssd",
        "read_range",
        record_name(u, kind),
        slot,
        lo,
        hi,
        after=[*fence, *after],
        phase="optimizer",
        unit=u,
        nbytes=(hi - lo) * 4,
    )
    return op, slot


def _write(
    sched: StepSchedule,
    slots: _Slots,
    src: Ref,
    slot: SlotHandle,
    u: int,
    version: int,
    numel: int,
    transient: bool,
    after: Sequence[int],
) -> int:
    """Write the fp32 record (or range of it) that op `src` left in `slot` as version `version`."""
    phase = "optimizer"
    producer = sched.ops[src.op]
    ranged = producer.method == "read_range" or (
        producer.method == "emit_grad" and (slot.first, slot.numel) not in ((0, numel), (0, 0))
    )
    nbytes = producer.nbytes if producer.method == "read_range" else slot.nbytes if ranged else numel * 4
    if ranged:
        op = sched.add(
            "ssd",
            "write_range",
            src,
            version,
            transient,
            numel,
            after=after,
            phase=phase,
            unit=u,
            nbytes=nbytes,
        )
    else:
        op = sched.add(
            "ssd", "write", src, version, transient, after=after, phase=phase, unit=u, nbytes=nbytes
        )
    slots.consumed_by(slot, [op])
    return op


def _write_new_params(
    sched: StepSchedule,
    slots: _Slots,
    p_out: SlotHandle,
    u: int,
    version: int,
    after: list[int],
    nbytes: int,
    readers: Sequence[int],
) -> int:
    """Write the new params in `p_out` (filled by the ops `after`); `readers` also read the slot."""
    op = sched.add(
        "ssd", "write", p_out, version, False, after=after, phase="optimizer", unit=u, nbytes=nbytes
    )
    slots.consumed_by(p_out, [op, *readers])
    return op


def _lookahead(
    sched: StepSchedule, s: StepInputs, last: int, after: Sequence[int]
) -> Callable[[int, SlotHandle, Sequence[int]], list[int]]:
    """Start the next step on the GPU (after `after`: this step's last reads of its device state) and
    return the function that adds the next step's forward of unit u on its new params, as soon as the
    optimizer has made them: for the head (unit `last`) its one call, forward, loss and backward. Its
    gradient stays on the device until the next step emits it (after that step's first backward), since
    only then may the next step's gradient log be written."""
    if s.lookahead is None:
        raise ValueError("_lookahead needs the next step's batch (StepInputs.lookahead)")
    inputs, targets = s.lookahead
    start = sched.add(
        "gpu", "start_step", inputs, targets, s.micro_batch, s.step + 1, after=after, phase="forward"
    )

    def forward(u: int, params: SlotHandle, updates: Sequence[int]) -> list[int]:
        method, phase = ("head", "backward") if u == last else ("forward", "forward")
        return [sched.add("gpu", method, u, params, after=[start, *updates], phase=phase, unit=u)]

    return forward


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def build_eval(
    spec: ModelSpec, ring: RingSpec, inputs: Any, targets: Any, micro_batch: int, param_dtype: str
) -> StepSchedule:
    """A forward-only pass over one held-out batch; op `summary` returns (loss sum, scored targets).

    Reads the committed params, so it runs between steps; it changes nothing on SSD.
    """
    sched = StepSchedule()
    slots = _Slots(ring)
    last = spec.num_units - 1
    start = sched.add("gpu", "start_step", inputs, targets, micro_batch, phase="eval")
    for u in range(spec.num_units):
        slot, fence = slots.take()
        nbytes = spec.units[u].numel * _itemsize(param_dtype)
        r = sched.add(
            "ssd",
            "read",
            record_name(u, RecordKind.PARAM),
            slot,
            after=fence,
            phase="eval",
            unit=u,
            nbytes=nbytes,
        )
        method = "eval_head" if u == last else "forward"
        f = sched.add("gpu", method, u, Ref(r), after=[start], phase="eval", unit=u)
        slots.consumed_by(slot, [f])
    sched.summary = len(sched.ops) - 1
    return sched
