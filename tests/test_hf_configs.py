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
    "gpt3-13b-24gb.yaml": 13_110_702_080,  # (GPT-3 13B's published count is 12.85 B without the LM head)
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


def test_gpt3_13b_at_the_paper_batch_parks_block_inputs_and_dry_runs_anywhere() -> None:
    """64 x 1024 tokens: the 40 blocks' inputs alone would need 25 GiB; the plan parks the first ones in
    host memory, and `train --dry-run` prints that plan on a machine without the GPU."""
    import json
    import subprocess
    import sys

    cfg = load_config(REPO / "configs" / "gpt3-13b-24gb.yaml")
    plan = plan_for_import(cfg, ModelSpec(cfg.model))
    assert 0 < len(plan.parked_inputs) < 40 and plan.parked_inputs[0] == 1
    assert plan.device_bytes_needed <= cfg.budgets.gpu_mem <= plan.device_bytes_needed + 2 * 2**30
    assert plan.cpu_bytes_needed <= cfg.budgets.cpu_mem
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuyou_ray",
            "train",
            str(REPO / "configs" / "gpt3-13b-24gb.yaml"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    printed = json.loads(out.stdout)["plan"]
    assert printed["device"] == "cuda" and printed["activation_policy"].count("recompute") == len(
        plan.parked_inputs
    )
