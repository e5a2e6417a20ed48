"""The plan: how a run uses the machine - device, dtypes, ring geometry, optimizer pool, tiers, policies.

`make_plan` turns a config and this machine into the few numbers the pipeline runs with today, and refuses
with a `BudgetError` that says how much would be needed when the budgets cannot hold the model. Knobs the
user did not set are derived here (ring slot size and count from cpu_mem, pool size from the core count).

`auto_plan` is the automatic planner (Fuyou's "automatic activation swapping management", widened to every
choice the pipeline has): from the model, the batch, the budgets and a hardware profile it chooses the
micro-batch chunk, prefetch depth, ring size, optimizer pool, where each tensor family of each unit lives
(GPU-resident / CPU-cached / SSD), each block's activation policy and where the optimizer overlaps, by
minimising the step time the simulator (fuyou_ray/simulate.py) predicts. It refuses with a BudgetError
naming the smallest budget that would fit. docs/PLANNER.md describes the model and the search.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from fuyou_ray.activations import ALIGN
from fuyou_ray.config import RunConfig, format_size
from fuyou_ray.costmodel import (
    POLICIES,
    MemoryNeed,
    Workload,
    cpu_memory,
    gpu_memory,
    working_bytes,
)
from fuyou_ray.errors import BudgetError
from fuyou_ray.models import ModelSpec
from fuyou_ray.schedule import MIN_SLOTS
from fuyou_ray.store import CHUNK_BYTES, align_up

if TYPE_CHECKING:
    from fuyou_ray.profile import HardwareProfile
    from fuyou_ray.simulate import Prediction

# Optimizer ranges start on the store's checksum chunks (fp32 state), where ranged I/O may cut a record.
RANGE_ALIGN = CHUNK_BYTES // 4
MAX_USEFUL_SLOTS = 24  # beyond this the ring only adds prefetch the pipeline cannot use yet
TIE_RESOLUTION = 1e-3  # predicted steps closer than this are equal to the planner
OVERLAPS = ("backward", "after_backward", "next_forward")
GRAD_LOGS = ("none", "ssd", "cpu")


@dataclass(frozen=True)
class Plan:
    """The resolved execution plan of a run (saved in the run dir as plan.json).

    The first block of fields is what the pipeline runs with today. The second block is chosen by the
    automatic planner (`auto_plan`); its defaults describe what the pipeline does today, so a plan from
    `make_plan` is truthful about them. Units are numbered as in ModelSpec: 0 = embedding, 1..n_layer =
    blocks, n_layer + 1 = head. Every field:

    device              "cuda" or "cpu" (the CPU fallback runs the same code on host memory)
    param_dtype         dtype of the params P streamed to the device ("bfloat16" on CUDA, else "float32")
    slot_bytes          bytes of one ring slot: the largest unit's fp32 record, 4 KiB-aligned; with
                        optimizer ranges, the largest unit's params or one fp32 range, whichever is larger
    optimizer_range     elements per optimizer range (0 = whole units): a unit with more is updated range
                        by range (its gradient, master weights and moments pass through the ring one range
                        at a time), so a slot need not hold a whole unit's fp32 state. Chosen when cpu_mem
                        cannot hold MIN_SLOTS whole-unit slots (or set: runtime.optimizer_range)
    num_slots           ring slots in /dev/shm (>= MIN_SLOTS); more slots let SSD reads run further ahead
    optimizer_actors    CPU optimizer actors; each unit's AdamW is split into this many element ranges
    optimizer_threads   torch threads of each optimizer actor
    exact_clipping      max_grad_norm > 0: every gradient is needed before the first update
    device_bytes_needed peak bytes on the compute device (the cost model's estimate)
    ring_bytes          num_slots * slot_bytes
    ssd_bytes_needed    SSD space: state, old params until the commit, units in flight, gradient log

    micro_batch         sequences per chunk inside a layer (the whole batch passes through a layer before
                        the next; chunks only bound the device's working memory). 0 = batch.micro_batch
    prefetch_depth      params (and swapped activations) of the next `prefetch_depth` units are copied to
                        the device on a copy stream while the current unit computes; the device holds
                        1 + prefetch_depth param buffers. 0 = copy, then compute (today: inside the call)
    activation_policy   per unit (empty = "keep" everywhere, today). What happens between a block's forward
                        and its backward to what the backward needs:
                          keep       its input stays in device memory; backward recomputes the block's
                                     forward from it (today's pipeline)
                          recompute  its input goes to host memory (device -> host in forward, back in
                                     backward); backward recomputes the forward from it. Nothing stays on
                                     the device between the two passes
                          swap_cpu   everything the backward needs (input, normed inputs, q/k/v, attention
                                     output, MLP activations: costmodel.Workload.activation_bytes) goes to
                                     host memory and comes back; no recompute
                          swap_ssd   as swap_cpu, staged through host memory to SSD and read back
                        The embedding and the head are always "keep" (the embedding's input is the tokens;
                        the head runs forward and backward in one call).
    cpu_cached_params   units whose params P live in host memory between steps: never read from or
                        written to SSD during a step (the optimizer writes the new P into the cache)
    cpu_cached_state    units whose fp32 master weights and Adam moments live in host memory
                        (`make_plan` fills both from cpu_mem beyond the ring, see `fill_cache`;
                        fuyou_ray/cache.py implements them)
    gpu_resident_params units whose params stay on the device across steps (the optimizer's new P is
                        copied in once per step instead of twice, and never read from SSD)
    lend_copy           cached state is lent to the optimizer as a copy of the version read, updated in place
                        (runtime.lend_copy, the default); False = lent without the copy: the optimizer's
                        host kernel reads the version read and writes the new version's file (24 B/param
                        less copied per step)
    cache_write_through cached state and params are also written to SSD every step (durable at every
                        commit, saves only the reads); False = write-back: the pipeline must make the cache
                        crash-consistent itself (e.g. /dev/shm segments that outlive actors, flushed at
                        checkpoints)
    optimizer_overlap   when optimizer(u) runs. "" = today: "backward" without clipping, else
                        "after_backward".
                          backward        as soon as G_u reaches the host, overlapping backward(u-1) (Fuyou;
                                          no clipping possible)
                          after_backward  after the last backward and the clipping coefficient, unit by unit
                          next_forward    ahead of forward(u) of the next step, which takes the new P
                                          straight from the optimizer (exact clipping; the step's
                                          gradients wait in the gradient log)
    grad_log            where gradients wait for the clipping coefficient: "ssd", "cpu", or "none" (no
                        clipping). "" = today: "ssd" with clipping, else "none"
    ssd_queue_depth     requests the SSD actor keeps in flight (the store's io_threads)
    cpu_bytes_needed    peak host bytes of the plan (ring, working buffers, caches, swapped activations)
    predicted_step_s, predicted_tflops, predicted_bottleneck, profile_name
                        the simulator's prediction on the named hardware profile (0 / "" = not predicted)
    """

    device: str  # "cuda" or "cpu"
    param_dtype: str  # dtype of the params streamed to the compute device
    slot_bytes: int
    num_slots: int
    optimizer_actors: int
    optimizer_threads: int
    exact_clipping: bool
    device_bytes_needed: int
    ring_bytes: int
    ssd_bytes_needed: int
    optimizer_range: int = 0
    # ---- chosen by the automatic planner; the defaults are what the pipeline does today ----
    micro_batch: int = 0
    prefetch_depth: int = 0
    activation_policy: tuple[str, ...] = ()
    cpu_cached_params: tuple[int, ...] = ()
    cpu_cached_state: tuple[int, ...] = ()
    gpu_resident_params: tuple[int, ...] = ()
    cache_write_through: bool = False
    lend_copy: bool = True
    optimizer_overlap: str = ""
    grad_log: str = ""
    ssd_queue_depth: int = 8
    cpu_bytes_needed: int = 0
    predicted_step_s: float = 0.0
    predicted_tflops: float = 0.0
    predicted_bottleneck: str = ""
    profile_name: str = ""

    def __post_init__(self) -> None:
        bad = [p for p in self.activation_policy if p not in POLICIES]
        if bad:
            raise ValueError(f"activation_policy: {bad[0]!r} is not one of {', '.join(POLICIES)}")
        if self.optimizer_overlap not in ("", *OVERLAPS):
            raise ValueError(f"optimizer_overlap: {self.optimizer_overlap!r} is not one of {OVERLAPS}")
        if self.grad_log not in ("", *GRAD_LOGS):
            raise ValueError(f"grad_log: {self.grad_log!r} is not one of {GRAD_LOGS}")
        if self.optimizer_overlap == "backward" and self.exact_clipping:
            raise ValueError(
                "optimizer_overlap 'backward' cannot clip exactly: every gradient is needed first"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def policy(self, unit: int) -> str:
        """The activation policy of `unit` ("keep" where none is given)."""
        return self.activation_policy[unit] if unit < len(self.activation_policy) else "keep"

    @property
    def param_bytes(self) -> int:
        """Bytes per element of the streamed params (and of the activations computed from them)."""
        return _itemsize(self.param_dtype)

    @property
    def parked_inputs(self) -> tuple[int, ...]:
        """The units whose input the compute actor parks in host memory ("recompute")."""
        return tuple(u for u, p in enumerate(self.activation_policy) if p == "recompute")

    @property
    def overlap(self) -> str:
        return self.optimizer_overlap or ("after_backward" if self.exact_clipping else "backward")

    @property
    def grad_log_tier(self) -> str:
        if self.grad_log:
            return self.grad_log
        return "none" if self.overlap == "backward" else "ssd"

    def as_current(self) -> Plan:
        """This plan with the planner's fields reset to what the pipeline does today."""
        return replace(
            self,
            prefetch_depth=0,
            activation_policy=(),
            cpu_cached_params=(),
            cpu_cached_state=(),
            gpu_resident_params=(),
            cache_write_through=False,
            optimizer_overlap="",
            grad_log="",
        )


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BudgetError("runtime.device is 'cuda' but no CUDA GPU is visible: use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def estimate_device_bytes(cfg: RunConfig, spec: ModelSpec, dtype_bytes: int, parked: int = 0) -> int:
    """Peak bytes on the compute device for one step: activations kept at unit boundaries, except the
    inputs of `parked` blocks (the first ones), which wait in host memory (fuyou_ray/activations.py). The
    peak comes at the end of the forward, where one parked input may still be on its way out; in the
    backward the parked region holds two (one in use, one arriving), by then the kept inputs are gone."""
    m, b = cfg.model, cfg.batch
    tokens, micro_tokens = b.global_batch * b.seq_len, b.micro_batch * b.seq_len
    largest = max(u.numel for u in spec.units)
    kept = max(spec.num_units - 1 - parked + min(parked, 1), min(parked, 2))  # of units 1..L
    boundary = tokens * m.d_model * dtype_bytes * kept
    grad_flow = 2 * tokens * m.d_model * dtype_bytes  # gradients w.r.t. unit outputs / inputs
    weights = largest * (2 * dtype_bytes + 4)  # params, their grad, the fp32 accumulator
    # One micro-batch through a block: qkv, attention output, 4h MLP (x2 for GELU), norms; logits in fp32.
    block_work = micro_tokens * m.d_model * dtype_bytes * 16
    head_work = micro_tokens * m.vocab_size * (dtype_bytes + 4 * 3)
    return int(boundary + grad_flow + weights + max(block_work, head_work))


def parked_input_bytes(cfg: RunConfig, dtype_bytes: int, parked: int) -> int:
    """Host bytes of the arena holding `parked` blocks' inputs (each micro-batch page-aligned)."""
    b = cfg.batch
    per_micro = -(-b.micro_batch * b.seq_len * cfg.model.d_model * dtype_bytes // ALIGN) * ALIGN
    return parked * b.accum_steps * per_micro


def parking_policy(parked: Sequence[int], num_units: int) -> tuple[str, ...]:
    """`Plan.activation_policy` for a pipeline that parks the inputs of `parked` ("recompute") and keeps
    the others on the device (empty when nothing is parked: "keep" everywhere)."""
    return tuple("recompute" if u in parked else "keep" for u in range(num_units)) if parked else ()


def parked_blocks(cfg: RunConfig, spec: ModelSpec, dtype_bytes: int) -> tuple[int, ...]:
    """The blocks whose inputs wait for the backward in host memory (`runtime.park_block_inputs`): the
    first N blocks, N as configured or (auto, -1) the fewest that bring the device under budgets.gpu_mem.
    The first blocks' inputs are parked because their backward comes last: the longest time to copy back.
    Raises BudgetError when even every block parked does not fit."""
    blocks = range(1, spec.num_units - 1)
    configured = cfg.runtime.park_block_inputs
    if configured >= 0:
        n = min(configured, len(blocks))
    else:
        fitting = (
            k
            for k in range(len(blocks) + 1)
            if estimate_device_bytes(cfg, spec, dtype_bytes, k) <= cfg.budgets.gpu_mem
        )
        n = next(fitting, len(blocks))
    needed = estimate_device_bytes(cfg, spec, dtype_bytes, n)
    if needed > cfg.budgets.gpu_mem:
        parked = f" with the inputs of {n} of {len(blocks)} blocks parked in host memory" if n else ""
        hint = "" if configured < 0 or n == len(blocks) else ", or set runtime.park_block_inputs: -1 (auto)"
        raise BudgetError(
            f"budgets.gpu_mem = {format_size(cfg.budgets.gpu_mem)} is too small: batch "
            f"{cfg.batch.global_batch}x{cfg.batch.seq_len} (micro-batch {cfg.batch.micro_batch}) needs about "
            f"{format_size(needed)} on the compute device{parked}; raise budgets.gpu_mem or lower the batch"
            f"{hint}"
        )
    return tuple(blocks[:n])


# Units whose new version may exist beside the old one before the store publishes them (the SSD actor
# runs up to 4 writes at once, and the optimizer works a few units ahead of publication).
UNITS_IN_FLIGHT = 4


def ssd_bytes_needed(spec: ModelSpec, param_bytes: int, clipping: bool) -> int:
    """SSD space of a run (see fuyou_ray/store.py): the state (params + fp32 master + Adam m, v); the old
    params, kept until the step commits because a replay of the step reads them; the new versions of the
    units in flight; and, with exact clipping, the step's fp32 gradient log."""
    state = sum(align_up(u.numel * param_bytes) + 3 * align_up(u.numel * 4) for u in spec.units)
    params = sum(align_up(u.numel * param_bytes) for u in spec.units)
    largest = sorted(
        (align_up(u.numel * param_bytes) + 3 * align_up(u.numel * 4) for u in spec.units), reverse=True
    )
    in_flight = sum(largest[:UNITS_IN_FLIGHT])
    grad_log = sum(align_up(u.numel * 4) for u in spec.units) if clipping else 0
    return state + params + in_flight + grad_log


def ring_geometry(
    spec: ModelSpec, param_bytes: int, cpu_mem: int, configured_range: int = 0
) -> tuple[int, int]:
    """(ring slot bytes, optimizer range in elements, 0 = whole units) for a model whose params stream in
    `param_bytes`-wide elements. Whole units when MIN_SLOTS slots of the largest unit's fp32 record (plus
    the working buffers) fit `cpu_mem`; else ranges that fill a slot sized for the largest unit's params
    (half the fp32 record in bf16; in fp32 ranges save nothing). `configured_range` (runtime.
    optimizer_range) overrides the choice. Ranges are multiples of RANGE_ALIGN elements."""
    largest = max(u.numel for u in spec.units)
    whole = align_up(largest * 4)
    if configured_range > 0:
        elements = -(-configured_range // RANGE_ALIGN) * RANGE_ALIGN
    elif MIN_SLOTS * whole + working_bytes(spec) <= cpu_mem:
        elements = 0
    else:
        elements = largest * param_bytes // 4 // RANGE_ALIGN * RANGE_ALIGN
    if elements <= 0 or elements >= largest:
        return whole, 0
    return max(align_up(largest * param_bytes), align_up(elements * 4)), elements


def optimizer_pool(cfg: RunConfig, cpus: int) -> tuple[int, int]:
    """(optimizer actors, threads each) that the pipeline starts on `cpus` cores: the config's if set, else
    up to 4 actors sharing the cores the GPU and SSD actors leave."""
    actors = cfg.runtime.optimizer_actors or (1 if cpus < 8 else min(4, cpus // 4))
    threads = cfg.runtime.optimizer_threads or max(1, (cpus - 2) // actors)
    return actors, threads


def make_plan(
    cfg: RunConfig, spec: ModelSpec, cpu_count: int | None = None, device: str | None = None
) -> Plan:
    """The plan the driver runs (`device`: plan for that device instead of the one visible here)."""
    device = device or resolve_device(cfg.runtime.device)
    param_dtype = "bfloat16" if device == "cuda" else "float32"
    dtype_bytes = 2 if param_dtype == "bfloat16" else 4
    largest = max(spec.units, key=lambda u: u.numel)
    slot_bytes, state_range = ring_geometry(
        spec, dtype_bytes, cfg.budgets.cpu_mem, cfg.runtime.optimizer_range
    )

    # The device first: the inputs of the blocks it cannot hold are parked in host memory.
    parked = parked_blocks(cfg, spec, dtype_bytes)
    device_bytes = estimate_device_bytes(cfg, spec, dtype_bytes, len(parked))
    park_bytes = parked_input_bytes(cfg, dtype_bytes, len(parked))

    # Besides the ring, the SSD actor holds working buffers of a whole unit's fp32 size (initialization).
    working = working_bytes(spec) + park_bytes
    min_cpu = MIN_SLOTS * slot_bytes + working
    if cfg.budgets.cpu_mem < min_cpu:
        ranges = f" (optimizer ranges of {state_range:,} elements)" if state_range else ""
        inputs = f" and {format_size(park_bytes)} of parked block inputs" if park_bytes else ""
        raise BudgetError(
            f"budgets.cpu_mem = {format_size(cfg.budgets.cpu_mem)} is too small for one layer: "
            "the largest unit "
            f"({largest.name}, {largest.numel:,} params) needs {MIN_SLOTS} ring slots of "
            f"{format_size(slot_bytes)}{ranges} plus {format_size(working - park_bytes)} of working "
            f"buffers{inputs} = {format_size(min_cpu)}; raise budgets.cpu_mem to at least that"
        )
    num_slots = int(min((cfg.budgets.cpu_mem - working) // slot_bytes, MAX_USEFUL_SLOTS))

    actors, threads = optimizer_pool(cfg, cpu_count or os.cpu_count() or 1)

    ssd_needed = ssd_bytes_needed(spec, dtype_bytes, cfg.optimizer.max_grad_norm > 0)
    plan = Plan(
        device=device,
        param_dtype=param_dtype,
        slot_bytes=slot_bytes,
        num_slots=num_slots,
        optimizer_actors=actors,
        optimizer_threads=threads,
        lend_copy=cfg.runtime.lend_copy or cfg.runtime.adam_kernel == "torch",
        exact_clipping=cfg.optimizer.max_grad_norm > 0,
        device_bytes_needed=device_bytes,
        ring_bytes=num_slots * slot_bytes,
        ssd_bytes_needed=ssd_needed,
        optimizer_range=state_range,
        micro_batch=cfg.batch.micro_batch,
        ssd_queue_depth=cfg.ssd.io_threads,
        cpu_bytes_needed=num_slots * slot_bytes + working,
        activation_policy=parking_policy(parked, spec.num_units),
    )
    if cfg.runtime.cpu_cache == "auto":
        plan = fill_cache(plan, spec, cfg.budgets.cpu_mem, write_through=cfg.runtime.cache_write_through)
    return plan


def cache_bytes(spec: ModelSpec, plan: Plan) -> int:
    """Peak host bytes of the plan's cache (fuyou_ray/cache.py holds what the SSD store would hold):
    - cached optimizer state: 12 B/param (fp32 master, Adam m, v), plus the new versions of the units in
      flight (written, not yet published: up to num_slots / 4 + 2 units, the largest cached ones);
    - cached params: twice (the new version and the old one, which stays until the commit because a
      replay of the step runs forward and backward on it again);
    - the gradient log (grad_log "cpu"): 4 B/param of every unit, from the first backward to the commit.
    Each record is padded to 4 KiB."""
    pb = _itemsize(plan.param_dtype)
    state = sorted((3 * align_up(spec.units[u].numel * 4) for u in plan.cpu_cached_state), reverse=True)
    in_flight = sum(state[: plan.num_slots // 4 + 2])
    params = sum(2 * align_up(spec.units[u].numel * pb) for u in plan.cpu_cached_params)
    grads = sum(align_up(u.numel * 4) for u in spec.units) if plan.grad_log_tier == "cpu" else 0
    return sum(state) + in_flight + params + grads


def fill_cache(plan: Plan, spec: ModelSpec, cpu_mem: int, *, write_through: bool = False) -> Plan:
    """`plan` with its host cache filled greedily from what `cpu_mem` leaves beyond the ring and the
    working buffers (`plan.cpu_bytes_needed`), in order of SSD bytes saved per byte of memory:

    1. optimizer state, unit by unit from the last: 12 B/param read and 12 B/param written per step on
       SSD (write-back; write-through saves the reads only), for 12 B/param plus the units in flight;
    2. the gradient log, with exact clipping (all units or none): 4 B/param written and read back, for
       4 B/param;
    3. params, unit by unit from the last: P read twice (forward, backward) and written once, for 2 P
       (the old version stays until the commit).
    A unit that does not fit is skipped and the next one tried. `cpu_bytes_needed` then counts the cache
    (`cache_bytes`), `ssd_bytes_needed` the SSD space with it (`ssd_bytes_with_cache`).
    """
    base = plan.cpu_bytes_needed
    budget = cpu_mem - base
    order = range(spec.num_units - 1, -1, -1)
    current = replace(plan, cache_write_through=write_through)

    def fits(candidate: Plan) -> bool:
        return cache_bytes(spec, candidate) <= budget

    for u in order:
        trial = replace(current, cpu_cached_state=tuple(sorted((*current.cpu_cached_state, u))))
        if fits(trial):
            current = trial
    # The cache moves records whole; a gradient log written range by range stays on SSD.
    if plan.exact_clipping and not plan.optimizer_range:
        trial = replace(current, grad_log="cpu")
        if fits(trial):
            current = trial
    for u in order:
        trial = replace(current, cpu_cached_params=tuple(sorted((*current.cpu_cached_params, u))))
        if fits(trial):
            current = trial
    cached = cache_bytes(spec, current)
    if not cached:
        return plan
    return replace(
        current, cpu_bytes_needed=base + cached, ssd_bytes_needed=ssd_bytes_with_cache(spec, current)
    )


def ssd_bytes_with_cache(spec: ModelSpec, plan: Plan) -> int:
    """SSD space of a plan with a host cache (`ssd_bytes_needed` without one): the state; the old params
    until the commit and the units in flight, of what a step writes to SSD; the gradient log when it is on
    SSD. Write-back writes the cached records only at flushes, but keeps the previous flush's snapshot
    until the new one is complete (fuyou_ray/durable.py): the state twice at a flush."""
    pb = _itemsize(plan.param_dtype)
    write_back = not plan.cache_write_through and bool(plan.cpu_cached_state or plan.cpu_cached_params)
    state = old_params = 0
    written = []  # per unit: bytes a step writes to SSD (new versions in flight until published)
    for u, unit in enumerate(spec.units):
        p, s = align_up(unit.numel * pb), 3 * align_up(unit.numel * 4)
        state += p + s
        p_on_ssd = not (write_back and u in plan.cpu_cached_params)
        s_on_ssd = not (write_back and u in plan.cpu_cached_state)
        old_params += p if p_on_ssd else 0
        written.append((p if p_on_ssd else 0) + (s if s_on_ssd else 0))
    in_flight = sum(sorted(written, reverse=True)[:UNITS_IN_FLIGHT])
    grad_log = sum(align_up(u.numel * 4) for u in spec.units) if plan.grad_log_tier == "ssd" else 0
    return (2 if write_back else 1) * state + old_params + in_flight + grad_log


def _itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def check_ssd_space(cfg: RunConfig, plan: Plan) -> None:
    """Refuse to start when the SSD directories together lack room for the run (plus 1% slack)."""
    free = 0
    for path in cfg.ssd.paths:
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "/"
        free += shutil.disk_usage(probe).free
    if free < plan.ssd_bytes_needed * 1.01:
        raise BudgetError(
            f"ssd.paths have {format_size(free)} free but the run needs {format_size(plan.ssd_bytes_needed)} "
            "(state, its next version while a step is in flight, and the gradient log); free space or add "
            "directories to ssd.paths"
        )


# ================================================================================ the automatic planner


@dataclass(frozen=True)
class PlannerOptions:
    """What the automatic planner may choose (the defaults let it choose everything the model knows)."""

    micro_batches: tuple[int, ...] = ()  # chunk sizes to try; () = divisors of the batch <= batch.micro_batch
    prefetch_depths: tuple[int, ...] = (0, 1, 2)
    overlaps: tuple[str, ...] = ()  # () = "backward" without clipping, else "next_forward", "after_backward"
    policies: tuple[str, ...] = POLICIES  # activation policies it may use
    cache: tuple[str, ...] = ("params", "state", "grads")  # families it may keep in host memory
    gpu_resident: bool = True  # may keep params on the device across steps
    write_through: bool = False  # cached state is also written to SSD every step
    ring_slots: tuple[int, ...] = (8, 12)  # ring sizes to try (fewer if cpu_mem is short, never < MIN_SLOTS)
    swap_grid: int = 4  # the swapped-block count is searched on this many intervals, then refined


@dataclass(frozen=True)
class PlanResult:
    """The plan `auto_plan` chose, what the simulator predicts for it, and the memory it needs."""

    plan: Plan
    workload: Workload
    prediction: Prediction
    gpu: MemoryNeed
    cpu: MemoryNeed
    evaluated: int  # plans simulated during the search


@dataclass(frozen=True)
class _Choice:
    micro_batch: int
    prefetch_depth: int
    overlap: str
    swapped: int
    slots: int


def workload_of(cfg: RunConfig, spec: ModelSpec, device: str, micro_batch: int | None = None) -> Workload:
    """The step's shape for the cost model (param bytes follow the device: bf16 on CUDA, fp32 on CPU)."""
    return Workload(
        spec=spec,
        global_batch=cfg.batch.global_batch,
        micro_batch=micro_batch or cfg.batch.micro_batch,
        seq_len=cfg.batch.seq_len,
        param_bytes=2 if device == "cuda" else 4,
        clipping=cfg.optimizer.max_grad_norm > 0,
    )


def base_plan(cfg: RunConfig, spec: ModelSpec, profile: HardwareProfile) -> Plan:
    """The fields of a plan that do not depend on the search: device, dtype, slot size, pool, queue depth."""
    device = profile.gpu.device
    param_dtype = "bfloat16" if device == "cuda" else "float32"
    pb = 2 if device == "cuda" else 4
    slot_bytes, state_range = ring_geometry(spec, pb, cfg.budgets.cpu_mem, cfg.runtime.optimizer_range)
    actors, threads = _pool(cfg, profile)
    depths = sorted({r.queue_depth for r in profile.ssd.rates})
    # The queue depth with the best read + write bandwidth (the smallest such: fewer threads).
    qd = max(depths, key=lambda d: (profile.ssd.read_bps(d) + profile.ssd.write_bps(d), -d))
    return Plan(
        device=device,
        param_dtype=param_dtype,
        slot_bytes=slot_bytes,
        num_slots=MIN_SLOTS,
        optimizer_actors=actors,
        optimizer_threads=threads,
        lend_copy=cfg.runtime.lend_copy or cfg.runtime.adam_kernel == "torch",
        exact_clipping=cfg.optimizer.max_grad_norm > 0,
        device_bytes_needed=0,
        ring_bytes=MIN_SLOTS * slot_bytes,
        ssd_bytes_needed=ssd_bytes_needed(spec, pb, cfg.optimizer.max_grad_norm > 0),
        optimizer_range=state_range,
        micro_batch=cfg.batch.micro_batch,
        ssd_queue_depth=qd,
        profile_name=profile.name,
    )


def _pool(cfg: RunConfig, profile: HardwareProfile) -> tuple[int, int]:
    """Optimizer actors and threads: the config's if set, else the cores left after the GPU and SSD actors,
    split into actors of at most 8 threads (one actor per NUMA-sized group keeps memory traffic local)."""
    free = max(1, profile.cpu.cores - 2)
    actors = cfg.runtime.optimizer_actors or max(1, math.ceil(free / 8))
    threads = cfg.runtime.optimizer_threads or max(1, free // actors)
    return actors, threads


def _chunk_options(cfg: RunConfig, options: PlannerOptions) -> list[int]:
    b = cfg.batch.global_batch
    chunks = options.micro_batches or tuple(d for d in range(1, cfg.batch.micro_batch + 1) if b % d == 0)
    return sorted({c for c in chunks if c >= 1 and b % c == 0}, reverse=True)


def _spread(items: Sequence[int], k: int) -> list[int]:
    """k of `items`, evenly spread (so swap traffic interleaves with compute)."""
    n = len(items)
    if k <= 0:
        return []
    if k >= n:
        return list(items)
    return [items[min(n - 1, int((i + 0.5) * n / k))] for i in range(k)]


def _allocate(
    cfg: RunConfig, w: Workload, base: Plan, c: _Choice, options: PlannerOptions
) -> tuple[Plan, MemoryNeed, MemoryNeed] | None:
    """The plan of choice `c` with the budgets filled greedily, or None when `c` does not fit.

    Each budget is filled with the longest prefix of a fixed priority list that fits, so a larger budget
    only ever adds to what a smaller one got. Device memory left after the chunk's working set and the
    param buffers: block inputs kept on the device ("keep" instead of "recompute"), then params resident
    across steps. Host memory left after the ring and the recompute checkpoints, in order of SSD bytes
    saved per byte of memory: params (3: read twice, written once), swapped activations (2: written and
    read back), optimizer state (2), gradient log (2).
    """
    blocks = list(w.blocks())
    swap_ok = "swap_cpu" in options.policies or "swap_ssd" in options.policies
    swapped = set(_spread(blocks, c.swapped if swap_ok else 0))
    rest = [u for u in blocks if u not in swapped]
    ssd_swap = "swap_ssd" if "swap_ssd" in options.policies else "swap_cpu"
    default = "recompute" if "recompute" in options.policies else "keep"
    policy = ["keep"] * w.num_units
    for u in swapped:
        policy[u] = ssd_swap
    for u in rest:
        policy[u] = default
    grad_log = "none" if c.overlap == "backward" else "ssd"
    plan = replace(
        base,
        num_slots=c.slots,
        ring_bytes=c.slots * base.slot_bytes,
        micro_batch=c.micro_batch,
        prefetch_depth=c.prefetch_depth,
        optimizer_overlap=c.overlap,
        grad_log=grad_log,
        activation_policy=tuple(policy),
        cache_write_through=options.write_through,
    )
    gpu_budget, cpu_budget = cfg.budgets.gpu_mem, cfg.budgets.cpu_mem
    # device memory: keep block inputs, then (once every other block keeps) resident params
    gpu_left = gpu_budget - gpu_memory(w, plan).total
    if gpu_left < 0:
        return None
    n_keep = len(rest)
    if default != "keep":
        n_keep = min(len(rest), gpu_left // w.boundary_bytes) if w.boundary_bytes else len(rest)
        if "keep" not in options.policies:
            n_keep = 0
        for u in rest[: int(n_keep)]:
            policy[u] = "keep"
        plan = replace(plan, activation_policy=tuple(policy))
    resident: list[int] = []
    if options.gpu_resident and n_keep == len(rest):
        # (Conservative: the param buffers are not shrunk when the largest unit becomes resident.)
        gpu_left = gpu_budget - gpu_memory(w, plan).total
        for u in range(w.num_units - 1, -1, -1):
            need = w.spec.units[u].numel * w.param_bytes
            if need > gpu_left:
                break
            resident.append(u)
            gpu_left -= need
    # host memory
    cpu_left = cpu_budget - cpu_memory(w, plan).total
    if cpu_left < 0:
        return None
    units = w.spec.units
    items: list[tuple[str, int, int]] = []  # (what, unit, bytes), in priority order
    if "params" in options.cache:
        items += [("params", u, units[u].numel * w.param_bytes) for u in range(w.num_units - 1, -1, -1)]
    if "swap_cpu" in options.policies and ssd_swap == "swap_ssd":
        items += [("activations", u, w.activation_bytes(u)) for u in sorted(swapped)]
    if "state" in options.cache:
        items += [("state", u, units[u].numel * 12) for u in range(w.num_units - 1, -1, -1)]
    if "grads" in options.cache and grad_log == "ssd":
        items.append(("grads", -1, w.numel * 4))
    cached_p: list[int] = []
    cached_s: list[int] = []
    for what, u, need in items:
        if need > cpu_left:
            break
        cpu_left -= need
        if what == "params":
            cached_p.append(u)
        elif what == "activations":
            policy[u] = "swap_cpu"
        elif what == "state":
            cached_s.append(u)
        else:
            grad_log = "cpu"
    plan = replace(
        plan,
        activation_policy=tuple(policy),
        cpu_cached_params=tuple(sorted(cached_p)),
        cpu_cached_state=tuple(sorted(cached_s)),
        grad_log=grad_log,
        gpu_resident_params=tuple(sorted(resident)),
    )
    gpu, cpu = gpu_memory(w, plan), cpu_memory(w, plan)
    if gpu.total > gpu_budget or cpu.total > cpu_budget:
        return None
    return replace(plan, device_bytes_needed=gpu.total, cpu_bytes_needed=cpu.total), gpu, cpu


def auto_plan(
    cfg: RunConfig,
    spec: ModelSpec,
    profile: HardwareProfile,
    options: PlannerOptions | None = None,
    *,
    seeds: Sequence[Plan] = (),
) -> PlanResult:
    """Choose the plan with the shortest predicted step on `profile` within the config's budgets.

    Stage 1: every feasible (chunk, prefetch depth, optimizer overlap) - chunks the largest that fits and
    about halvings of it - on the smallest and largest ring that fit, with the swapped-block count on a
    coarse grid (the step time is close to convex in it: Fuyou's observation). Stage 2: the four best
    settings with every ring size, the swapped count refined. Each candidate's budgets are filled by
    `_allocate` and its step simulated. `seeds` (plans chosen for smaller budgets, as a what-if sweep
    passes them) are evaluated as they are, so a sweep never predicts a slower step for more memory.
    Raises BudgetError naming the smallest budget that would fit when nothing does.
    """
    from fuyou_ray.simulate import predict

    options = options or PlannerOptions()
    base = base_plan(cfg, spec, profile)
    overlaps = options.overlaps or (
        ("next_forward", "after_backward") if cfg.optimizer.max_grad_norm > 0 else ("backward",)
    )
    chunks = _chunk_options(cfg, options)
    if not chunks:
        raise BudgetError(f"no micro-batch size in {options.micro_batches} divides batch.global_batch")
    workloads = {m: workload_of(cfg, spec, base.device, m) for m in chunks}
    n_blocks = len(workloads[chunks[0]].blocks())
    slots_fit = [
        n
        for n in sorted({MIN_SLOTS, *options.ring_slots})
        if n * base.slot_bytes + working_bytes(spec) <= cfg.budgets.cpu_mem
    ]
    if not slots_fit:
        _refuse_cpu(cfg, spec, base)
    results: dict[_Choice, tuple[float, PlanResult] | None] = {}

    def evaluate(c: _Choice) -> float:
        if c not in results:
            fitted = _allocate(cfg, workloads[c.micro_batch], base, c, options)
            if fitted is None:
                results[c] = None
            else:
                plan, gpu, cpu = fitted
                pred = predict(workloads[c.micro_batch], plan, profile)
                plan = replace(
                    plan,
                    predicted_step_s=pred.step_s,
                    predicted_tflops=pred.tflops,
                    predicted_bottleneck=pred.bottleneck,
                )
                results[c] = (pred.step_s, PlanResult(plan, workloads[c.micro_batch], pred, gpu, cpu, 0))
        result = results[c]
        return result[0] if result is not None else math.inf

    def rank(c: _Choice) -> tuple[float, int, int, int, int]:
        """Shorter predicted step first, compared at 0.1% resolution (the model is no finer); among equals
        the larger chunk (robust GPU efficiency), then less prefetch, a smaller ring, fewer swapped blocks."""
        t = evaluate(c)
        bucket = math.inf if math.isinf(t) else round(math.log(max(t, 1e-12)) / math.log1p(TIE_RESOLUTION))
        return (bucket, -c.micro_batch, c.prefetch_depth, c.slots, c.swapped)

    def fits(c: _Choice) -> bool:
        return _allocate(cfg, workloads[c.micro_batch], base, c, options) is not None

    swapping = n_blocks > 0 and bool({"swap_cpu", "swap_ssd"} & set(options.policies))

    def coarse(c: _Choice) -> _Choice:
        """The best swapped-block count on a coarse grid (the step time is close to convex in it)."""
        if not swapping:
            return replace(c, swapped=0)
        grid = sorted({round(i * n_blocks / options.swap_grid) for i in range(options.swap_grid + 1)})
        return min((replace(c, swapped=k) for k in grid), key=rank)

    def refine(c: _Choice) -> _Choice:
        """Integer refinement of the swapped-block count around `c`, halving the step."""
        best = c
        step = max(1, n_blocks // options.swap_grid // 2)
        while swapping and step >= 1:
            around = [replace(best, swapped=k) for k in (best.swapped - step, best.swapped + step)]
            best = min([best, *[a for a in around if 0 <= a.swapped <= n_blocks]], key=rank)
            step //= 2
        return best

    # Memory needs are monotone in the swapped-block count (device: swapping needs room for a chunk in
    # flight; host: fewer recompute checkpoints), so its two ends tell whether a setting can fit at all.
    def feasible(m: int, depth: int, overlap: str, slots: int) -> bool:
        return any(fits(_Choice(m, depth, overlap, k, slots)) for k in (0, n_blocks))

    usable = [
        m
        for m in chunks
        if any(feasible(m, d, o, slots_fit[0]) for d in options.prefetch_depths for o in overlaps)
    ]
    if not usable:
        _refuse(cfg, spec, base, workloads, chunks)
    # Stage 1: every feasible (chunk, prefetch depth, overlap) on the smallest and the largest ring that
    # fit, coarsely. Chunks: the largest that fits and about halvings of it (GEMM efficiency saturates;
    # smaller chunks only free device memory).
    spread = sorted({min(usable, key=lambda m: abs(m - usable[0] / 2**i)) for i in range(5)}, reverse=True)
    stage1 = []
    for m in spread:
        for depth in sorted(options.prefetch_depths):
            for overlap in overlaps:
                rings = [n for n in slots_fit if feasible(m, depth, overlap, n)]
                for ring in sorted({rings[0], rings[-1]} if rings else set()):
                    stage1.append(coarse(_Choice(m, depth, overlap, 0, ring)))
    # Stage 2: the best four settings with every ring size (the ring competes with caches for host
    # memory), each refined.
    stage1.sort(key=rank)
    settings: list[_Choice] = []
    for c in stage1:
        if all(
            (c.micro_batch, c.prefetch_depth, c.overlap) != (o.micro_batch, o.prefetch_depth, o.overlap)
            for o in settings
        ):
            settings.append(c)
    stage2 = [refine(replace(c, slots=n)) for c in settings[:4] for n in slots_fit]
    best = min([*stage1, *stage2], key=rank)
    got = results[best]
    assert got is not None
    chosen = replace(got[1], evaluated=len([r for r in results.values() if r is not None]))
    # Plans chosen for smaller budgets (a what-if sweep passes them), exactly as they were: they still fit,
    # so the step predicted here is never slower than theirs.
    for seed in seeds:
        w = workloads.get(seed.micro_batch)
        if w is None or seed.overlap not in overlaps:
            continue
        gpu, cpu = gpu_memory(w, seed), cpu_memory(w, seed)
        if gpu.total > cfg.budgets.gpu_mem or cpu.total > cfg.budgets.cpu_mem:
            continue
        pred = predict(w, seed, profile)
        if pred.step_s < chosen.prediction.step_s:
            plan = replace(
                seed,
                predicted_step_s=pred.step_s,
                predicted_tflops=pred.tflops,
                predicted_bottleneck=pred.bottleneck,
                profile_name=profile.name,
            )
            chosen = PlanResult(plan, w, pred, gpu, cpu, chosen.evaluated + 1)
    return chosen


def _minimal(base: Plan, w: Workload, policy: str) -> Plan:
    """The least memory-hungry plan for workload `w`: no prefetch, nothing kept, cached or resident."""
    pol = ["keep"] * w.num_units
    for u in w.blocks():
        pol[u] = policy
    return replace(
        base,
        micro_batch=w.micro_batch,
        prefetch_depth=0,
        activation_policy=tuple(pol),
        num_slots=MIN_SLOTS,
        ring_bytes=MIN_SLOTS * base.slot_bytes,
        optimizer_overlap="backward" if not w.clipping else "after_backward",
    )


def minimal_needs(cfg: RunConfig, spec: ModelSpec, profile: HardwareProfile) -> tuple[MemoryNeed, MemoryNeed]:
    """(device, host) memory of the smallest plan the planner could choose for this config."""
    base = base_plan(cfg, spec, profile)
    chunks = _chunk_options(cfg, PlannerOptions()) or [1]
    w = workload_of(cfg, spec, base.device, chunks[-1])
    gpu = gpu_memory(w, _minimal(base, w, "recompute"))
    cpu = min((cpu_memory(w, _minimal(base, w, p)) for p in ("recompute", "swap_ssd")), key=lambda m: m.total)
    return gpu, cpu


def _refuse(
    cfg: RunConfig, spec: ModelSpec, base: Plan, workloads: dict[int, Workload], chunks: list[int]
) -> NoReturn:
    w = workloads[chunks[-1]]
    gpu = gpu_memory(w, _minimal(base, w, "recompute"))
    if gpu.total > cfg.budgets.gpu_mem:
        parts = ", ".join(f"{k} {format_size(v)}" for k, v in gpu.parts.items() if v)
        raise BudgetError(
            f"budgets.gpu_mem = {format_size(cfg.budgets.gpu_mem)} is too small for batch "
            f"{cfg.batch.global_batch}x{cfg.batch.seq_len} of this model: the smallest plan (micro-batch "
            f"{w.micro_batch}, no prefetch, every block recomputed from a host checkpoint) needs "
            f"{format_size(gpu.total)} on the device ({parts}); raise budgets.gpu_mem to at least "
            f"{format_size(gpu.total)}, or lower batch.global_batch / batch.micro_batch"
        )
    _refuse_cpu(cfg, spec, base, w)


def _refuse_cpu(cfg: RunConfig, spec: ModelSpec, base: Plan, w: Workload | None = None) -> NoReturn:
    w = w or workload_of(cfg, spec, base.device, 1)
    cpu = min((cpu_memory(w, _minimal(base, w, p)) for p in ("recompute", "swap_ssd")), key=lambda m: m.total)
    parts = ", ".join(f"{k} {format_size(v)}" for k, v in cpu.parts.items() if v)
    raise BudgetError(
        f"budgets.cpu_mem = {format_size(cfg.budgets.cpu_mem)} is too small: the smallest plan needs "
        f"{format_size(cpu.total)} of host memory ({parts}); raise budgets.cpu_mem to at least "
        f"{format_size(cpu.total)}"
    )


def largest_batch(cfg: RunConfig, spec: ModelSpec, profile: HardwareProfile, limit: int = 1 << 16) -> int:
    """The largest global batch (micro-batch chunks of 1 allowed) whose smallest plan fits the budgets."""

    def ok(batch: int) -> bool:
        trial = dataclasses.replace(
            cfg, batch=dataclasses.replace(cfg.batch, global_batch=batch, micro_batch=1)
        )
        gpu, cpu = minimal_needs(trial, spec, profile)
        return gpu.total <= cfg.budgets.gpu_mem and cpu.total <= cfg.budgets.cpu_mem

    if not ok(1):
        return 0
    lo = 1
    while lo * 2 <= limit and ok(lo * 2):
        lo *= 2
    hi = min(limit, lo * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def largest_layers(cfg: RunConfig, spec: ModelSpec, profile: HardwareProfile) -> int | None:
    """The most blocks of this width whose SSD space (`ssd_bytes_needed`) fits the profile's SSD capacity
    (None: capacity unknown).

    Device memory does not grow with depth, and host memory need not (activations can go to SSD), so at a
    given width the SSD decides: each block needs its state, its old params until the commit and, with
    clipping, its gradient log; the units in flight add a few blocks' state once.
    """
    cap = profile.ssd.capacity_bytes
    if cap <= 0:
        return None
    pb = 2 if profile.gpu.device == "cuda" else 4
    clipping = cfg.optimizer.max_grad_norm > 0

    def per_unit(numel: int) -> int:
        return 2 * align_up(numel * pb) + 3 * align_up(numel * 4) + (align_up(numel * 4) if clipping else 0)

    if spec.num_units <= 2:
        return None
    block = per_unit(spec.units[1].numel)
    largest = max(align_up(u.numel * pb) + 3 * align_up(u.numel * 4) for u in spec.units)
    fixed = per_unit(spec.units[0].numel) + per_unit(spec.units[-1].numel) + UNITS_IN_FLIGHT * largest
    return max(0, int((cap / 1.01 - fixed) // block))
