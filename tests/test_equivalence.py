"""fuyou-ray's SSD-streamed training equals the plain in-memory model + torch.optim.AdamW, to 1e-6."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.records import RecordKind
from fuyou_ray.reference import train_reference
from tests.conftest import tiny_config

TOL = 1e-6


def assert_matches_reference(cfg: RunConfig, losses: list[float]) -> None:
    ref = train_reference(cfg, cfg.steps)
    assert len(losses) == cfg.steps
    for step, (ours, theirs) in enumerate(zip(losses, ref.losses, strict=True)):
        assert abs(ours - theirs) <= TOL, f"step {step + 1}: loss {ours} != reference {theirs}"
    masters = load_unit_tensors(cfg, RecordKind.MASTER)
    params = load_unit_tensors(cfg, RecordKind.PARAM)
    for unit, (ours, theirs) in enumerate(zip(masters, ref.unit_weights(), strict=True)):
        diff = (ours - theirs).abs().max().item()
        assert diff <= TOL, f"unit {unit}: max |dW| = {diff:.3e} > {TOL}"
        # On CPU the streamed params are fp32 copies of the master weights, bit for bit.
        assert torch.equal(params[unit], ours)
    # The run really trained (a run that changed nothing would also "match" at step 0).
    assert ref.losses[-1] < ref.losses[0]


@pytest.mark.parametrize(
    ("name", "batch", "max_grad_norm"),
    [
        ("accum-clip", {"global_batch": 8, "micro_batch": 4}, 0.5),  # clipping active every step
        ("no-accum-clip", {"global_batch": 4, "micro_batch": 4}, 0.5),
        ("accum-noclip", {"global_batch": 8, "micro_batch": 2}, 0.0),  # Fuyou's overlapped path
    ],
)
def test_local_executor_matches_reference(
    tmp_path: Path, name: str, batch: dict, max_grad_norm: float
) -> None:
    cfg = tiny_config(tmp_path, batch=batch, optimizer={"max_grad_norm": max_grad_norm}, steps=4)
    result = train(cfg, executor="local")
    if max_grad_norm > 0:
        # The point of the case: clipping must actually have engaged.
        assert any(s.grad_norm > max_grad_norm for s in result.steps)
    assert_matches_reference(cfg, [s.loss for s in result.steps])


@pytest.mark.slow
def test_ray_actors_match_reference(tmp_path: Path, ray_cluster: object) -> None:
    """Through real Ray actors (GPU compute on CPU, SSD I/O, a pool of 2 optimizers), with accumulation and
    active clipping, over a store striped across two directories."""
    cfg = tiny_config(
        tmp_path,
        optimizer={"max_grad_norm": 0.5},
        ssd={"paths": [str(tmp_path / "ssd0"), str(tmp_path / "ssd1")]},
        steps=4,
    )
    result = train(cfg, executor="ray")
    assert any(s.grad_norm > 0.5 for s in result.steps)
    assert_matches_reference(cfg, [s.loss for s in result.steps])
