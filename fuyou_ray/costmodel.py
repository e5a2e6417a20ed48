"""The cost model: what one training step asks of each resource, and how much memory a plan needs.

Both the closed-form bound and the event simulator (fuyou_ray/simulate.py) price work with the functions
here, so the two can never disagree about a FLOP or a byte:

- `unit_forward_flops`, `call_seconds`: GPU work of a unit call and its time at the profile's rate for the
  call's size (a micro-batch chunk; small calls run below the asymptotic rate).
- `account_step`: per-step totals - FLOPs executed (recompute included) and model FLOPs (6 x params x
  tokens + attention, as the driver reports TFLOPS), bytes host->device and device->host, SSD bytes read and
  written, host-cache bytes copied, optimizer elements - for a `Plan` (tier of each tensor family per unit,
  activation policy, optimizer overlap). `ResourceTimes` turns them into T_gpu, T_pcie, T_ssd, T_cpu,
  T_memcpy and the bound max(T_gpu, T_pcie, T_ssd, T_cpu, T_memcpy): no schedule can beat it.

The host cache (fuyou_ray/cache.py) is priced as the SSD actor runs it: a read of a cached record copies it
from its /dev/shm file into a ring slot, a write copies the slot into a new file (memcpy at the profile's
`cpu.memcpy_gbps`), and write-through also writes it to SSD (the gradient log, a transient record, never).
- `gpu_memory`, `cpu_memory`: the peak bytes a plan needs on the compute device and in host memory, by part.

Activation sizes follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), without dropout and with a fused attention kernel (torch's scaled_dot_product_attention on CUDA
saves q, k, v and its output, not the s x s scores): per token a block saves its two norm inputs, the two
normed inputs, q/k/v, the attention output and the MLP's hidden activations (two of width m for GELU, three
for SwiGLU), in the compute dtype - 32 bytes per token per unit of width for a GPT block in 16 bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fuyou_ray.models import ModelSpec
from fuyou_ray.profile import HardwareProfile
from fuyou_ray.store import STAGING_BYTES

if TYPE_CHECKING:
    from fuyou_ray.plan import Plan

BACKWARD_TRANSIENT_PER_TOKEN_WIDTH = 16  # gradients w.r.t. the 4h-wide MLP activations, live in backward
HEAD_BYTES_PER_TOKEN_VOCAB_EXTRA = 12  # fp32 logits, softmax and its gradient beside the 16-bit logits
GRAD_BYTES = 4  # gradients leave the device in fp32
STATE_BYTES = 12  # fp32 master weights + Adam m + v

POLICIES = ("keep", "swap_cpu", "swap_ssd", "recompute")


@dataclass(frozen=True)
class Workload:
    """The shape of one step: the model, the batch and its chunking, the dtype params stream in."""

    spec: ModelSpec
    global_batch: int
    micro_batch: int  # sequences per chunk inside a layer
    seq_len: int
    param_bytes: int  # 2 (bf16 on a GPU) or 4 (fp32 on the CPU fallback)
    clipping: bool

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def chunk_tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def chunks(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def d_model(self) -> int:
        return self.spec.config.d_model

    @property
    def num_units(self) -> int:
        return self.spec.num_units

    @property
    def numel(self) -> int:
        return self.spec.numel

    def kind(self, unit: int) -> str:
        if unit == 0:
            return "embed"
        if unit == self.num_units - 1:
            return "head"
        return "block"

    def blocks(self) -> range:
        return range(1, self.num_units - 1)

    @property
    def boundary_bytes(self) -> int:
        """One unit's input for the whole batch (the layer-boundary activation)."""
        return self.tokens * self.d_model * self.param_bytes

    def activation_bytes(self, unit: int, tokens: int | None = None) -> int:
        """Everything unit `unit`'s backward needs from its forward (what swapping moves), whole batch."""
        if self.kind(unit) != "block":
            return 0
        h, q, kv, m = widths(self.spec)
        hidden = 3 * m if self.spec.config.arch == "llama" else 2 * m
        per_token = 5 * h + q + 2 * kv + hidden
        return per_token * (self.tokens if tokens is None else tokens) * self.param_bytes

    def model_flops(self) -> float:
        """Training FLOPs of the step by the driver's convention (6 N T + attention; no recompute)."""
        return self.spec.flops_per_token(self.seq_len) * self.tokens


