"""`fuyou-ray bench`: measure the machine's component rates and the pipeline against its hardware bound.

One run (one process) does everything, so every figure in the table comes from the same machine state:
1. component rates for this config's shapes: GPU TFLOPS of plain in-GPU PyTorch training (forward +
   backward) of one block - also the peer the pipeline is compared with -, PCIe H2D / D2H from pinned
   memory, SSD read / write / both at once through the project's own store at the pipeline's request size
   and queue depth, and CPU AdamW Gparam/s of the whole optimizer pool at once (the actors' HostAdamW);
2. warm-up steps, then N measured steps of the real pipeline (Ray actors, ring, store);
3. the work one step does (FLOPs incl. recompute, PCIe bytes, SSD bytes counted by the SSD actor - the
   median step's, so a step after a start that reads a cold host cache and the end's flush of a write-back
   cache are left out -, Adam elements) divided by those rates gives each resource's busy time; the bound
   is the largest of them, efficiency = bound / measured step time. The host cache (what the plan keeps in
   CPU memory instead of on SSD: fuyou_ray/cache.py) is reported with its size and SSD bytes per step.
Results: a printed table, bench.json and timeline.png (per-lane busy intervals of the last step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.cpu_adam import pool_rate
from fuyou_ray.errors import RunStateError
from fuyou_ray.models import ModelSpec


@dataclass(frozen=True)
class Rates:
    """Measured component rates (bytes/s, FLOP/s, params/s)."""

    device: str
    gpu_flops: float  # plain in-GPU training of one block (fwd + bwd), model FLOPs / s
    h2d: float
    d2h: float
    ssd_read: float
    ssd_write: float
    ssd_read_mixed: float  # while writing at the same time
    ssd_write_mixed: float
    adam_params: float  # whole pool
    ray_call_s: float  # one pipelined no-op actor call
    cache_copy: float = 0.0  # host cache <-> ring copies, both ways at once (0: the plan caches nothing)


def _time(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def measure_gpu(cfg: RunConfig, spec: ModelSpec, device: str, dtype: torch.dtype) -> float:
    """Model FLOP/s of forward+backward of one block, params resident, one micro-batch (plain PyTorch)."""
    block = spec.build_unit(1, device).to(dtype)
    m = cfg.model
    x = torch.randn(cfg.batch.micro_batch, cfg.batch.seq_len, m.d_model, device=device, dtype=dtype)
    x.requires_grad_(True)
    params = list(block.parameters())

    def step() -> None:
        out = block(x)
        torch.autograd.grad(out, [x, *params], grad_outputs=torch.ones_like(out))

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _time(step, 5 if device == "cuda" else 2, sync)
    tokens = cfg.batch.micro_batch * cfg.batch.seq_len
    flops = 6 * spec.units[1].numel * tokens + 12 * m.d_model * cfg.batch.seq_len * tokens
    return flops / seconds


def measure_pcie(nbytes: int) -> tuple[float, float]:
    if not torch.cuda.is_available():
        return math.inf, math.inf
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = _time(lambda: dev.copy_(host, non_blocking=True), 5, torch.cuda.synchronize)
    d2h = _time(lambda: host.copy_(dev, non_blocking=True), 5, torch.cuda.synchronize)
    return nbytes / h2d, nbytes / d2h


SSD_STREAM_SECONDS = 6.0  # each steady-stream SSD measurement (read, write, both at once)


def measure_ssd(cfg: RunConfig, nbytes: int, seconds: float) -> tuple[float, float, float, float]:
    """Read / write / both-at-once rates of this config's SSD paths at the pipeline's record size, as the
    probe measures them (`fuyou_ray.probe.steady_ssd_rates`)."""
    from fuyou_ray.probe import steady_ssd_rates

    return steady_ssd_rates(
        cfg.ssd.paths, nbytes, seconds, direct_io=cfg.ssd.direct_io, io_threads=cfg.ssd.io_threads
    )


def measure_ray_call() -> float:
    """Seconds per actor call when calls are issued ahead, as the schedule does (0 without Ray)."""
    import ray

    if not ray.is_initialized():
        return 0.0

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self, *after: object) -> int:
            return 0

    echo = Echo.remote()  # type: ignore[attr-defined]
    ray.get(echo.ping.remote())
    n = 200
    t0 = time.perf_counter()
    ref = echo.ping.remote()
    for _ in range(n - 1):
        ref = echo.ping.remote(ref)
    ray.get(ref)
    seconds = (time.perf_counter() - t0) / n
    ray.kill(echo)
    return seconds


def measure_rates(
    cfg: RunConfig, spec: ModelSpec, device: str, param_dtype: str, pool: int, threads: int, cached: bool
) -> Rates:
    """The component rates; the host cache's copy rate only when the plan caches something (`cached`)."""
    from fuyou_ray.cache import copy_threads
    from fuyou_ray.probe import probe_host_cache

    dtype = torch.bfloat16 if param_dtype == "bfloat16" else torch.float32
    largest = max(u.numel for u in spec.units)
    gpu = measure_gpu(cfg, spec, device, dtype)
    h2d, d2h = measure_pcie(min(largest * 4, 1 << 30))
    ssd = measure_ssd(cfg, min(largest * 4, 256 << 20), SSD_STREAM_SECONDS)
    adam = pool_rate(min(largest, 64 << 20), threads, pool, param_dtype, cfg.runtime.adam_kernel)
    notes: list[str] = []
    cache_threads = copy_threads(cfg.runtime.cache_threads)
    # Four calls at once of the run's largest fp32 record (at most 1 GiB): the copy rate depends on the size.
    copy_mib = 4 * max(1, min(largest * 4, 1 << 30) >> 20)
    copy = probe_host_cache(copy_mib, lambda _: None, notes, threads=cache_threads) if cached else 0.0
    return Rates(device, gpu, h2d, d2h, *ssd, adam, measure_ray_call(), copy)


