"""`fuyou-ray plan CONFIG [--profile P] [--what-if KEY=V1,V2,...]`: choose a plan and predict its step."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from fuyou_ray.commands.common import add_config_args

EPILOG = """examples:
  fuyou-ray probe --out profile.yaml                      # measure this machine once
  fuyou-ray plan configs/demo.yaml --profile profile.yaml
  fuyou-ray plan configs/bench/gpt3-13b-width.yaml --profile configs/profiles/h100-box-recorded.yaml
  fuyou-ray plan CONFIG --profile P --what-if ssd_count=1,2,3,6,12
  fuyou-ray plan CONFIG --profile P --what-if cpu_mem=16GiB,64GiB,256GiB
  fuyou-ray plan CONFIG --profile P --what-if batch=8,16,32,64
  fuyou-ray plan CONFIG --profile P --schedule current    # today's pipeline, without the planner's features
The prediction replays the step event by event over the profile's GPU, PCIe, SSD and CPU rates
(fuyou_ray/simulate.py); docs/PLANNER.md explains the model."""

WHAT_IF_KEYS = ("ssd_count", "cpu_mem", "gpu_mem", "batch")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="choose a plan for a config and predict its step time on a hardware profile",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--profile",
        default="profile.yaml",
        help="hardware profile YAML from `fuyou-ray probe` or configs/profiles/ (default: ./profile.yaml)",
    )
    p.add_argument(
        "--what-if",
        dest="what_if",
        default=None,
        metavar="KEY=V1,V2,...",
        help=f"vary one of {', '.join(WHAT_IF_KEYS)} and print the predicted curve",
    )
    p.add_argument(
        "--schedule",
        choices=["planned", "current"],
        default="planned",
        help="planned (default): the planner's choices; current: today's build_step schedule",
    )
    p.add_argument("--json", action="store_true", help="print the plan and prediction as JSON")
    p.add_argument(
        "--timeline", default=None, metavar="FILE", help="write the simulated step's timeline JSON"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.config import ConfigError, load_config
    from fuyou_ray.models import ModelSpec
    from fuyou_ray.profile import ProfileError, load_profile

    cfg = load_config(args.config, args.overrides)
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from exc
    spec = ModelSpec(cfg.model)
    if args.what_if:
        key, values = parse_what_if(args.what_if)
        print(render_what_if(cfg, spec, profile, key, values))
        return 0
    result, current = plan_and_predict(cfg, spec, profile, args.schedule)
    if args.timeline:
        from fuyou_ray.driver import write_timeline

        pred = result.prediction if args.schedule == "planned" else current
        write_timeline(Path(args.timeline), 0, list(pred.sim.spans))
    if args.json:
        print(json.dumps(result_dict(result, current), indent=2))
    else:
        print(render(cfg, spec, profile, result, current, args.schedule))
    return 0


def parse_what_if(text: str) -> tuple[str, list[Any]]:
    from fuyou_ray.config import ConfigError, parse_size

    if "=" not in text:
        raise ConfigError(
            f"--what-if {text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(WHAT_IF_KEYS)}"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in WHAT_IF_KEYS:
        raise ConfigError(f"--what-if: unknown key {key!r}; choose one of {', '.join(WHAT_IF_KEYS)}")
    values: list[Any] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if key in ("cpu_mem", "gpu_mem"):
            values.append(parse_size(item, f"--what-if {key}"))
        else:
            try:
                values.append(int(item))
            except ValueError:
                raise ConfigError(f"--what-if {key}: {item!r} is not an integer") from None
            if values[-1] < 1:
                raise ConfigError(f"--what-if {key}: values must be >= 1, got {item}")
    if not values:
        raise ConfigError(f"--what-if {key}: give at least one value")
    return key, values


def plan_and_predict(cfg: Any, spec: Any, profile: Any, schedule: str = "planned") -> tuple[Any, Any]:
    """The planner's result and the prediction for today's schedule (`pipeline_plan`)."""
    from fuyou_ray.plan import auto_plan, workload_of
    from fuyou_ray.simulate import predict

    result = auto_plan(cfg, spec, profile)
    current_plan = pipeline_plan(cfg, spec, result.plan, profile.cpu.cores)
    w = workload_of(cfg, spec, current_plan.device, cfg.batch.micro_batch)
    current = predict(w, current_plan, profile, schedule="current")
    return result, current


def pipeline_plan(cfg: Any, spec: Any, planned: Any, cores: int) -> Any:
    """The plan today's pipeline runs for `cfg` on a machine of `cores` cores: the planner's device and SSD
    queue depth, with the optimizer pool, the parked block inputs, the ring and the host cache as
    `make_plan` (the driver's plan) sizes them - the pool it starts on those cores, as many slots as
    `budgets.cpu_mem` holds up to MAX_USEFUL_SLOTS, then `fill_cache` with what is left when
    `runtime.cpu_cache` is auto (the cache the SSD actor keeps; its copies are part of the prediction)."""
    from fuyou_ray.costmodel import working_bytes
    from fuyou_ray.errors import BudgetError
    from fuyou_ray.plan import (
        MAX_USEFUL_SLOTS,
        fill_cache,
        optimizer_pool,
        parked_blocks,
        parked_input_bytes,
        parking_policy,
    )
    from fuyou_ray.schedule import MIN_SLOTS

    slot = planned.slot_bytes  # (with the planner's optimizer ranges, as make_plan sizes them)
    dtype_bytes = planned.param_bytes
    try:
        parked = parked_blocks(cfg, spec, dtype_bytes)  # the block inputs make_plan parks in host memory
    except BudgetError:  # the planner fits the device in ways the pipeline does not (its own chunks)
        parked = tuple(range(1, spec.num_units - 1))
    working = working_bytes(spec) + parked_input_bytes(cfg, dtype_bytes, len(parked))
    slots = int(max(MIN_SLOTS, min((cfg.budgets.cpu_mem - working) // slot, MAX_USEFUL_SLOTS)))
    actors, threads = optimizer_pool(cfg, cores)
    plan = dataclasses.replace(
        planned.as_current(),
        optimizer_actors=actors,
        optimizer_threads=threads,
        micro_batch=cfg.batch.micro_batch,
        num_slots=slots,
        ring_bytes=slots * slot,
        cpu_bytes_needed=slots * slot + working,
        activation_policy=parking_policy(parked, spec.num_units),
    )
    if cfg.runtime.cpu_cache == "auto":
        plan = fill_cache(plan, spec, cfg.budgets.cpu_mem, write_through=cfg.runtime.cache_write_through)
    return plan


def with_value(cfg: Any, key: str, value: Any) -> tuple[Any, Any]:
    """(config, profile transform) for one what-if value."""
    if key == "cpu_mem":
        return dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, cpu_mem=value)), None
    if key == "gpu_mem":
        return dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, gpu_mem=value)), None
    if key == "batch":
        micro = max(d for d in range(1, min(cfg.batch.micro_batch, value) + 1) if value % d == 0)
        batch = dataclasses.replace(cfg.batch, global_batch=value, micro_batch=micro, grad_accum=None)
        return dataclasses.replace(cfg, batch=batch), None
    return cfg, value  # ssd_count: the profile changes


def render_what_if(cfg: Any, spec: Any, profile: Any, key: str, values: list[Any]) -> str:
    from fuyou_ray.config import format_size
    from fuyou_ray.errors import BudgetError
    from fuyou_ray.plan import auto_plan

    lines = [
        f"what-if {key} for {_model_line(cfg, spec)} on profile {profile.name}",
        f"{key:>12}  {'step s':>9}  {'TFLOPS':>7}  {'bottleneck':>10}  {'gpu s':>7}  {'pcie s':>7}  "
        f"{'ssd s':>7}  {'cpu s':>7}  choices",
    ]
    seeds: list[Any] = []
    for value in sorted(values):
        trial, ssd_count = with_value(cfg, key, value)
        prof = profile.with_ssd_devices(ssd_count) if ssd_count else profile
        shown = format_size(value) if key in ("cpu_mem", "gpu_mem") else str(value)
        try:
            result = auto_plan(trial, spec, prof, seeds=seeds if key != "batch" else ())
        except BudgetError as exc:
            lines.append(f"{shown:>12}  does not fit: {exc}")
            continue
        seeds = [result.plan]
        pred, plan = result.prediction, result.plan
        work = pred.work.as_dict()
        lines.append(
            f"{shown:>12}  {pred.step_s:9.2f}  {pred.tflops:7.1f}  {pred.bottleneck:>10}  "
            f"{work['gpu']:7.2f}  {work['pcie']:7.2f}  {work['ssd']:7.2f}  {work['cpu']:7.2f}  "
            f"{_choices(plan)}"
        )
    return "\n".join(lines)


def _model_line(cfg: Any, spec: Any) -> str:
    m, b = cfg.model, cfg.batch
    return (
        f"{m.arch} {m.n_layer} layers d_model {m.d_model} ({spec.numel / 1e9:.2f} B params), "
        f"batch {b.global_batch} x {b.seq_len} tokens"
    )


def _choices(plan: Any) -> str:
    pol = Counter(plan.policy(u) for u in range(1, len(plan.activation_policy) - 1))
    acts = " ".join(f"{k} {v}" for k, v in sorted(pol.items()))
    return (
        f"mb {plan.micro_batch}, depth {plan.prefetch_depth}, {plan.overlap}; {acts}; "
        f"cached P {len(plan.cpu_cached_params)}, state {len(plan.cpu_cached_state)}"
    )


def _units(units: tuple[int, ...], total: int) -> str:
    if not units:
        return f"none of {total} units"
    if len(units) == total:
        return f"all {total} units"
    return f"{len(units)} of {total} units ({_ranges(units)})"


def _ranges(units: tuple[int, ...] | list[int]) -> str:
    out: list[str] = []
    items = sorted(units)
    start = prev = items[0]
    for u in [*items[1:], None]:
        if u is not None and u == prev + 1:
            prev = u
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if u is not None:
            start = prev = u
    text = ", ".join(out)
    return text if len(text) < 60 else text[:57] + "..."


def render(cfg: Any, spec: Any, profile: Any, result: Any, current: Any, schedule: str) -> str:
    from fuyou_ray.config import format_size
    from fuyou_ray.plan import largest_batch, largest_layers

    plan, pred = result.plan, result.prediction
    n = spec.num_units
    w = result.workload
    lines = [
        f"fuyou-ray plan on profile '{profile.name}'",
        f"  model        {_model_line(cfg, spec)}",
        f"  budgets      gpu_mem {format_size(cfg.budgets.gpu_mem)} "
        f"(plan needs {format_size(result.gpu.total)}), "
        f"cpu_mem {format_size(cfg.budgets.cpu_mem)} (plan needs {format_size(result.cpu.total)})",
        "",
        "plan",
        f"  device                {plan.device}, params streamed in {plan.param_dtype}",
        f"  micro-batch chunk     {plan.micro_batch} sequences ({w.chunks} chunk(s) per layer)",
        f"  prefetch depth        {plan.prefetch_depth} "
        f"(the device holds {plan.prefetch_depth + 1} param buffers)",
        f"  ring                  {plan.num_slots} slots x {format_size(plan.slot_bytes)} = "
        f"{format_size(plan.num_slots * plan.slot_bytes)}{_ranges_note(plan)}",
        f"  optimizer pool        {plan.optimizer_actors} actor(s) x {plan.optimizer_threads} threads, "
        f"overlaps {plan.overlap}",
        f"  gradient log          {plan.grad_log_tier}",
    ]
    pol: dict[str, list[int]] = {}
    for u in w.blocks():
        pol.setdefault(plan.policy(u), []).append(u)
    for name in ("keep", "recompute", "swap_cpu", "swap_ssd"):
        if name in pol:
            lines.append(f"  activations {name:<10}{len(pol[name])} blocks ({_ranges(pol[name])})")
    lines += [
        f"  params in CPU memory  {_units(plan.cpu_cached_params, n)}",
        f"  state in CPU memory   {_units(plan.cpu_cached_state, n)}"
        + (" (write-through)" if plan.cache_write_through and plan.cpu_cached_state else ""),
        f"  params kept on GPU    {_units(plan.gpu_resident_params, n)}",
        f"  SSD queue depth       {plan.ssd_queue_depth}",
        "",
    ]
    shown = pred if schedule == "planned" else current
    title = "the planned pipeline" if schedule == "planned" else "today's schedule (build_step)"
    if schedule == "current":
        lines += [*_pipeline_lines(cfg, current, n), ""]
    work = shown.work.as_dict()
    busy = shown.busy
    sim_busy = {
        "gpu": busy["gpu compute"],
        "pcie": busy["pcie"],
        "ssd": busy["ssd"],
        "cpu": busy["cpu adam"],
        "memcpy": busy["memcpy"],
    }
    lines += [
        f"prediction: one simulated step of {title}",
        f"  step time        {shown.step_s:.3f} s   {shown.tflops:.1f} model TFLOPS "
        "(6 x params x tokens + attention per second; recompute not counted)",
        f"  {'resource':<10}{'busy in the replay':>20}{'work alone':>14}",
    ]
    for res in ("gpu", "pcie", "ssd", "cpu", "memcpy"):
        lines.append(f"  {res:<10}{sim_busy[res]:>18.3f} s{work[res]:>12.3f} s")
    acc = shown.account
    gib = 2**30
    lines += [
        f"  moved            SSD read {acc.ssd_read_bytes / gib:.2f} GiB, "
        f"write {acc.ssd_write_bytes / gib:.2f} GiB; host cache copies in "
        f"{acc.cache_read_bytes / gib:.2f} GiB, out {acc.cache_write_bytes / gib:.2f} GiB "
        f"at {profile.cpu.memcpy_bps() / 1e9:.1f} GB/s"
        + ("" if profile.cpu.memcpy_gbps > 0 else " (assumed: the profile has no cpu.memcpy_gbps)"),
        f"  bound            max(T_gpu, T_pcie, T_ssd, T_cpu, T_memcpy) = {shown.bound_s:.3f} s, "
        f"bottleneck: {shown.bottleneck}",
        f"  efficiency       bound / step = {shown.efficiency:.2f}",
    ]
    if schedule == "planned":
        lines.append(
            f"  today's schedule {current.step_s:.3f} s ({current.tflops:.1f} TFLOPS, bottleneck "
            f"{current.bottleneck}): build_step, before the pipeline implements the plan's features"
        )
    big_batch = largest_batch(cfg, spec, profile)
    layers = largest_layers(cfg, spec, profile)
    per_block = spec.units[1].numel if n > 2 else 0
    params = (spec.numel + ((layers or 0) - cfg.model.n_layer) * per_block) / 1e9
    model_line = (
        f"{layers} layers of this width ({params:.1f} B params), limited by SSD capacity"
        if layers is not None
        else "not limited by device or host memory at this width; SSD capacity unknown in the profile"
    )
    lines += [
        "",
        "limits",
        f"  largest batch that fits   {big_batch} sequences of {cfg.batch.seq_len} tokens",
        f"  largest model that fits   {model_line}",
    ]
    return "\n".join(lines)


def _pipeline_lines(cfg: Any, current: Any, n: int) -> list[str]:
    """What today's pipeline runs with where it differs from the plan above: make_plan's ring, cache and
    parked block inputs."""
    from fuyou_ray.config import format_size
    from fuyou_ray.plan import parked_input_bytes

    plan = current.plan
    if plan.cpu_cached_state or plan.cpu_cached_params or plan.grad_log_tier == "cpu":
        mode = "write-through" if plan.cache_write_through else "write-back"
        cache = (
            f"{mode}: state of {_units(plan.cpu_cached_state, n)}, params of "
            f"{_units(plan.cpu_cached_params, n)}, gradient log {plan.grad_log_tier}"
        )
    else:
        cache = f"none (runtime.cpu_cache {cfg.runtime.cpu_cache}, or cpu_mem holds only the ring)"
    parked = plan.parked_inputs
    arena = parked_input_bytes(cfg, plan.param_bytes, len(parked))
    return [
        "today's pipeline (make_plan: the driver's plan)",
        f"  ring                  {plan.num_slots} slots x {format_size(plan.slot_bytes)}"
        + _ranges_note(plan),
        f"  host cache            {cache}",
        f"  block inputs parked   {_units(parked, n)} ({format_size(arena)} of host memory)"
        if parked
        else "  block inputs parked   none (the device holds every block's input)",
    ]


def _ranges_note(plan: Any) -> str:
    if not plan.optimizer_range:
        return ""
    return f"; optimizer in ranges of {plan.optimizer_range:,} elements (a unit's fp32 state exceeds a slot)"


def result_dict(result: Any, current: Any) -> dict[str, Any]:
    def pred(p: Any) -> dict[str, Any]:
        return {
            "step_s": p.step_s,
            "tflops": p.tflops,
            "busy_s": p.busy,
            "work_s": p.work.as_dict(),
            "bound_s": p.bound_s,
            "bottleneck": p.bottleneck,
            "efficiency": p.efficiency,
        }

    return {
        "plan": result.plan.to_dict(),
        "prediction": pred(result.prediction),
        "current_schedule": pred(current),
        "gpu_memory": result.gpu.parts,
        "cpu_memory": result.cpu.parts,
    }
