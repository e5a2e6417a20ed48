"""The shipped 24 GB configs: valid, the published model sizes, and a plan that fits their budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyou_ray.config import load_config
from fuyou_ray.hf import import_checkpoint, plan_for_import
from fuyou_ray.models import ModelSpec
from fuyou_ray.schedule import MIN_SLOTS
from tests.conftest import REPO

CONFIGS = {
    "llama3-8b-24gb.yaml": 8_030_261_248,
    "llama3-70b-24gb.yaml": 70_553_706_496,
    "qwen2.5-72b-24gb.yaml": 72_706_203_648,
}


@pytest.mark.parametrize(("name", "params"), list(CONFIGS.items()))
def test_config_describes_the_published_model_and_fits_24gb(name: str, params: int) -> None:
    cfg = load_config(REPO / "configs" / name)
    spec = ModelSpec(cfg.model)
    assert spec.numel == params
    assert cfg.runtime.device == "cuda" and cfg.budgets.gpu_mem <= 24 * 1000**3
    plan = plan_for_import(cfg, spec)  # on a machine without a GPU: the plan the GPU box will make
    assert plan.param_dtype == "bfloat16"
    assert plan.device_bytes_needed <= cfg.budgets.gpu_mem
    assert plan.num_slots >= MIN_SLOTS and plan.slot_bytes >= max(u.numel for u in spec.units) * 4


def test_a_shipped_config_is_a_base_for_import(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.hf_testlib import save_tiny_model

    save_tiny_model("qwen2", tmp_path / "src")
    base = load_config(REPO / "configs" / "qwen2.5-72b-24gb.yaml")
    result = import_checkpoint(
        tmp_path / "src", tmp_path / "run", base=base, overrides=[f"ssd.paths=[{tmp_path / 'ssd'}]"]
    )
    cfg = load_config(result.config_path)
    assert cfg.model.qkv_bias and cfg.model.d_model == 64  # the checkpoint's model, not the 72B's
    assert cfg.budgets == base.budgets and cfg.optimizer == base.optimizer
    assert cfg.batch.seq_len == 64  # clamped to the checkpoint's context
    assert result.param_dtype == "bfloat16"  # runtime.device cuda, even on this machine
