"""Block inputs parked in host memory between forward and backward (the plan's "recompute" policy).

The arena on its own (round trips, wrong call orders), the plan's choice (the fewest blocks that bring
the device under gpu_mem, the host memory it costs), and whole runs: parking changes no bit of the
training, through the local executor (with lookahead, evaluations and replays) and through Ray actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from actors.gpu_compute import DeviceLanes
from fuyou_ray.activations import ActivationParkingError, HostActivations
from fuyou_ray.config import RunConfig, load_config
from fuyou_ray.driver import train
from fuyou_ray.errors import BudgetError
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import estimate_device_bytes, make_plan, parked_input_bytes
from fuyou_ray.records import RecordKind
from fuyou_ray.timeline import Timeline
from tests.conftest import tiny_config
from tests.test_equivalence import assert_matches_reference

ROOT = Path(__file__).resolve().parents[1]


def lanes() -> DeviceLanes:
    return DeviceLanes(torch.device("cpu"), Timeline())


def micro_batches(seed: int, n: int = 3, shape: tuple[int, ...] = (2, 5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the arena


def test_parked_inputs_come_back_bit_for_bit_and_the_arena_is_reused() -> None:
    lane = lanes()
    parked = HostActivations([2, 1], lane)
    assert parked.units == (1, 2) and parked.parks(1) and not parked.parks(0)
    xs1, xs2 = micro_batches(1), micro_batches(2)
    parked.park(1, xs1)
    parked.park(2, xs2)
    assert 1 in parked and 2 in parked
    arena = parked.arena_bytes
    assert arena >= 2 * sum(x.numel() * 4 for x in xs1)
    parked.prefetch(1)  # (the backward of unit 2 starts unit 1's copy back)
    back2, back1 = parked.take(2), parked.take(1)
    for ours, theirs in zip(back1 + back2, xs1 + xs2, strict=True):
        assert torch.equal(ours, theirs)
        assert ours.data_ptr() != theirs.data_ptr()  # a copy, not the caller's tensor
    assert 1 not in parked and 2 not in parked
    assert parked.bytes_out == parked.bytes_in == 2 * sum(x.numel() * 4 for x in xs1)
    # The next step overwrites the same arena.
    parked.reset()
    xs3 = micro_batches(3)
    parked.park(1, xs3)
    assert parked.arena_bytes == arena
    assert all(torch.equal(a, b) for a, b in zip(parked.take(1), xs3, strict=True))
    spans = lane.timeline.drain()
    assert {s.lane for s in spans} == {"d2h", "h2d"} and all(s.label.endswith(".input") for s in spans)
    parked.close()


def test_wrong_call_orders_are_named_errors() -> None:
    parked = HostActivations([1], lanes())
    with pytest.raises(ActivationParkingError, match="not one whose input the plan parks"):
        parked.park(2, micro_batches(0))
    with pytest.raises(ActivationParkingError, match="its forward did not run"):
        parked.take(1)
    parked.prefetch(1)  # nothing parked: nothing to do
    parked.park(1, micro_batches(0))
    parked.reset()
    # A new batch shape between steps makes a new arena; within a step the shape cannot change.
    small = micro_batches(0, shape=(1, 5, 7))
    parked.park(1, small)
    assert torch.equal(parked.take(1)[0], small[0])
    both = HostActivations([1, 2], lanes())
    both.park(1, micro_batches(0))
    with pytest.raises(ActivationParkingError, match="not that of the inputs parked"):
        both.park(2, micro_batches(0, shape=(1, 5, 7)))


# -------------------------------------------------------------------------------------------------- the plan


def width13b(n_layer: int, gpu_mem: str, park: int = -1) -> RunConfig:
    return load_config(
        ROOT / "configs/bench/gpt3-13b-width.yaml",
        [
            f"model.n_layer={n_layer}",
            f"budgets.gpu_mem={gpu_mem}",
            "budgets.cpu_mem=400GiB",
            "runtime.device=cpu",
            f"runtime.park_block_inputs={park}",
        ],
    )


def test_the_plan_parks_the_fewest_first_blocks_that_fit_gpu_mem() -> None:
    # GPT-3 13B at the paper's batch (64 x 1024): 40 blocks' inputs alone would need 26 GB of device memory.
    cfg = width13b(40, "48GiB")
    spec = ModelSpec(cfg.model)
    plan = make_plan(cfg, spec)
    k = len(plan.parked_inputs)
    assert plan.parked_inputs == tuple(range(1, k + 1)) and 0 < k < 40
    assert plan.policy(1) == "recompute" and plan.policy(k + 1) == "keep" and plan.policy(0) == "keep"
    assert plan.device_bytes_needed <= cfg.budgets.gpu_mem
    assert estimate_device_bytes(cfg, spec, 4, k - 1) > cfg.budgets.gpu_mem  # one fewer would not fit
    # More device memory, fewer parked blocks; everything fits: none (the plan records no policy then).
    counts = [len(make_plan(width13b(40, f"{g}GiB"), spec).parked_inputs) for g in (36, 48, 64, 96, 160)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0
    assert make_plan(width13b(40, "160GiB"), spec).activation_policy == ()


def test_parked_inputs_are_counted_in_host_memory() -> None:
    spec = ModelSpec(width13b(4, "400GiB").model)
    none, three = make_plan(width13b(4, "400GiB", 0), spec), make_plan(width13b(4, "400GiB", 3), spec)
    assert three.parked_inputs == (1, 2, 3) and none.parked_inputs == ()
    arena = parked_input_bytes(width13b(4, "400GiB"), 4, 3)
    assert arena == 3 * 64 * 1024 * 5120 * 4  # three blocks' inputs of the whole batch, in fp32 on CPU
    # The ring and the host cache get what the arena leaves.
    assert three.cpu_bytes_needed <= 400 * 2**30 and three.num_slots * three.slot_bytes <= none.ring_bytes
    boundary = 64 * 1024 * 5120 * 4
    assert none.device_bytes_needed - three.device_bytes_needed == 2 * boundary  # one may still be leaving
    # A count beyond the blocks parks them all.
    assert make_plan(width13b(4, "400GiB", 99), spec).parked_inputs == (1, 2, 3, 4)


def test_a_device_too_small_even_with_parked_inputs_is_refused_with_the_fix() -> None:
    spec = ModelSpec(width13b(40, "8GiB").model)
    with pytest.raises(BudgetError, match=r"with the inputs of 40 of 40 blocks parked in host memory"):
        make_plan(width13b(40, "8GiB"), spec)
    with pytest.raises(BudgetError, match=r"set runtime.park_block_inputs: -1 \(auto\)"):
        make_plan(width13b(40, "48GiB", 0), spec)
    small_host = load_config(
        ROOT / "configs/bench/gpt3-13b-width.yaml",
        ["model.n_layer=40", "budgets.gpu_mem=36GiB", "budgets.cpu_mem=10GiB", "runtime.device=cpu"],
    )
    with pytest.raises(BudgetError, match="of parked block inputs"):  # and the host must hold them
        make_plan(small_host, spec)


# ------------------------------------------------------------------------------------------------ whole runs


def parking(tmp: Path, park: int, steps: int = 4, **fields: Any) -> RunConfig:
    return tiny_config(
        tmp,
        model={"vocab_size": 256, "n_layer": 3, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        batch={"global_batch": 8, "micro_batch": 4},
        optimizer={"max_grad_norm": 0.5},
        runtime={"park_block_inputs": park},
        steps=steps,
        **fields,
    )


def assert_same_state(a: RunConfig, b: RunConfig) -> None:
    for kind in RecordKind.MASTER, RecordKind.PARAM, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ:
        for ours, theirs in zip(load_unit_tensors(a, kind), load_unit_tensors(b, kind), strict=True):
            assert torch.equal(ours, theirs)


def test_parking_changes_no_bit_of_training_with_lookahead_and_evaluations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = parking(tmp_path / "kept", 0, steps=5)
    reference = train(kept, executor="local")
    taken: list[int] = []
    real_take = HostActivations.take

    def counting(self: HostActivations, unit: int) -> list[torch.Tensor]:
        taken.append(unit)
        return real_take(self, unit)

    monkeypatch.setattr(HostActivations, "take", counting)
    parked = parking(tmp_path / "parked", 2, steps=5, data={"eval_every": 2})
    result = train(parked, executor="local")
    assert make_plan(parked, ModelSpec(parked.model)).parked_inputs == (1, 2)  # of blocks 1-3
    assert [s.loss for s in result.steps] == [s.loss for s in reference.steps]
    assert [s.eval_loss is not None for s in result.steps] == [False, True, False, True, True]
    assert taken == [2, 1] * 5  # every step's backward took both parked inputs back
    assert_same_state(parked, kept)
    assert_matches_reference(parked, [s.loss for s in result.steps])


def test_parking_through_ray_actors(tmp_path: Path, ray_cluster: Any) -> None:
    cfg = parking(tmp_path / "ray", 3, steps=3)
    result = train(cfg)
    assert_matches_reference(cfg, [s.loss for s in result.steps])
