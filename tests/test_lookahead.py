"""Lookahead: with exact clipping the next step's forward runs during this step's optimizer (Fuyou).

The schedule: the optimizer goes through the units in forward order and the next step's forward of each
unit (and its head) follows the unit's update on the GPU, fed from the new params' ring slot; the next
step then opens with `check_forward` and starts at its first backward. The driver: it is used between
steps that nothing else separates, gives the same bits as the plain schedule, and a GPU actor that lost
the forward (restarted between the steps) costs the step its own forward, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fuyou_ray.driver as driver
from actors.gpu_compute import GPUComputeActor
from fuyou_ray.config import RunConfig
from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.optim import AdamWStep
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import SlotHandle, make_spec
from fuyou_ray.schedule import Ref, StepInputs, StepSchedule, build_step
from tests.conftest import tiny_config
from tests.test_equivalence import assert_matches_reference


def clipped(tmp: Path, steps: int = 4, eval_every: int = 0, **runtime: Any) -> RunConfig:
    return tiny_config(
        tmp,
        batch={"global_batch": 8, "micro_batch": 4},
        optimizer={"max_grad_norm": 0.5},
        data={"eval_every": eval_every},
        runtime=runtime,
        steps=steps,
    )


def step_inputs(spec: ModelSpec, **fields: Any) -> StepInputs:
    tokens = torch.zeros(8, 16, dtype=torch.long)
    base = StepInputs(
        step=3,
        inputs=tokens,
        targets=tokens,
        micro_batch=4,
        hp=AdamWStep(4, 1e-3, 0.9, 0.95, 1e-8, 0.0),
        max_grad_norm=0.5,
        param_dtype="float32",
        pool_size=2,
        commit_meta={},
    )
    return StepInputs(**{**base.__dict__, **fields})


def gpu_calls(sched: StepSchedule) -> list[tuple[str, int]]:
    return [(op.method, op.unit) for op in sched.ops if op.actor == "gpu"]


def test_the_schedule_runs_the_next_forward_behind_the_optimizer(tmp_path: Path) -> None:
    cfg = clipped(tmp_path)
    spec = ModelSpec(cfg.model)
    last = spec.num_units - 1
    ring = make_spec(max(u.numel for u in spec.units) * 4, 8)
    tokens = torch.ones(8, 16, dtype=torch.long)
    sched = build_step(spec, ring, step_inputs(spec, forward_done=True, lookahead=(tokens, tokens)))
    assert sched.lookahead
    ops = sched.ops
    calls = gpu_calls(sched)
    # Opens with check_forward: no forward of its own, no param read for one.
    # Opens with check_forward: no forward or head of its own, no param read for them; then the backward.
    assert calls[:2] == [("check_forward", -1), ("backward", last - 1)] and ops[0].args == (3,)
    reads = [op.unit for op in ops if op.method == "read" and op.args[0].endswith(".param")]
    assert reads == list(range(last - 1, -1, -1))
    # The step's summary is read before the GPU takes the next batch; then the next forward and head,
    # unit by unit.
    begin = calls.index(("start_step", -1))
    assert set(calls[begin - 2 : begin]) == {("clip_coefficient", -1), ("step_summary", -1)}
    assert next(op for op in ops if op.method == "start_step").args[3] == 4  # the next step
    assert calls[begin + 1 :] == [("forward", u) for u in range(last)] + [("head", last)]
    # The optimizer goes through the units in forward order; each forward waits for its unit's updates
    # and reads the new params from the slot they were written to (no read from the store).
    updated = [op.unit for op in ops if op.method == "update"]
    assert updated == sorted(updated)
    for f in (op for op in ops if op.method in ("forward", "head")):
        params = f.args[1]
        assert isinstance(params, SlotHandle) and params.tensor == record_name(f.unit, RecordKind.PARAM)
        assert params.version == 4
        updates = {op.id for op in ops if op.method == "update" and op.unit == f.unit}
        assert updates <= set(f.after)
        # the slot's new-params write and this forward both finish before the slot is filled again
        write = next(op for op in ops if op.method == "write" and op.args[0] == params)
        refills = [op for op in ops if op.id > f.id and _fills(op, params.slot)]
        assert all({f.id, write.id} <= set(op.after) for op in refills[:1])


def _fills(op: Any, slot: int) -> bool:
    handles = [a for a in op.args if isinstance(a, SlotHandle)]
    return op.method in ("read", "emit_grad", "read_range") and any(h.slot == slot for h in handles)


def test_without_clipping_or_after_a_partial_replay_nothing_runs_ahead(tmp_path: Path) -> None:
    cfg = clipped(tmp_path)
    spec = ModelSpec(cfg.model)
    ring = make_spec(max(u.numel for u in spec.units) * 4, 8)
    tokens = torch.ones(8, 16, dtype=torch.long)
    for fields in ({"max_grad_norm": 0.0}, {"done_units": frozenset({0})}):
        sched = build_step(spec, ring, step_inputs(spec, lookahead=(tokens, tokens), **fields))
        assert not sched.lookahead
        assert [m for m, _ in gpu_calls(sched)].count("start_step") == 1
        assert not [op for op in sched.ops if op.method == "forward" and not isinstance(op.args[1], Ref)]


class Spy:
    """Records, per schedule the driver builds, whether it opened on a forward run ahead and ran one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, bool, bool]] = []
        real = driver.build_step

        def spy(spec: ModelSpec, ring: Any, s: StepInputs) -> StepSchedule:
            sched = real(spec, ring, s)
            self.calls.append((s.step, s.forward_done, sched.lookahead))
            return sched

        monkeypatch.setattr(driver, "build_step", spy)


def test_lookahead_is_used_between_steps_and_gives_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = clipped(tmp_path / "off", steps=5, lookahead=False)
    train(off, executor="local")
    spy = Spy(monkeypatch)
    on = clipped(tmp_path / "on", steps=5, eval_every=2)  # evaluations after steps 2 and 4 use the GPU
    result = train(on, executor="local")
    assert spy.calls == [
        (0, False, True),
        (1, True, False),  # the evaluation after step 2 takes the GPU: no lookahead across it
        (2, False, True),
        (3, True, False),
        (4, False, False),  # the last step: there is no next one
    ]
    assert [s.eval_loss is not None for s in result.steps] == [False, True, False, True, True]
    for kind in RecordKind.MASTER, RecordKind.PARAM, RecordKind.EXP_AVG_SQ:
        for ours, theirs in zip(load_unit_tensors(on, kind), load_unit_tensors(off, kind), strict=True):
            assert torch.equal(ours, theirs)
    assert_matches_reference(on, [s.loss for s in result.steps])


def test_a_forward_lost_between_steps_is_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU actor restarted between two steps has lost the forward run ahead: `check_forward` says so and
    the step runs again with its own forward; nothing else changes."""
    spy = Spy(monkeypatch)
    real = GPUComputeActor.check_forward
    lost: list[int] = []

    def forgetful(self: GPUComputeActor, step: int, *after: object) -> int:
        if not lost:  # as a restart would: the state of the forward is gone
            lost.append(step)
            self.inputs = [[] for _ in self.inputs]
        return real(self, step, *after)

    monkeypatch.setattr(GPUComputeActor, "check_forward", forgetful)
    cfg = clipped(tmp_path, steps=3)
    result = train(cfg, executor="local")
    assert lost == [1]
    assert spy.calls == [(0, False, True), (1, True, True), (1, False, True), (2, True, False)]
    assert_matches_reference(cfg, [s.loss for s in result.steps])
