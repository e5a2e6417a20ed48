"""The automatic planner: its choices follow the budgets (monotone where they must be), it refuses with the
smallest budget that would fit, and `fuyou-ray plan` prints the plan, the prediction and the limits."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from fuyou_ray.config import RunConfig, parse_size
from fuyou_ray.errors import BudgetError
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import TIE_RESOLUTION, PlannerOptions, auto_plan, largest_batch, make_plan, minimal_needs
from fuyou_ray.profile import HardwareProfile
from tests.conftest import REPO, tiny_config
from tests.test_cli import run_cli
from tests.test_simulate import make_profile

MiB = 2**20


def config(
    tmp: Path, *, clip: float = 0.0, gpu: str = "1GiB", cpu: str = "256MiB", batch: int = 16
) -> RunConfig:
    return tiny_config(
        tmp,
        model={"n_layer": 8, "n_head": 2, "d_model": 128, "max_seq_len": 128, "vocab_size": 256},
        batch={"global_batch": batch, "micro_batch": min(batch, 8), "seq_len": 128},
        optimizer={"max_grad_norm": clip},
        budgets={"gpu_mem": gpu, "cpu_mem": cpu},
        runtime={"device": "cpu", "optimizer_actors": 0, "optimizer_threads": 0},
    )


def io_bound_profile(ssd_gbps: float = 0.02) -> HardwareProfile:
    """A machine whose SSD is slow next to its GPU: caching state in CPU memory pays."""
    return make_profile(tflops=0.05, h2d=2.0, d2h=2.0, read=ssd_gbps, write=ssd_gbps * 0.6, adam=((4, 0.2),))


def with_budget(cfg: RunConfig, **budgets: str) -> RunConfig:
    sizes = {k: parse_size(v) for k, v in budgets.items()}
    return dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, **sizes))


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return ModelSpec(config(tmp_path_factory.mktemp("spec")).model)


# ---------------------------------------------------------------------------------------------- choices


def test_make_plan_describes_todays_pipeline(tmp_path: Path, spec: ModelSpec) -> None:
    plan = make_plan(config(tmp_path, clip=1.0), spec)
    assert plan.micro_batch == 8 and plan.prefetch_depth == 0
    assert all(plan.policy(u) == "keep" for u in range(spec.num_units))
    assert plan.overlap == "after_backward" and plan.grad_log_tier == "ssd"
    assert not plan.cpu_cached_state and plan.to_dict()["activation_policy"] == ()
    assert make_plan(config(tmp_path), spec).overlap == "backward"


def test_more_cpu_memory_caches_state_and_never_predicts_slower(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    floor = minimal_needs(config(tmp_path), spec, prof)[1].total
    state = spec.numel * 16  # params, master weights, Adam moments, gradient log
    steps, cached = [], []
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5):
        cfg = with_budget(config(tmp_path), cpu_mem=str(int(floor + fraction * state)))
        result = auto_plan(cfg, spec, prof)
        assert result.cpu.total <= cfg.budgets.cpu_mem
        steps.append(result.prediction.step_s)
        cached.append(len(result.plan.cpu_cached_state) + len(result.plan.cpu_cached_params))
    assert all(b <= a * (1 + TIE_RESOLUTION) for a, b in itertools.pairwise(steps)), steps
    assert cached[0] < cached[-1] and cached == sorted(cached), cached
    assert steps[-1] < 0.5 * steps[0]  # enough memory takes the SSD out of the step
    big = auto_plan(with_budget(config(tmp_path), cpu_mem="1GiB"), spec, prof)
    assert len(big.plan.cpu_cached_state) == spec.num_units and big.prediction.account.ssd_read_bytes == 0


def test_more_ssds_never_predict_slower(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    floor = minimal_needs(config(tmp_path), spec, prof)[1].total
    cfg = with_budget(config(tmp_path), cpu_mem=str(floor))
    steps = [auto_plan(cfg, spec, prof.with_ssd_devices(n)).prediction for n in (1, 2, 4, 8)]
    times = [p.step_s for p in steps]
    assert all(b <= a * (1 + TIE_RESOLUTION) for a, b in itertools.pairwise(times)), times
    assert steps[0].bottleneck == "ssd"


def test_more_gpu_memory_never_predicts_slower(tmp_path: Path, spec: ModelSpec) -> None:
    prof = make_profile(tflops=0.02, h2d=0.05, d2h=0.05, read=0.5, write=0.3, adam=((4, 1.0),))
    need = minimal_needs(config(tmp_path), spec, prof)[0].total
    times = []
    for factor in (1.0, 1.5, 2.5, 4.0, 10.0):
        cfg = dataclasses.replace(
            config(tmp_path),
            budgets=dataclasses.replace(config(tmp_path).budgets, gpu_mem=int(need * factor)),
        )
        times.append(auto_plan(cfg, spec, prof).prediction.step_s)
    assert all(b <= a * (1 + TIE_RESOLUTION) for a, b in itertools.pairwise(times)), times


def test_a_bigger_batch_never_fits_when_a_smaller_one_does_not(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    at32 = config(tmp_path, batch=32)
    at32 = dataclasses.replace(at32, batch=dataclasses.replace(at32.batch, micro_batch=1))
    gpu = minimal_needs(at32, spec, prof)[0].total
    cfg = dataclasses.replace(
        config(tmp_path), budgets=dataclasses.replace(config(tmp_path).budgets, gpu_mem=gpu)
    )
    limit = largest_batch(cfg, spec, prof)
    assert 32 <= limit < 64
    fits = []
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        trial = dataclasses.replace(
            cfg, batch=dataclasses.replace(cfg.batch, global_batch=batch, micro_batch=1)
        )
        try:
            auto_plan(trial, spec, prof)
            fits.append(True)
        except BudgetError:
            fits.append(False)
        assert fits[-1] == (batch <= limit), (batch, limit)
    assert fits == sorted(fits, reverse=True) and not fits[-1]


def test_largest_model_is_the_depth_whose_ssd_space_fits(tmp_path: Path, spec: ModelSpec) -> None:
    from fuyou_ray.plan import largest_layers, ssd_bytes_needed

    cfg = config(tmp_path, clip=1.0)
    need = ssd_bytes_needed(spec, 2, clipping=True)  # the 8-layer model's space, bf16 params
    prof = dataclasses.replace(
        io_bound_profile(), ssd=dataclasses.replace(io_bound_profile().ssd, capacity_bytes=0)
    )
    assert largest_layers(cfg, spec, prof) is None  # capacity unknown
    block = ssd_bytes_needed(ModelSpec(dataclasses.replace(cfg.model, n_layer=9)), 2, clipping=True) - need
    for space, layers in ((need, 8), (need - 1, 7), (need - block, 7), (need + block, 9)):
        prof = dataclasses.replace(
            prof, ssd=dataclasses.replace(prof.ssd, capacity_bytes=int(space * 1.01) + 1)
        )
        assert largest_layers(cfg, spec, prof) == layers, (space, layers)


def test_big_gpu_keeps_activations_small_gpu_recomputes_from_host(tmp_path: Path, spec: ModelSpec) -> None:
    prof = make_profile(tflops=0.05, h2d=0.5, d2h=0.5, read=1.0, write=1.0, adam=((4, 1.0),))
    cfg = config(tmp_path, batch=16)
    blocks = range(1, spec.num_units - 1)
    roomy = auto_plan(
        with_budget(cfg, gpu_mem="4GiB"), spec, prof, PlannerOptions(policies=("keep", "recompute"))
    )
    assert all(roomy.plan.policy(u) == "keep" for u in blocks)
    tight_budget = minimal_needs(cfg, spec, prof)[0].total + 2 * MiB
    tight_cfg = dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, gpu_mem=tight_budget))
    tight = auto_plan(tight_cfg, spec, prof, PlannerOptions(policies=("keep", "recompute")))
    assert any(tight.plan.policy(u) == "recompute" for u in blocks)
    assert tight.gpu.total <= tight_budget


def test_swapping_replaces_recompute_when_the_gpu_is_the_bottleneck(tmp_path: Path, spec: ModelSpec) -> None:
    cfg = with_budget(config(tmp_path), gpu_mem="64MiB", cpu_mem="1GiB")
    slow_gpu = make_profile(tflops=0.002, h2d=50.0, d2h=50.0, read=50.0, write=50.0, adam=((4, 10.0),))
    slow_pcie = make_profile(tflops=0.002, h2d=0.0005, d2h=0.0005, read=50.0, write=50.0, adam=((4, 10.0),))
    blocks = range(1, spec.num_units - 1)
    swapped = auto_plan(cfg, spec, slow_gpu).plan
    assert sum(swapped.policy(u).startswith("swap") for u in blocks) == len(blocks)
    kept = auto_plan(cfg, spec, slow_pcie).plan
    assert not any(kept.policy(u).startswith("swap") for u in blocks)


def test_the_optimizer_overlap_follows_clipping(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    free = auto_plan(config(tmp_path), spec, prof).plan
    assert free.overlap == "backward" and free.grad_log_tier == "none"
    clipped = auto_plan(config(tmp_path, clip=1.0), spec, prof).plan
    assert clipped.exact_clipping and clipped.overlap in ("next_forward", "after_backward")
    roomy = auto_plan(with_budget(config(tmp_path, clip=1.0), cpu_mem="1GiB"), spec, prof).plan
    assert roomy.grad_log_tier == "cpu"


def test_the_prediction_is_recorded_in_the_plan(tmp_path: Path, spec: ModelSpec) -> None:
    result = auto_plan(config(tmp_path), spec, io_bound_profile())
    plan, pred = result.plan, result.prediction
    assert plan.predicted_step_s == pred.step_s > 0 and plan.predicted_bottleneck == pred.bottleneck
    assert plan.profile_name == "test" and plan.device_bytes_needed == result.gpu.total
    assert pred.step_s >= pred.bound_s * (1 - 1e-9) and 0 < pred.efficiency <= 1


def test_todays_prediction_runs_the_drivers_host_cache(tmp_path: Path, spec: ModelSpec) -> None:
    """The current-schedule prediction caches what the driver's plan (make_plan) caches, so a config whose
    cpu_mem holds everything moves no SSD byte, only host-cache copies; with runtime.cpu_cache off it is
    the SSD's again."""
    from fuyou_ray.cache import cache_spec
    from fuyou_ray.commands.plan import pipeline_plan, plan_and_predict
    from fuyou_ray.ring import make_spec

    prof = dataclasses.replace(
        io_bound_profile(), gpu=dataclasses.replace(io_bound_profile().gpu, device="cpu")
    )
    cfg = with_budget(config(tmp_path, clip=1.0), cpu_mem="1GiB")
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, cpu_cache="auto"))
    driver = make_plan(cfg, spec, cpu_count=prof.cpu.cores)
    result, current = plan_and_predict(cfg, spec, prof)
    ours = pipeline_plan(cfg, spec, result.plan, prof.cpu.cores)
    assert ours.num_slots == driver.num_slots and ours.cpu_bytes_needed == driver.cpu_bytes_needed
    assert (ours.optimizer_actors, ours.optimizer_threads) == (
        driver.optimizer_actors,
        driver.optimizer_threads,
    )
    ring = make_spec(driver.slot_bytes, driver.num_slots)
    assert cache_spec(ours, ring, 0) == cache_spec(driver, ring, 0)
    assert len(driver.cpu_cached_state) == spec.num_units and driver.grad_log_tier == "cpu"
    assert current.account.ssd_read_bytes == current.account.ssd_write_bytes == 0
    assert current.account.cache_read_bytes > 0 and current.busy["memcpy"] > 0
    off = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, cpu_cache="off"))
    _, plain = plan_and_predict(off, spec, prof)
    assert plain.account.cache_read_bytes == 0 and plain.account.ssd_read_bytes > 0
    assert plain.step_s > current.step_s


