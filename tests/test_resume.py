"""Stopping after step 3 and re-running reaches step 6 with the same weights as 6 uninterrupted steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from tests.conftest import tiny_config


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path: Path, ray_cluster: object) -> None:
    straight = tiny_config(tmp_path / "straight", steps=6)
    train(straight, executor="ray")

    resumed = tiny_config(tmp_path / "resumed", steps=6)
    first = train(resumed, executor="ray", stop_after=3)
    assert (first.start_step, first.final_step) == (0, 3)
    second = train(resumed, executor="ray")
    assert (second.start_step, second.final_step) == (3, 6)

    for unit, (a, b) in enumerate(zip(load_unit_tensors(straight), load_unit_tensors(resumed), strict=True)):
        assert torch.equal(a, b), f"unit {unit} differs after resume"
    losses = [line for line in (Path(resumed.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6


def test_rerun_of_finished_run_does_nothing(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, steps=2)
    train(cfg, executor="local")
    again = train(cfg, executor="local")
    assert again.steps == [] and again.final_step == 2 and again.start_step == 2