def widths(spec: ModelSpec) -> tuple[int, int, int, int]:
    """(model width, query width, key/value width, MLP width) of a block."""
    cfg = spec.config
    head = getattr(cfg, "head_size", cfg.d_model // cfg.n_head)
    kv_heads = getattr(cfg, "kv_heads", cfg.n_head)
    return cfg.d_model, cfg.n_head * head, kv_heads * head, getattr(cfg, "mlp_width", 4 * cfg.d_model)


def unit_forward_flops(w: Workload, unit: int, tokens: int | None = None) -> float:
    """Forward FLOPs of `unit` on `tokens` tokens (default: the whole batch). The embedding is a gather."""
    t = w.tokens if tokens is None else tokens
    numel = w.spec.units[unit].numel
    kind = w.kind(unit)
    if kind == "embed":
        return 0.0
    if kind == "head":
        return 2.0 * numel * t
    return 2.0 * numel * t + 4.0 * t * w.seq_len * widths(w.spec)[1]


def call_flops(w: Workload, unit: int, method: str) -> float:
    """FLOPs of one GPU call over the whole batch.

    forward: F. head: forward + backward (3F). backward with recompute (policy keep / recompute): the
    forward again, then backward (3F). backward of a swapped unit (its activations came back): 2F.
    """
    f = unit_forward_flops(w, unit)
    return {"forward": 1.0, "head": 3.0, "backward": 3.0, "backward_swapped": 2.0}[method] * f


def call_seconds(w: Workload, unit: int, method: str, profile: HardwareProfile) -> float:
    """Time of one GPU call: its FLOPs at the profile's rate for the size of one chunk."""
    flops = call_flops(w, unit, method)
    if flops <= 0:
        return 0.0
    chunk_work = unit_forward_flops(w, unit, w.chunk_tokens)
    return flops / profile.gpu.block_rate(chunk_work)


def backward_method(w: Workload, unit: int, policy: str) -> str:
    if w.kind(unit) == "head":
        return "head"
    if w.kind(unit) == "embed":
        return "backward_swapped"  # nothing to recompute: the embedding's input is the tokens
    return "backward_swapped" if policy in ("swap_cpu", "swap_ssd") else "backward"


# ---------------------------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class ResourceTimes:
    """Seconds each resource needs for a step's work, alone: the lower bound of any schedule."""

    gpu: float
    pcie: float
    ssd: float
    cpu: float
    memcpy: float = 0.0  # host-cache copies (cache file <-> ring slot)

    def as_dict(self) -> dict[str, float]:
        return {"gpu": self.gpu, "pcie": self.pcie, "ssd": self.ssd, "cpu": self.cpu, "memcpy": self.memcpy}

    @property
    def bound(self) -> float:
        return max(self.gpu, self.pcie, self.ssd, self.cpu, self.memcpy)

    @property
    def bottleneck(self) -> str:
        d = self.as_dict()
        return max(d, key=lambda k: d[k])


@dataclass(frozen=True)
class StepAccount:
    """Per-step totals of a plan (closed form)."""

    gpu_flops: float  # executed, recompute included
    model_flops: float  # 6 N T + attention
    gpu_seconds: float  # the calls' FLOPs at their size-dependent rates
    h2d_bytes: int
    d2h_bytes: int
    ssd_read_bytes: int
    ssd_write_bytes: int
    adam_elements: int
    detail: dict[str, int] = field(
        default_factory=dict
    )  # bytes by what moves (params, state, activations...)
    cache_read_bytes: int = 0  # host cache -> ring slot copies
    cache_write_bytes: int = 0  # ring slot -> host cache copies

    def times(self, profile: HardwareProfile, queue_depth: int, adam_threads: int) -> ResourceTimes:
        pcie = profile.pcie
        t_pcie = max(self.h2d_bytes / (pcie.h2d_gbps * 1e9), self.d2h_bytes / (pcie.d2h_gbps * 1e9))
        if pcie.duplex_gbps > 0:
            t_pcie = max(t_pcie, (self.h2d_bytes + self.d2h_bytes) / (pcie.duplex_gbps * 1e9))
        t_ssd = ssd_seconds(profile, queue_depth, self.ssd_read_bytes, self.ssd_write_bytes)
        t_cpu = self.adam_elements / profile.cpu.adam_rate(adam_threads)
        t_copy = (self.cache_read_bytes + self.cache_write_bytes) / profile.cpu.memcpy_bps()
        return ResourceTimes(self.gpu_seconds, t_pcie, t_ssd, t_cpu, t_copy)


def ssd_seconds(profile: HardwareProfile, queue_depth: int, read: float, write: float) -> float:
    """Least time to read `read` and write `write` bytes: alone, or partly at once at the mixed rates.

    A small linear program (time in read-only, write-only and mixed modes); its optimum is one of these.
    """
    r = profile.ssd.read_bps(queue_depth)
    wr = profile.ssd.write_bps(queue_depth)
    best = read / r + write / wr
    mr, mw = profile.ssd.shared_bps(queue_depth, 1, 1)
    if mr > 0 and mw > 0:
        both = min(read / mr, write / mw)  # time spent in the mixed mode
        best = min(best, both + (read - mr * both) / r + (write - mw * both) / wr)
    return best


def account_step(
    w: Workload, plan: Plan, profile: HardwareProfile, *, schedule: str = "planned"
) -> StepAccount:
    """What the step of `plan` moves and computes (see the module docstring).

    `schedule` says whose step: "planned" (fuyou_ray.simulate.build_planned_step: a "cpu" gradient log is
    host memory the gradients land in and the optimizer reads, no copies) or "current" (build_step as the
    pipeline runs it: the gradient log is a record like any other, so a cached one is copied into the host
    cache in backward and back into a ring slot for the optimizer). Both read and write cached params and
    state through ring slots, as the SSD actor's CachedStore does.
    """
    if schedule not in ("planned", "current"):
        raise ValueError(f"schedule must be 'planned' or 'current', got {schedule!r}")
    pb = w.param_bytes
    units = w.spec.units
    last = w.num_units - 1
    overlap = plan.overlap
    cached_p, cached_s = set(plan.cpu_cached_params), set(plan.cpu_cached_state)
    resident = set(plan.gpu_resident_params)
    through = plan.cache_write_through
    d: dict[str, int] = {
        "h2d params": 0,
        "h2d activations": 0,
        "d2h grads": 0,
        "d2h activations": 0,
        "ssd read params": 0,
        "ssd read state": 0,
        "ssd read grads": 0,
        "ssd read activations": 0,
        "ssd write params": 0,
        "ssd write state": 0,
        "ssd write grads": 0,
        "ssd write activations": 0,
        "cache read params": 0,
        "cache read state": 0,
        "cache read grads": 0,
        "cache write params": 0,
        "cache write state": 0,
        "cache write grads": 0,
    }
    flops = seconds = 0.0
    for u in range(w.num_units):
        p_bytes = units[u].numel * pb
        visits = 1 if u == last else 2
        policy = plan.policy(u)
        # params onto the device: each visit, or once (the updated copy) when resident
        d["h2d params"] += p_bytes if u in resident else visits * p_bytes
        if u not in resident:
            # the first visit takes the new P from the optimizer's slot: the planned next_forward, or
            # today's lookahead (with clipping, the next step's forward and head run on the new params)
            ahead = schedule == "current" and w.clipping
            from_opt = 1 if (overlap == "next_forward" and schedule == "planned") or ahead else 0
            tier = "cache" if u in cached_p else "ssd"
            d[f"{tier} read params"] += (visits - from_opt) * p_bytes
        # the optimizer's new params: into the cache, and to SSD unless cached write-back
        if u in cached_p:
            d["cache write params"] += p_bytes
        if u not in cached_p or through:
            d["ssd write params"] += p_bytes
        # activations
        if w.kind(u) == "block":
            moved = w.activation_bytes(u) if policy in ("swap_cpu", "swap_ssd") else 0
            if policy == "recompute":
                moved = w.boundary_bytes
            d["d2h activations"] += moved
            d["h2d activations"] += moved
            if policy == "swap_ssd":
                d["ssd write activations"] += moved
                d["ssd read activations"] += moved
        # gradients and optimizer state
        g_bytes = units[u].numel * GRAD_BYTES
        d["d2h grads"] += g_bytes
        # today's schedule does not log the last gradient out (unit 0, updated whole): the optimizer
        # starts with it and takes it from its slot
        logged = schedule != "current" or u != 0 or 0 < plan.optimizer_range < units[0].numel
        if logged and plan.grad_log_tier == "ssd":
            d["ssd write grads"] += g_bytes
            d["ssd read grads"] += g_bytes
        elif logged and plan.grad_log_tier == "cpu" and schedule == "current":
            # a transient record: write-through leaves it in the cache too. The optimizer reads it in place
            # (CachedStore.view): copied into the cache, never back out.
            d["cache write grads"] += g_bytes
        s_bytes = units[u].numel * STATE_BYTES
        if u in cached_s:
            if schedule != "current":
                d["cache write state"] += s_bytes
                d["cache read state"] += s_bytes
            elif plan.lend_copy:
                # today's pipeline lends cached state to the optimizer: one copy within the cache (without
                # it, the optimizer's out-of-place AdamW reads the old version and writes the new one)
                d["cache write state"] += s_bytes
        else:
            d["ssd read state"] += s_bytes
        if u not in cached_s or through:
            d["ssd write state"] += s_bytes
        fwd = "forward" if u != last else None
        if fwd:
            flops += call_flops(w, u, fwd)
            seconds += call_seconds(w, u, fwd, profile)
        method = backward_method(w, u, policy)
        flops += call_flops(w, u, method)
        seconds += call_seconds(w, u, method, profile)

    def total(prefix: str) -> int:
        return sum(v for k, v in d.items() if k.startswith(prefix))

    return StepAccount(
        gpu_flops=flops,
        model_flops=w.model_flops(),
        gpu_seconds=seconds,
        h2d_bytes=d["h2d params"] + d["h2d activations"],
        d2h_bytes=d["d2h grads"] + d["d2h activations"],
        ssd_read_bytes=total("ssd read"),
        ssd_write_bytes=total("ssd write"),
        adam_elements=w.numel,
        detail=d,
        cache_read_bytes=total("cache read"),
        cache_write_bytes=total("cache write"),
    )


# ---------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryNeed:
    """Peak bytes of one tier, by part."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def gpu_memory(w: Workload, plan: Plan) -> MemoryNeed:
    """Peak bytes on the compute device for one step of `plan`.

    Param buffers: 1 + prefetch_depth copies of the largest streamed unit. Backward of a unit holds its
    gradient in the compute dtype (from autograd) plus an fp32 accumulator when the batch is split into
    several chunks. Units with policy keep hold their input (the boundary activation) from forward to
    backward; every unit in flight holds its input and output (forward) or input, output gradient and input
    gradient (backward). One chunk's working set: its saved activations and backward transients (twice
    the saved activations for swapped units: the next chunk's are in flight), or the head's logits.
    """
    pb = w.param_bytes
    units = w.spec.units
    resident = set(plan.gpu_resident_params)
    streamed = [units[u].numel for u in range(w.num_units) if u not in resident] or [0]
    largest = max(u.numel for u in units)
    policies = [plan.policy(u) for u in w.blocks()]
    block_work, head_work = chunk_working_sets(w, plan)
    return MemoryNeed(
        {
            "param buffers": (1 + plan.prefetch_depth) * max(streamed) * pb,
            "gradient of one unit": largest * (pb + (4 if w.chunks > 1 else 0)),
            "resident params": sum(units[u].numel for u in resident) * pb,
            "kept boundary activations": policies.count("keep") * w.boundary_bytes,
            "unit in flight (in/out/grads)": 3 * w.boundary_bytes,
            "one chunk's working set": max(block_work, head_work),
        }
    )


def chunk_working_sets(w: Workload, plan: Plan) -> tuple[int, int]:
    """Device bytes one chunk of (a block, the head) holds: a block's saved activations and backward
    transients (twice the activations when blocks are swapped: the next chunk's are in flight); the head's
    logits in the compute dtype plus their fp32 copies for the loss and its gradient."""
    tc = w.chunk_tokens
    act_chunk = w.activation_bytes(1, tc) if w.num_units > 2 else 0
    transient = BACKWARD_TRANSIENT_PER_TOKEN_WIDTH * tc * w.d_model * w.param_bytes // 2
    swapping = any(plan.policy(u) in ("swap_cpu", "swap_ssd") for u in w.blocks())
    block = act_chunk * (2 if swapping else 1) + transient
    head = tc * w.spec.config.vocab_size * (w.param_bytes + HEAD_BYTES_PER_TOKEN_VOCAB_EXTRA)
    return block, head


def working_bytes(spec: ModelSpec) -> int:
    """Host buffers outside the ring: `SSDIOActor.initialize` holds the largest unit's fp32 weights and a
    staging buffer of the same size, or of STAGING_BYTES when the unit is larger (it then writes records
    in ranges), whatever the ring's slots."""
    unit = -(-max(u.numel for u in spec.units) * 4 // 4096) * 4096
    return unit + min(unit, STAGING_BYTES)


def cpu_memory(w: Workload, plan: Plan) -> MemoryNeed:
    """Peak host bytes of `plan`: the ring and working buffers, caches, swapped activations, grad log."""
    policies = {u: plan.policy(u) for u in w.blocks()}
    swap_ssd = [u for u, p in policies.items() if p == "swap_ssd"]
    staging = 2 * max((w.activation_bytes(u) // w.chunks for u in swap_ssd), default=0)
    return MemoryNeed(
        {
            "ring": plan.num_slots * plan.slot_bytes,
            "working buffers": working_bytes(w.spec),
            "cached params": _numel(w, plan.cpu_cached_params) * w.param_bytes,
            "cached optimizer state": _numel(w, plan.cpu_cached_state) * STATE_BYTES,
            "gradient log": w.numel * GRAD_BYTES if plan.grad_log_tier == "cpu" else 0,
            "swapped activations": sum(w.activation_bytes(u) for u, p in policies.items() if p == "swap_cpu"),
            "recompute checkpoints": sum(w.boundary_bytes for p in policies.values() if p == "recompute"),
            "activation staging": staging,
        }
    )


def _numel(w: Workload, units: Iterable[int]) -> int:
    return sum(w.spec.units[u].numel for u in units)
