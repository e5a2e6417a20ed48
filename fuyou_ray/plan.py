"""The plan: what the budgets allow - device, dtypes, ring geometry, optimizer pool - checked up front.

`make_plan` turns a config and the machine into the few numbers the pipeline runs with, and refuses with a
`BudgetError` that says how much would be needed when the budgets cannot hold the model. Knobs the user
did not set are derived here (ring slot size and count from cpu_mem, pool size from the core count).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fuyou_ray.config import RunConfig, format_size
from fuyou_ray.errors import BudgetError
from fuyou_ray.models import ModelSpec
from fuyou_ray.schedule import MIN_SLOTS
from fuyou_ray.store import align_up

WORKING_SLOTS = 2  # slot-sized working buffers a process may hold outside the ring
MAX_USEFUL_SLOTS = 24  # beyond this the ring only adds prefetch the pipeline cannot use yet


@dataclass(frozen=True)
class Plan:
    """The resolved execution plan of a run (saved in the run dir as plan.json)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BudgetError("runtime.device is 'cuda' but no CUDA GPU is visible: use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def estimate_device_bytes(cfg: RunConfig, spec: ModelSpec, dtype_bytes: int) -> int:
    """Peak bytes on the compute device for one step (activations kept at unit boundaries)."""
    m, b = cfg.model, cfg.batch
    tokens, micro_tokens = b.global_batch * b.seq_len, b.micro_batch * b.seq_len
    largest = max(u.numel for u in spec.units)
    boundary = tokens * m.d_model * dtype_bytes * (spec.num_units - 1)  # inputs of units 1..L
    grad_flow = 2 * tokens * m.d_model * dtype_bytes  # gradients w.r.t. unit outputs / inputs
    weights = largest * (2 * dtype_bytes + 4)  # params, their grad, the fp32 accumulator
    # One micro-batch through a block: qkv, attention output, 4h MLP (x2 for GELU), norms; logits in fp32.
    block_work = micro_tokens * m.d_model * dtype_bytes * 16
    head_work = micro_tokens * m.vocab_size * (dtype_bytes + 4 * 3)
    return int(boundary + grad_flow + weights + max(block_work, head_work))


def make_plan(cfg: RunConfig, spec: ModelSpec, cpu_count: int | None = None) -> Plan:
    device = resolve_device(cfg.runtime.device)
    param_dtype = "bfloat16" if device == "cuda" else "float32"
    dtype_bytes = 2 if param_dtype == "bfloat16" else 4
    largest = max(spec.units, key=lambda u: u.numel)
    slot_bytes = align_up(largest.numel * 4)

    # Besides the ring, a process may hold WORKING_SLOTS slot-sized buffers (staging, temporaries).
    min_cpu = (MIN_SLOTS + WORKING_SLOTS) * slot_bytes
    if cfg.budgets.cpu_mem < min_cpu:
        raise BudgetError(
            f"budgets.cpu_mem = {format_size(cfg.budgets.cpu_mem)} is too small for one layer: "
            "the largest unit "
            f"({largest.name}, {largest.numel:,} params) needs {MIN_SLOTS} ring slots plus {WORKING_SLOTS} "
            f"working buffers of {format_size(slot_bytes)} = {format_size(min_cpu)}; raise budgets.cpu_mem "
            "to at least that"
        )
    num_slots = int(min(cfg.budgets.cpu_mem // slot_bytes - WORKING_SLOTS, MAX_USEFUL_SLOTS))

    device_bytes = estimate_device_bytes(cfg, spec, dtype_bytes)
    if device_bytes > cfg.budgets.gpu_mem:
        raise BudgetError(
            f"budgets.gpu_mem = {format_size(cfg.budgets.gpu_mem)} is too small: batch "
            f"{cfg.batch.global_batch}x{cfg.batch.seq_len} (micro-batch {cfg.batch.micro_batch}) needs about "
            f"{format_size(device_bytes)} on the compute device; raise budgets.gpu_mem or lower the batch"
        )

    cpus = cpu_count or os.cpu_count() or 1
    actors = cfg.runtime.optimizer_actors or (1 if cpus < 8 else min(4, cpus // 4))
    threads = cfg.runtime.optimizer_threads or max(1, (cpus - 2) // actors)

    # Copy-on-write versions: a step stages a new copy of every record before it commits.
    state_bytes = sum(align_up(u.numel * dtype_bytes) + 3 * align_up(u.numel * 4) for u in spec.units)
    grad_log = sum(align_up(u.numel * 4) for u in spec.units) if cfg.optimizer.max_grad_norm > 0 else 0
    ssd_needed = 2 * state_bytes + grad_log
    return Plan(
        device=device,
        param_dtype=param_dtype,
        slot_bytes=slot_bytes,
        num_slots=num_slots,
        optimizer_actors=actors,
        optimizer_threads=threads,
        exact_clipping=cfg.optimizer.max_grad_norm > 0,
        device_bytes_needed=device_bytes,
        ring_bytes=num_slots * slot_bytes,
        ssd_bytes_needed=ssd_needed,
    )


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