# ---------------------------------------------------------------------------------------------- refusals


def test_too_little_gpu_memory_names_the_smallest_that_fits(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    cfg = with_budget(config(tmp_path), gpu_mem="1MiB")
    with pytest.raises(BudgetError, match=r"budgets\.gpu_mem = 1\.00 MiB is too small.*at least") as info:
        auto_plan(cfg, spec, prof)
    need = minimal_needs(cfg, spec, prof)[0].total
    assert f"at least {_size(need)}" in str(info.value)
    auto_plan(dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, gpu_mem=need)), spec, prof)


def test_too_little_cpu_memory_names_the_smallest_that_fits(tmp_path: Path, spec: ModelSpec) -> None:
    prof = io_bound_profile()
    cfg = with_budget(config(tmp_path), cpu_mem="1MiB")
    with pytest.raises(BudgetError, match=r"budgets\.cpu_mem = 1\.00 MiB is too small.*at least") as info:
        auto_plan(cfg, spec, prof)
    need = minimal_needs(cfg, spec, prof)[1].total
    assert f"at least {_size(need)}" in str(info.value)
    auto_plan(dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, cpu_mem=need)), spec, prof)


def _size(n: int) -> str:
    from fuyou_ray.config import format_size

    return format_size(n)


# ---------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "p.yaml"
    io_bound_profile().save(path)
    return path


