"""The step simulator against hand-computed bounds, and against the closed-form accounting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fuyou_ray.config import RunConfig
from fuyou_ray.costmodel import ssd_seconds
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import Plan, base_plan, workload_of
from fuyou_ray.profile import (
    AdamRate,
    CPUProfile,
    GPUProfile,
    HardwareProfile,
    PCIeProfile,
    SSDProfile,
    SSDRate,
)
from fuyou_ray.schedule import Ref, StepSchedule
from fuyou_ray.simulate import (
    SimEnv,
    SimulationError,
    as_pipeline,
    build_planned_step,
    current_step,
    predict,
    simulate,
)
from tests.conftest import tiny_config

FAST = 1e6  # GB/s or Gparam/s: a resource that never matters


def make_profile(
    *,
    tflops: float = 1.0,
    half_gflop: float = 0.0,
    h2d: float = FAST,
    d2h: float = FAST,
    duplex: float = 0.0,
    read: float = FAST,
    write: float = FAST,
    mixed: tuple[float, float] = (0.0, 0.0),
    adam: tuple[tuple[int, float], ...] = ((1, FAST),),
    cores: int = 8,
    overhead: float = 0.0,
    commit: float = 0.0,
    memcpy: float = FAST,
) -> HardwareProfile:
    return HardwareProfile(
        name="test",
        gpu=GPUProfile("test-gpu", "cuda", 1 << 40, tflops, tflops, half_gflop),
        pcie=PCIeProfile(h2d, d2h, duplex),
        ssd=SSDProfile(
            devices=1,
            rates=(SSDRate(8, read, write),),
            mixed_read_gbps=mixed[0],
            mixed_write_gbps=mixed[1],
            capacity_bytes=1 << 50,
        ),
        cpu=CPUProfile(
            "test-cpu", cores, 1 << 40, 1 << 40, tuple(AdamRate(t, r) for t, r in adam), memcpy_gbps=memcpy
        ),
        call_overhead_s=overhead,
        commit_s=commit,
    )


def small_config(tmp: Path, clip: float = 0.0, **batch: int) -> RunConfig:
    return tiny_config(
        tmp,
        model={"n_layer": 4, "n_head": 2, "d_model": 64, "max_seq_len": 64, "vocab_size": 256},
        batch={"global_batch": 8, "micro_batch": 4, "seq_len": 64, **batch},
        optimizer={"max_grad_norm": clip},
        budgets={"gpu_mem": "1GiB", "cpu_mem": "1GiB"},
    )


def env_for(profile: HardwareProfile, cfg: RunConfig, **plan_fields: object) -> SimEnv:
    spec = ModelSpec(cfg.model)
    plan = dataclasses.replace(base_plan(cfg, spec, profile), num_slots=8, **plan_fields)  # type: ignore[arg-type]
    return SimEnv(profile, workload_of(cfg, spec, "cuda"), plan, 8)


def io_schedule(reads: int, writes: int, nbytes: int) -> StepSchedule:
    s = StepSchedule()
    for _ in range(reads):
        s.add("ssd", "read", nbytes=nbytes)
    for _ in range(writes):
        s.add("ssd", "write", nbytes=nbytes)
    return s


# ---------------------------------------------------------------------------------------------- hand bounds


def test_pure_ssd_reads_take_bytes_over_rate(tmp_path: Path) -> None:
    env = env_for(make_profile(read=2.0), small_config(tmp_path))
    result = simulate(io_schedule(8, 0, 10**9), env)
    assert result.step_s == pytest.approx(8e9 / 2e9, rel=0.01)
    assert result.busy["ssd read"] == pytest.approx(result.step_s, rel=1e-9)


def test_reads_and_writes_time_share_the_ssd(tmp_path: Path) -> None:
    env = env_for(make_profile(read=2.0, write=1.0), small_config(tmp_path))
    result = simulate(io_schedule(4, 4, 10**9), env)
    # Time sharing is work-conserving: the device is busy for r/R + w/W whatever the interleaving.
    assert result.step_s == pytest.approx(4 / 2 + 4 / 1, rel=0.01)
    assert result.step_s == pytest.approx(ssd_seconds(env.profile, 8, 4e9, 4e9), rel=0.01)


def test_measured_mixing_is_used_and_never_beats_the_bound(tmp_path: Path) -> None:
    prof = make_profile(read=2.0, write=1.0, mixed=(1.6, 0.7))  # reads and writes overlap well
    env = env_for(prof, small_config(tmp_path))
    s = StepSchedule()
    s.add("ssd", "read", nbytes=2 * 10**9)
    s.add("ssd", "write", nbytes=10**9)
    result = simulate(s, env)
    # Both at once: reads at 1.6, writes at 0.7 GB/s until the reads are done (2/1.6 s), then writes alone.
    t_mixed = 2e9 / 1.6e9
    expected = t_mixed + (1e9 - 0.7e9 * t_mixed) / 1e9
    assert result.step_s == pytest.approx(expected, rel=0.01)
    assert result.step_s >= ssd_seconds(prof, 8, 2e9, 1e9) * (1 - 1e-9)


def test_the_optimizer_pool_shares_memory_bandwidth(tmp_path: Path) -> None:
    prof = make_profile(adam=((1, 1.0), (2, 1.5)))
    env = env_for(prof, small_config(tmp_path), optimizer_threads=1, optimizer_actors=2)
    s = StepSchedule()
    s.add("opt0", "update", nbytes=10**9)
    s.add("opt1", "update", nbytes=10**9)
    # Each actor alone would run at 1 Gparam/s; together they get 1.5 Gparam/s.
    assert simulate(s, env).step_s == pytest.approx(2e9 / 1.5e9, rel=0.01)


def test_copies_both_ways_share_the_duplex_bandwidth(tmp_path: Path) -> None:
    env = env_for(make_profile(h2d=10.0, d2h=10.0, duplex=15.0), small_config(tmp_path))
    s = StepSchedule()
    s.add("h2d", "copy", nbytes=10 * 10**9)
    s.add("d2h", "copy", nbytes=10 * 10**9)
    assert simulate(s, env).step_s == pytest.approx(20e9 / 15e9, rel=0.01)


def test_in_order_actors_wait_for_earlier_calls(tmp_path: Path) -> None:
    env = env_for(make_profile(read=1.0, overhead=0.5), small_config(tmp_path))
    s = StepSchedule()
    r = s.add("ssd", "read", nbytes=10**9)  # 0.5 s of call overhead, then 1 s of reading
    s.add("gpu", "step_summary", Ref(r))  # waits for the read
    s.add("gpu", "step_summary")  # ready at once, but queued behind the previous gpu call
    result = simulate(s, env)
    assert result.op_end[1] == pytest.approx(2.0, rel=1e-6)
    assert result.op_end[2] == pytest.approx(2.5, rel=1e-6)


def test_a_dependency_on_a_later_op_is_refused(tmp_path: Path) -> None:
    env = env_for(make_profile(), small_config(tmp_path))
    s = StepSchedule()
    s.add("ssd", "read", after=[1], nbytes=1)
    s.add("ssd", "read", nbytes=1)
    with pytest.raises(SimulationError, match="later op"):
        simulate(s, env)


# ------------------------------------------------------------------------------------------- real schedules


def test_current_schedule_with_only_compute_takes_the_sum_of_its_calls(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    env = env_for(make_profile(tflops=1e-3), cfg)
    pred = predict(env.workload, env.plan, env.profile, schedule="current")
    # build_step issues every GPU call in order; with free I/O the step is their sum (recompute included).
    assert pred.step_s == pytest.approx(pred.account.gpu_seconds, rel=0.01)
    # Hand count: each block runs forward, then forward again and backward (4F); the head 3F; the
    # embedding is a gather. F = 2 x params x tokens (+ 4 x tokens x seq x width for attention).
    spec, t = env.workload.spec, 8 * 64
    block = 2 * spec.units[1].numel * t + 4 * t * 64 * 64
    head = 2 * spec.units[-1].numel * t
    assert pred.account.gpu_flops == pytest.approx(4 * 4 * block + 3 * head, rel=1e-9)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_current_schedule_bound_by_the_ssd_runs_at_the_ssd_rate(tmp_path: Path, clip: float) -> None:
    cfg = small_config(tmp_path, clip=clip)
    env = env_for(make_profile(tflops=1e6, read=1e-3, write=0.5e-3), cfg)
    pred = predict(env.workload, env.plan, env.profile, schedule="current")
    assert pred.bottleneck == "ssd"
    assert pred.step_s == pytest.approx(pred.work.ssd, rel=0.01)
    # The real schedule moves exactly the bytes the closed form counts.
    read = sum(s.nbytes for s in pred.sim.spans if s.lane == "ssd read")
    assert read == pred.account.ssd_read_bytes


def test_current_schedule_on_cuda_overlaps_the_next_copy_with_queued_compute(tmp_path: Path) -> None:
    """On CUDA the GPU actor's calls return once their params are on the device and leave the compute
    queued, so the next unit's copy runs meanwhile; on the CPU fallback each call is synchronous."""
    cfg = small_config(tmp_path)
    env = env_for(make_profile(tflops=2e-3), cfg)
    pred = predict(env.workload, env.plan, env.profile, schedule="current")
    prof = make_profile(tflops=2e-3, h2d=pred.account.h2d_bytes / pred.work.gpu / 1e9)
    cuda = predict(env.workload, env.plan, prof, schedule="current")
    cpu = predict(env.workload, dataclasses.replace(env.plan, device="cpu"), prof, schedule="current")
    assert cpu.step_s == pytest.approx(2 * pred.work.gpu, rel=0.05)  # copy, compute, copy, compute ...
    # Only the forward overlaps: in backward, emit_grad(u+1) waits for backward(u)'s queued compute before
    # the host issues backward(u-1) and its copy.
    assert cuda.step_s < 0.9 * cpu.step_s
    # emit_grad waits for the compute queued before it: no gradient leaves before its unit's backward.
    spans = cuda.sim.spans
    first_d2h = min(s.start for s in spans if s.lane == "d2h")
    head = next(s for s in spans if s.lane == "gpu compute" and s.label.startswith("compute_head"))
    assert first_d2h >= head.end - 1e-12


