"""fuyou-ray's SSD-streamed training equals the plain in-memory model + torch.optim.AdamW, to 1e-6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import RANGE_ALIGN
from fuyou_ray.records import RecordKind
from fuyou_ray.reference import train_reference
from fuyou_ray.schedule import state_ranges
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


# A unit of 2.4 M elements (d_model 448) updated in optimizer ranges of RANGE_ALIGN (1 Mi) elements: three
# ranges, the last one short. Gradient, master weights and moments go through the ring range by range.
RANGED_MODEL = {"vocab_size": 256, "n_layer": 1, "n_head": 4, "d_model": 448, "max_seq_len": 16}


def ranged_config(tmp: Path, max_grad_norm: float, optimizer_range: int = 1, **sections: object) -> RunConfig:
    return tiny_config(
        tmp,
        model=RANGED_MODEL,
        batch={"global_batch": 4, "micro_batch": 2, "seq_len": 16},
        budgets={"gpu_mem": "1GiB", "cpu_mem": "160MiB"},
        optimizer={"max_grad_norm": max_grad_norm},
        runtime={"optimizer_range": optimizer_range},
        steps=3,
        **sections,
    )


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0], ids=["clip", "noclip"])
def test_optimizer_ranges_match_reference(tmp_path: Path, max_grad_norm: float) -> None:
    cfg = ranged_config(tmp_path, max_grad_norm)
    result = train(cfg, executor="local")
    assert result.plan.optimizer_range == RANGE_ALIGN
    spec = ModelSpec(cfg.model)
    assert max(len(state_ranges(u.numel, RANGE_ALIGN)) for u in spec.units) == 3
    if max_grad_norm > 0:
        assert any(s.grad_norm > max_grad_norm for s in result.steps)
    assert_matches_reference(cfg, [s.loss for s in result.steps])


@pytest.mark.slow
def test_optimizer_ranges_through_ray_actors_match_reference(tmp_path: Path, ray_cluster: object) -> None:
    cfg = ranged_config(tmp_path, 0.5, ssd={"paths": [str(tmp_path / "ssd0"), str(tmp_path / "ssd1")]})
    result = train(cfg, executor="ray")
    assert result.plan.optimizer_range == RANGE_ALIGN
    assert_matches_reference(cfg, [s.loss for s in result.steps])


def test_a_model_initialized_in_staging_ranges_matches_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SSD actor writes a unit larger than its staging buffer range by range (write_range): with a
    4 MiB buffer the 9.6 MB block's records go in three ranges; the run matches the reference."""
    import actors.ssd_io
    from fuyou_ray.store import SSDTensorStore

    monkeypatch.setattr(actors.ssd_io, "STAGING_BYTES", 4 * 2**20)
    starts: list[int] = []
    write_range = SSDTensorStore.write_range

    def spy(self: SSDTensorStore, name: str, src: memoryview, **kw: Any) -> Any:
        starts.append(kw["lo"])
        return write_range(self, name, src, **kw)

    monkeypatch.setattr(SSDTensorStore, "write_range", spy)
    cfg = ranged_config(tmp_path, 0.5, optimizer_range=0)
    result = train(cfg, executor="local")
    assert result.plan.optimizer_range == 0
    assert sorted(set(starts)) == [0, 4 * 2**20, 8 * 2**20]  # the block's records in three ranges
    assert_matches_reference(cfg, [s.loss for s in result.steps])