def plan_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`fuyou-ray plan ...` in this process (the console script's code path without its start-up)."""
    from fuyou_ray.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_prints_plan_prediction_and_limits(
    capsys: pytest.CaptureFixture[str], profile_file: Path
) -> None:
    code, out, err = plan_cli(capsys, str(REPO / "configs" / "demo.yaml"), "--profile", str(profile_file))
    assert code == 0, err
    for text in (
        "micro-batch chunk",
        "prefetch depth",
        "activations",
        "optimizer pool",
        "step time",
        "bottleneck",
        "efficiency",
        "today's schedule",
        "largest batch that fits",
        "largest model that fits",
    ):
        assert text in out, f"{text!r} missing from:\n{out}"
    for res in ("gpu", "pcie", "ssd", "cpu", "memcpy"):
        assert f"\n  {res} " in out


def test_plan_command_what_if_prints_a_curve(capsys: pytest.CaptureFixture[str], profile_file: Path) -> None:
    demo = str(REPO / "configs" / "demo.yaml")
    code, out, err = plan_cli(capsys, demo, "--profile", str(profile_file), "--what-if", "ssd_count=1,2,4")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2", "4"]
    times = [float(r[1]) for r in rows]
    assert times == sorted(times, reverse=True)


def test_plan_command_refuses_clearly(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, profile_file: Path
) -> None:
    demo = str(REPO / "configs" / "demo.yaml")
    code, _, err = plan_cli(capsys, demo, "--profile", str(tmp_path / "missing.yaml"))
    assert code == 2 and "fuyou-ray probe" in err
    code, _, err = plan_cli(capsys, demo, "--profile", str(profile_file), "--set", "budgets.gpu_mem=64KiB")
    assert code == 3 and "budgets.gpu_mem" in err and "at least" in err
    code, _, err = plan_cli(capsys, demo, "--profile", str(profile_file), "--what-if", "disks=1")
    assert code == 2 and "ssd_count" in err


def test_plan_command_runs_as_a_console_command(tmp_path: Path, profile_file: Path) -> None:
    proc = run_cli(
        "plan", str(REPO / "configs" / "demo.yaml"), "--profile", str(profile_file), "--json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(proc.stdout)
    assert data["plan"]["predicted_step_s"] == data["prediction"]["step_s"] > 0
    assert set(data["prediction"]["work_s"]) == {"gpu", "pcie", "ssd", "cpu", "memcpy"}
    assert {"cache read", "cache write", "memcpy"} <= set(data["current_schedule"]["busy_s"])
