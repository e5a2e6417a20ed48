"""`fuyou-ray bench` on CPU: the measured steps, the work and the bound, with and without the host cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuyou_ray import bench
from fuyou_ray.bench import format_table, run_bench
from fuyou_ray.errors import RunStateError
from tests.conftest import REPO, tiny_config


@pytest.fixture(autouse=True)
def short_ssd_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "SSD_STREAM_SECONDS", 0.3)


def test_a_cached_run_is_measured_warm_and_its_copies_count_in_the_bound(tmp_path: Path) -> None:
    """With the host cache the warm-up is 2 steps (a start reads the cache cold from SSD and fills fresh
    /dev/shm pages), the measured steps move no SSD bytes, and the cache's copies are work with a rate."""
    cfg = tiny_config(
        tmp_path,
        budgets={"gpu_mem": "1GiB", "cpu_mem": "256MiB"},
        runtime={"executor": "local", "cpu_cache": "auto"},
    )
    r = run_bench(cfg, steps=2)
    assert r["warmup_steps"] == 2 and len(r["steps_s"]) == 2
    assert r["plan"]["cpu_cached_state"] and r["cache"]["mode"] == "write-back"
    assert r["work"]["ssd_read_bytes"] == 0 and r["work"]["ssd_write_bytes"] == 0
    assert r["work"]["cache_bytes"] > 0 and r["rates"]["cache_copy"] > 0
    assert r["bound_s"]["memcpy"] == pytest.approx(r["work"]["cache_bytes"] / r["rates"]["cache_copy"])
    assert r["efficiency"] == pytest.approx(max(r["bound_s"].values()) / r["step_s"])
    assert r["busy_s"].get("cache read", 0) > 0 and r["busy_s"].get("cache write", 0) > 0
    table = format_table(r)
    assert "cache copy" in table and "host cache (write-back)" in table
    assert json.loads((Path(cfg.run_dir) / "bench.json").read_text())["step_s"] == r["step_s"]


def test_an_uncached_run_warms_up_once_and_has_no_copies(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, runtime={"executor": "local", "cpu_cache": "off"})
    r = run_bench(cfg, steps=1)
    assert r["warmup_steps"] == 1 and len(r["steps_s"]) == 1
    assert r["work"]["cache_bytes"] == 0 and r["rates"]["cache_copy"] == 0 and r["bound_s"]["memcpy"] == 0
    assert r["work"]["ssd_read_bytes"] > 0 and r["work"]["ssd_write_bytes"] > 0


def test_a_finished_run_dir_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, runtime={"executor": "local", "cpu_cache": "off"})
    run_bench(cfg, steps=1)
    with pytest.raises(RunStateError, match="bench a fresh run_dir"):
        run_bench(cfg, steps=1)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "bench").glob("*.yaml")))
def test_every_bench_config_plans_within_its_budgets_on_the_gpu(name: str) -> None:
    from fuyou_ray.config import load_config
    from fuyou_ray.models import ModelSpec
    from fuyou_ray.plan import make_plan

    cfg = load_config(REPO / "configs" / "bench" / name)
    plan = make_plan(cfg, ModelSpec(cfg.model), device="cuda")
    assert plan.device_bytes_needed <= cfg.budgets.gpu_mem and plan.cpu_bytes_needed <= cfg.budgets.cpu_mem
    if name == "gpt3-2.7b.yaml":  # sized for the H100 box's single disk (64 GiB free)
        assert plan.ssd_bytes_needed <= 60 * 2**30