@dataclass(frozen=True)
class StepWork:
    """What one step moves and computes."""

    flops: float  # executed, including the recompute of forward in backward
    model_flops: float  # 6 x params x tokens (+ attention): what "model TFLOPS" counts
    h2d_bytes: float
    d2h_bytes: float
    ssd_read_bytes: float
    ssd_write_bytes: float
    adam_params: float
    gpu_calls: int
    cache_bytes: float = 0.0  # copied between the host cache and ring slots, both ways


def step_work(
    cfg: RunConfig,
    spec: ModelSpec,
    param_bytes: int,
    ssd_read: float,
    ssd_write: float,
    cache_bytes: float = 0.0,
    parked: int = 0,
) -> StepWork:
    """What one step does; `parked` blocks' inputs go to host memory and back (fuyou_ray/activations.py)."""
    tokens = cfg.batch.global_batch * cfg.batch.seq_len
    parked_bytes = float(parked * tokens * cfg.model.d_model * param_bytes)
    model_flops = spec.flops_per_token(cfg.batch.seq_len) * tokens
    head = spec.units[-1].numel
    # Every unit but the head recomputes its forward (2 x params x tokens) during backward.
    recompute = 2.0 * (spec.numel - head) * tokens
    return StepWork(
        flops=model_flops + recompute,
        model_flops=model_flops,
        h2d_bytes=float(param_bytes * (2 * spec.numel - head)) + parked_bytes,
        d2h_bytes=4.0 * spec.numel + parked_bytes,
        ssd_read_bytes=ssd_read,
        ssd_write_bytes=ssd_write,
        adam_params=float(spec.numel),
        gpu_calls=1 + 3 * spec.num_units + 2,
        cache_bytes=cache_bytes,
    )


def bound_seconds(work: StepWork, r: Rates) -> dict[str, float]:
    serial = work.ssd_read_bytes / r.ssd_read + work.ssd_write_bytes / r.ssd_write
    mixed = max(work.ssd_read_bytes / r.ssd_read_mixed, work.ssd_write_bytes / r.ssd_write_mixed)
    return {
        "gpu": work.flops / r.gpu_flops,
        "pcie": max(work.h2d_bytes / r.h2d, work.d2h_bytes / r.d2h),
        "ssd": min(serial, mixed),
        "cpu": work.adam_params / r.adam_params,
        "memcpy": work.cache_bytes / r.cache_copy if r.cache_copy > 0 else 0.0,
    }


