"""The budgets are real: optimizer state 4x larger than cpu_mem streams from SSD within the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyou_ray.driver import train
from fuyou_ray.models import ModelSpec
from tests.conftest import tiny_config


@pytest.mark.slow
def test_optimizer_state_four_times_cpu_mem(tmp_path: Path, ray_cluster: object) -> None:
    model = {"n_layer": 12, "n_head": 4, "d_model": 384, "max_seq_len": 32}
    probe = tiny_config(tmp_path, model=model)
    state_bytes = 12 * ModelSpec(probe.model).numel  # fp32 master + Adam m + v
    cpu_mem = state_bytes // 4
    cfg = tiny_config(
        tmp_path,
        model=model,
        budgets={"cpu_mem": cpu_mem, "gpu_mem": "512MiB"},
        batch={"global_batch": 4, "micro_batch": 2, "seq_len": 32},
        steps=2,
    )
    result = train(cfg, executor="ray")
    assert result.final_step == 2
    # The state really lived on SSD: it does not fit the budget, and the store holds all of it.
    assert state_bytes >= 4 * cfg.budgets.cpu_mem
    assert result.io["bytes_stored"] >= state_bytes
    assert result.plan.ring_bytes <= cfg.budgets.cpu_mem
    roles = {m["role"]: m for m in result.memory}
    print({r: round(m["peak_above_baseline"] / 2**20, 1) for r, m in roles.items()})
    assert {"gpu-compute", "ssd-io", "cpu-opt-0", "cpu-opt-1", "driver"} <= set(roles)
    for role, m in roles.items():
        # The compute actor's CPU fallback keeps its "device" memory in host RAM: gpu_mem is its budget too.
        budget = cfg.budgets.cpu_mem + (cfg.budgets.gpu_mem if role == "gpu-compute" else 0)
        assert m["peak_above_baseline"] <= budget, (
            f"{role}: peak RSS {m['peak_above_baseline'] / 2**20:.1f} MiB above its baseline exceeds "
            f"the {budget / 2**20:.1f} MiB budget"
        )
    # Separate processes: each actor measured itself.
    assert len({m["pid"] for m in roles.values()}) == len(roles)