def test_prefetch_overlaps_copies_with_compute(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    env = env_for(make_profile(tflops=2e-3), cfg)
    pred = predict(env.workload, env.plan, env.profile)
    # Copies as long as the compute: depth 0 serialises them, prefetch overlaps them.
    prof = make_profile(tflops=2e-3, h2d=pred.account.h2d_bytes / pred.work.gpu / 1e9)
    times = [
        predict(env.workload, dataclasses.replace(env.plan, prefetch_depth=d), prof).step_s for d in (0, 1, 2)
    ]
    assert times[0] == pytest.approx(2 * pred.work.gpu, rel=0.05)
    assert times[1] <= 0.7 * times[0]
    assert times[2] <= times[1] * (1 + 1e-9)


PLANS = [
    {},
    {"prefetch_depth": 2},
    {"activation_policy": ("keep", "recompute", "swap_cpu", "swap_ssd", "keep", "keep")},
    {"cpu_cached_params": (0, 3, 5), "cpu_cached_state": (1, 2), "gpu_resident_params": (4,)},
    {"cpu_cached_state": (1, 2), "cache_write_through": True},
]


@pytest.mark.parametrize("fields", PLANS)
@pytest.mark.parametrize(
    ("clip", "overlap", "log"),
    [
        (0.0, "backward", ""),
        (1.0, "after_backward", "ssd"),
        (1.0, "next_forward", "ssd"),
        (1.0, "next_forward", "cpu"),
    ],
)
def test_planned_schedule_moves_what_the_accounting_counts(
    tmp_path: Path, fields: dict[str, object], clip: float, overlap: str, log: str
) -> None:
    cfg = small_config(tmp_path, clip=clip)
    prof = make_profile(tflops=1e-3, h2d=1.0, d2h=1.0, read=0.5, write=0.4, adam=((1, 0.1),))
    env = env_for(prof, cfg, optimizer_overlap=overlap, grad_log=log, **fields)
    pred = predict(env.workload, env.plan, prof)
    moved = {lane: sum(s.nbytes for s in pred.sim.spans if s.lane == lane) for lane in pred.busy}
    acc = pred.account
    assert moved["h2d"] == acc.h2d_bytes
    assert moved["d2h"] == acc.d2h_bytes
    assert moved["ssd read"] == acc.ssd_read_bytes
    assert moved["ssd write"] == acc.ssd_write_bytes
    assert moved["cpu adam"] == acc.adam_elements
    assert moved["cache read"] == acc.cache_read_bytes
    assert moved["cache write"] == acc.cache_write_bytes
    # Cached records cross the ring through host-cache copies, as the SSD actor's CachedStore runs them.
    pb = env.workload.param_bytes
    numel = {u: env.workload.spec.units[u].numel for u in range(env.workload.num_units)}
    cached_s, cached_p = env.plan.cpu_cached_state, env.plan.cpu_cached_params
    assert acc.cache_write_bytes == sum(numel[u] * 12 for u in cached_s) + sum(
        numel[u] * pb for u in cached_p
    )
    assert moved["gpu compute"] == 0 and pred.busy["gpu compute"] == pytest.approx(acc.gpu_seconds, rel=1e-6)
    # No schedule beats the busiest resource.
    assert pred.step_s >= pred.bound_s * (1 - 1e-9)


def test_planned_schedule_is_valid_for_the_executor_order(tmp_path: Path) -> None:
    """Every dependency points backwards (the property that makes in-order actors deadlock-free)."""
    cfg = small_config(tmp_path, clip=1.0)
    env = env_for(make_profile(), cfg, optimizer_overlap="next_forward", prefetch_depth=1)
    sched = build_planned_step(env.workload, env.plan)
    for op in sched.ops:
        assert all(d < op.id for d in op.after)
        assert all(a.op < op.id for a in op.args if isinstance(a, Ref))
    assert sched.commit == len(sched.ops) - 1


def test_plan_rejects_unknown_policies() -> None:
    with pytest.raises(ValueError, match="activation_policy"):
        Plan("cpu", "float32", 4096, 5, 1, 1, False, 0, 0, 0, activation_policy=("swap_gpu",))
    with pytest.raises(ValueError, match="clip exactly"):
        Plan("cpu", "float32", 4096, 5, 1, 1, True, 0, 0, 0, optimizer_overlap="backward")


# ------------------------------------------------------------------------------------------- host cache


def cached_copy_bytes(env: SimEnv, *, grad_log: bool, lend_copy: bool) -> tuple[int, int]:
    """(bytes copied out of, into) the host cache by one step of build_step with every record cached, by
    hand: params read in forward and backward (the head once) and written once, the gradient log (fp32)
    written in backward but for the last one out, unit 0's (the optimizer reads it in place or, unit 0's,
    from its slot: no copy out). The state (fp32 master, Adam m, v)
    is lent to the optimizer: copied once within the cache (a write), then updated in place there
    (`lend_copy`); or lent without the copy (the host kernel's out-of-place AdamW). With the
    gradient log (clipping) the forward and the head run ahead on the optimizer's new params: not read from
    the cache.
    """
    w = env.workload
    out = into = 0
    for u in range(w.num_units):
        n = w.spec.units[u].numel
        visits = (1 if u == w.num_units - 1 else 2) - (1 if grad_log else 0)
        out += visits * n * w.param_bytes
        into += n * w.param_bytes + (12 * n if lend_copy else 0) + (4 * n if grad_log and u != 0 else 0)
    return out, into


def fully_cached(env: SimEnv, clip: float, **fields: object) -> Plan:
    units = tuple(range(env.workload.num_units))
    return dataclasses.replace(
        env.plan,
        cpu_cached_state=units,
        cpu_cached_params=units,
        grad_log="cpu" if clip else "",
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("lend_copy", [True, False], ids=["lend-copy", "out-of-place"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_current_schedule_of_a_fully_cached_plan_copies_instead_of_ssd(
    tmp_path: Path, clip: float, lend_copy: bool
) -> None:
    """Every record in the host cache, write-back: no SSD byte moves; the SSD actor's copies between cache
    files and ring slots take bytes / memcpy rate, shared among the copies in flight (the rest is free)."""
    cfg = small_config(tmp_path, clip=clip)
    prof = make_profile(tflops=1e6, read=1e-3, write=1e-3, memcpy=0.5)
    env = env_for(prof, cfg)
    pred = predict(env.workload, fully_cached(env, clip, lend_copy=lend_copy), prof, schedule="current")
    out, into = cached_copy_bytes(env, grad_log=clip > 0, lend_copy=lend_copy)
    assert pred.account.ssd_read_bytes == pred.account.ssd_write_bytes == 0
    assert not [s for s in pred.sim.spans if s.lane in ("ssd read", "ssd write")]
    assert sum(s.nbytes for s in pred.sim.spans if s.lane == "cache read") == out
    assert sum(s.nbytes for s in pred.sim.spans if s.lane == "cache write") == into
    assert (pred.account.cache_read_bytes, pred.account.cache_write_bytes) == (out, into)
    # Processor sharing conserves work: the copy lane is busy (out + into) / rate, and with everything
    # else free the step is the copies.
    assert pred.busy["memcpy"] == pytest.approx((out + into) / 0.5e9, rel=1e-6)
    assert pred.work.memcpy == pytest.approx((out + into) / 0.5e9, rel=1e-9)
    assert pred.bottleneck == "memcpy"
    assert pred.step_s == pytest.approx(pred.busy["memcpy"], rel=1e-6)
    # Without the cache the same step is SSD-bound at the (slow) SSD rate.
    plain = predict(env.workload, env.plan, prof, schedule="current")
    assert plain.account.cache_read_bytes == 0 and plain.bottleneck == "ssd"
    assert plain.step_s > 100 * pred.step_s


def test_write_through_still_pays_the_ssd_writes(tmp_path: Path) -> None:
    """Write-through copies every cached record into the cache and also writes it to SSD; the gradient
    log, a transient record, stays in the cache. Reads come from the cache."""
    cfg = small_config(tmp_path, clip=1.0)
    prof = make_profile(tflops=1e6, read=1.0, write=0.01, memcpy=FAST)
    env = env_for(prof, cfg)
    pred = predict(env.workload, fully_cached(env, 1.0, cache_write_through=True), prof, schedule="current")
    w = env.workload
    durable = sum(u.numel * (w.param_bytes + 12) for u in w.spec.units)  # new P, master, m, v
    out, into = cached_copy_bytes(env, grad_log=True, lend_copy=env.plan.lend_copy)
    assert pred.account.ssd_read_bytes == 0
    assert pred.account.ssd_write_bytes == durable
    assert sum(s.nbytes for s in pred.sim.spans if s.lane == "ssd write") == durable
    assert sum(s.nbytes for s in pred.sim.spans if s.lane == "cache write") == into
    assert pred.account.cache_read_bytes == out
    assert pred.bottleneck == "ssd"
    assert pred.step_s == pytest.approx(durable / 0.01e9, rel=0.01)


def test_only_the_cached_units_leave_the_ssd(tmp_path: Path) -> None:
    """State cached for some units only (as fill_cache does on a tight budget): the other units' records
    keep their SSD reads and writes; the cached ones are lent to the optimizer (no SSD bytes; one copy
    where lends copy)."""
    cfg = small_config(tmp_path, clip=1.0)
    prof = make_profile(tflops=1e6, read=1.0, write=1.0, memcpy=1.0)
    env = env_for(prof, cfg)
    w = env.workload
    plan = dataclasses.replace(env.plan, cpu_cached_state=(1, 2), lend_copy=True)
    pred = predict(w, plan, prof, schedule="current")
    n = {u: w.spec.units[u].numel for u in range(w.num_units)}
    state_on_ssd = 12 * sum(v for u, v in n.items() if u not in (1, 2))
    params = sum(n.values()) * w.param_bytes
    grads = 4 * sum(v for u, v in n.items() if u != 0)  # the log: all but the last gradient out
    assert pred.account.cache_read_bytes == 0
    assert pred.account.cache_write_bytes == 12 * (n[1] + n[2])
    # params read once, in backward, but the head's: the forward and head ran ahead on the new params
    head = n[w.num_units - 1] * w.param_bytes
    assert pred.account.ssd_read_bytes == state_on_ssd + params - head + grads
    assert pred.account.ssd_write_bytes == state_on_ssd + params + grads
    moved = sum(s.nbytes for s in pred.sim.spans if s.lane == "ssd read")
    assert moved == pred.account.ssd_read_bytes


def test_the_current_schedule_keeps_the_cache_but_not_the_planners_schedule(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, clip=1.0)
    env = env_for(make_profile(), cfg)
    plan = dataclasses.replace(
        fully_cached(env, 1.0),
        prefetch_depth=2,
        optimizer_overlap="next_forward",
        gpu_resident_params=(1,),
    )
    current = as_pipeline(plan)
    assert current.prefetch_depth == 0 and current.overlap == "after_backward"
    assert not current.gpu_resident_params
    assert current.cpu_cached_state == plan.cpu_cached_state and current.grad_log_tier == "cpu"
    sched = current_step(env.workload, current)
    methods = {op.method for op in sched.ops if op.actor == "ssd"}
    assert methods == {"cache_read", "cache_write", "lend", "adopt", "view", "publish", "commit"}


def test_the_current_schedule_moves_parked_block_inputs_out_and_back(tmp_path: Path) -> None:
    """Blocks 1 and 2 parked (the pipeline's "recompute" policy; as_pipeline keeps it, not swap_cpu): each
    input leaves on the D2H stream after the forward that made it and comes back before its backward."""
    cfg = small_config(tmp_path, clip=0.0)
    env = env_for(make_profile(tflops=2e-3), cfg)
    policy = ("keep", "recompute", "recompute", "keep", "keep", "keep")
    parked = dataclasses.replace(env.plan, activation_policy=policy)
    assert as_pipeline(parked).parked_inputs == (1, 2)
    assert (
        as_pipeline(dataclasses.replace(env.plan, activation_policy=("keep", "swap_cpu"))).parked_inputs == ()
    )
    sched = current_step(env.workload, as_pipeline(parked))
    copies = [op for op in sched.ops if op.actor in ("d2h", "h2d")]
    boundary = env.workload.boundary_bytes
    assert sorted((op.actor, op.unit) for op in copies) == [("d2h", 1), ("d2h", 2), ("h2d", 1), ("h2d", 2)]
    assert all(op.nbytes == boundary for op in copies)
    by_id = {op.id: op for op in sched.ops}
    for u in (1, 2):
        back = next(op for op in copies if op.actor == "h2d" and op.unit == u)
        out = next(op for op in copies if op.actor == "d2h" and op.unit == u)
        assert out.id in back.after  # no copy back before the copy out
        compute = next(
            op for op in sched.ops if op.actor == "cuda" and op.unit == u and "backward" in op.method
        )
        assert back.id in compute.after
        made_by = by_id[out.after[0]]
        assert made_by.method == "compute_forward" and made_by.unit == u - 1
    plain = predict(env.workload, as_pipeline(env.plan), env.profile, schedule="current")
    moved = predict(env.workload, as_pipeline(parked), env.profile, schedule="current")
    assert moved.sim.busy["d2h"] > plain.sim.busy["d2h"] and moved.sim.busy["h2d"] > plain.sim.busy["h2d"]