def run_bench(cfg: RunConfig, warmup: int | None = None, steps: int = 3) -> dict[str, Any]:
    """Measure rates, run warm-up + N steps, and compare the steps with the bound (see module docs).
    `warmup` None: 1 step, or 2 when the plan has a host cache - after a start its first step reads the
    cached records from SSD and both first steps write into fresh /dev/shm pages; from the third on the
    cache reuses the pages of retired versions (fuyou_ray/cache.py), the steady state."""
    from fuyou_ray.driver import connect_ray, train
    from fuyou_ray.plan import cache_bytes, make_plan

    spec = ModelSpec(cfg.model)
    plan = make_plan(cfg, spec)
    cached = cache_bytes(spec, plan) > 0
    if warmup is None:
        warmup = 2 if cached else 1
    cfg = dataclasses.replace(cfg, steps=warmup + steps)
    if cfg.runtime.executor == "ray":
        connect_ray(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    for p in cfg.ssd.paths:
        Path(p).mkdir(parents=True, exist_ok=True)
    rates = measure_rates(
        cfg, spec, plan.device, plan.param_dtype, plan.optimizer_actors, plan.optimizer_threads, cached
    )
    # Warm-up and measured steps in one run: a second run would start with a cold host cache (its first
    # step reads the cached records from SSD), which is a restart's cost, not a step's.
    run = train(cfg)
    if len(run.steps) <= warmup:
        raise RunStateError(
            f"{run.run_dir} already holds step {run.final_step}, so there is nothing left to measure: "
            "bench a fresh run_dir (--set run_dir=... and ssd.paths=...)"
        )
    measured = dataclasses.replace(run, steps=run.steps[warmup:])
    n = max(1, len(measured.steps))
    io = measured.io
    work = step_work(
        cfg,
        spec,
        2 if plan.param_dtype == "bfloat16" else 4,
        io.get("ssd_read_per_step", io.get("bytes_read", 0) / n),
        io.get("ssd_written_per_step", io.get("bytes_written", 0) / n),
        io.get("cache_copied_per_step", 0),
        len(plan.parked_inputs),
    )
    bounds = bound_seconds(work, rates)
    bound = max(bounds.values())
    step_s = statistics.median(s.seconds for s in measured.steps)
    busy = {k: statistics.median(s.busy.get(k, 0.0) for s in measured.steps) for k in measured.steps[-1].busy}
    ray_s = rates.ray_call_s * work.gpu_calls
    result = {
        "config": cfg.to_dict(),
        "plan": plan.to_dict(),
        "params": spec.numel,
        "tokens_per_step": cfg.batch.global_batch * cfg.batch.seq_len,
        "rates": dataclasses.asdict(rates),
        "work": dataclasses.asdict(work),
        "bound_s": bounds,
        "bottleneck": max(bounds, key=lambda k: bounds[k]),
        "step_s": step_s,
        "steps_s": [s.seconds for s in measured.steps],
        "efficiency": bound / step_s,
        "model_tflops": work.model_flops / step_s / 1e12,
        "peer_tflops": rates.gpu_flops / 1e12,
        "ratio_to_peer": work.model_flops / step_s / rates.gpu_flops,
        "ray_overhead_s": ray_s,
        "ray_overhead_fraction": ray_s / step_s,
        "busy_s": busy,
        "memory": measured.memory,
        "peak_gpu_bytes": measured.peak_device_bytes,
        "warmup_steps": warmup,
        "cache": {
            "planned_bytes": cache_bytes(spec, plan),
            "bytes": io.get("cache_bytes", 0),  # in /dev/shm at the end of the run
            "state_units": len(plan.cpu_cached_state),
            "param_units": len(plan.cpu_cached_params),
            "units": spec.num_units,
            "grad_log": plan.grad_log_tier,
            "mode": "write-through" if plan.cache_write_through else "write-back",
            "flushed_bytes": io.get("flushed_bytes", 0),
        },
        "losses": [s.loss for s in measured.steps],
    }
    run_dir = Path(cfg.run_dir)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    timeline_png(run_dir / "timeline.json", run_dir / "timeline.png")
    return result


def format_table(r: dict[str, Any]) -> str:
    rates, b = r["rates"], r["bound_s"]
    gib = 1024**3
    lines = [
        f"model {r['params'] / 1e9:.2f} B params, {r['tokens_per_step']} tokens/step, "
        f"device {rates['device']}",
        "component rates (measured in this run):",
        f"  GPU (plain PyTorch fwd+bwd of one block)  {rates['gpu_flops'] / 1e12:9.1f} TFLOPS",
        f"  PCIe H2D / D2H (pinned)                    {rates['h2d'] / 1e9:9.1f} / "
        f"{rates['d2h'] / 1e9:.1f} GB/s",
        f"  SSD read / write alone                     {rates['ssd_read'] / 1e9:9.2f} / "
        f"{rates['ssd_write'] / 1e9:.2f} GB/s",
        f"  SSD read + write at once                   {rates['ssd_read_mixed'] / 1e9:9.2f} + "
        f"{rates['ssd_write_mixed'] / 1e9:.2f} GB/s",
        f"  CPU AdamW (pool)                           {rates['adam_params'] / 1e9:9.2f} Gparam/s",
        f"  host cache <-> ring copies (both at once)  {rates.get('cache_copy', 0) / 1e9:9.2f} GB/s",
        f"  Ray actor call (pipelined)                 {rates['ray_call_s'] * 1e3:9.3f} ms",
        "one step:",
        f"  {'resource':10} {'work':>22} {'bound time':>11} {'busy (timeline)':>16}",
        f"  {'gpu':10} {r['work']['flops'] / 1e12:17.1f} TFLOP {b['gpu']:10.3f}s "
        f"{r['busy_s'].get('gpu compute', 0):15.3f}s",
        f"  {'pcie':10} {(r['work']['h2d_bytes'] + r['work']['d2h_bytes']) / gib:18.2f} GiB "
        f"{b['pcie']:10.3f}s "
        f"{max(r['busy_s'].get('h2d', 0), r['busy_s'].get('d2h', 0)):15.3f}s",
        f"  {'ssd':10} {(r['work']['ssd_read_bytes'] + r['work']['ssd_write_bytes']) / gib:18.2f} GiB "
        f"{b['ssd']:10.3f}s {max(r['busy_s'].get('ssd read', 0), r['busy_s'].get('ssd write', 0)):15.3f}s",
        f"  {'cpu adam':10} {r['work']['adam_params'] / 1e9:16.2f} Gparam {b['cpu']:10.3f}s "
        f"{r['busy_s'].get('cpu adam', 0):15.3f}s",
        f"  {'cache copy':10} {r['work'].get('cache_bytes', 0) / gib:18.2f} GiB {b.get('memcpy', 0):10.3f}s "
        f"{max(r['busy_s'].get('cache read', 0), r['busy_s'].get('cache write', 0)):15.3f}s",
        f"  step time {r['step_s']:.3f}s (median of {r['steps_s']}), bound {max(b.values()):.3f}s "
        f"({r['bottleneck']}), efficiency {r['efficiency']:.2f}"
        + (
            " (above 1: the pipeline beat the rates measured up front; the bound is not tight)"
            if r["efficiency"] > 1
            else ""
        ),
        f"  model TFLOPS {r['model_tflops']:.2f} (6 x params x tokens + attention; recompute not counted); "
        f"plain in-GPU block {r['peer_tflops']:.1f} -> ratio {r['ratio_to_peer']:.3f}",
        f"  Ray calls on the GPU actor's path ~{r['ray_overhead_s'] * 1e3:.1f} ms/step "
        f"= {100 * r['ray_overhead_fraction']:.2f}% of the step (upper estimate)",
        _cache_line(r, gib),
        f"  peak GPU memory {r['peak_gpu_bytes'] / gib:.2f} GiB "
        f"(budget {r['config']['budgets']['gpu_mem'] / gib:.0f} GiB); "
        f"inputs of {r['plan']['activation_policy'].count('recompute')} block(s) parked in host memory",
        "  peak RSS above baseline: "
        + ", ".join(f"{m['role']} {m['peak_above_baseline'] / gib:.2f} GiB" for m in r["memory"]),
    ]
    return "\n".join(lines)


def _cache_line(r: dict[str, Any], gib: float) -> str:
    """The host cache and the SSD bytes a (median) step moved."""
    c, w = r.get("cache", {}), r["work"]
    read, written = w["ssd_read_bytes"] / gib, w["ssd_write_bytes"] / gib
    ssd = f"SSD per step: read {read:.2f} GiB, written {written:.2f} GiB"
    if not c.get("planned_bytes"):
        return f"  host cache: none (runtime.cpu_cache off, or cpu_mem holds only the ring); {ssd}"
    n = c["units"]
    return (
        f"  host cache ({c['mode']}): {c['bytes'] / gib:.2f} GiB cached "
        f"(plan {c['planned_bytes'] / gib:.2f} GiB at peak): state of {c['state_units']}/{n} units, "
        f"params of {c['param_units']}/{n}, gradient log on {c['grad_log']}; {ssd}"
    )


def timeline_png(timeline_json: Path, out: Path) -> bool:
    """Draw the last step's lanes; returns False (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not timeline_json.exists():
        return False
    data = json.loads(timeline_json.read_text())
    lanes = ["gpu compute", "h2d", "d2h", "ssd read", "ssd write", "cache read", "cache write", "cpu adam"]
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for i, lane in enumerate(lanes):
        bars = [(s["start"], s["end"] - s["start"]) for s in data["spans"] if s["lane"] == lane]
        ax.broken_barh(bars, (i - 0.4, 0.8), color=f"C{i}")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("seconds into the step")
    ax.set_title(f"pipeline timeline, step {data['step']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
