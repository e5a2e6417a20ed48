"""Data parallelism over 2 pipelines: real Ray actors (compute, SSD I/O, 1 optimizer, comm each), gloo on
the CPU, real shard stores on disk.

The same global batch through 2 pipelines must train the same weights as 1 pipeline (to 1e-6, fp32: only
the order of the gradient sums differs), with exact clipping and without, with gradient accumulation on
both sides; a stopped and resumed job must equal an uninterrupted one bit for bit; each pipeline's store
holds its half of the optimizer state and the full params; stores that do not belong together are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fuyou_ray.config import DataConfig, RunConfig
from fuyou_ray.driver import model_fingerprint, train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.optim import AdamWStep
from fuyou_ray.parallel.commit import StoreState, reconcile
from fuyou_ray.parallel.schedule import PipelineStep, build_pipeline_step, merge
from fuyou_ray.parallel.shards import (
    SHARD_ALIGN,
    JobLayout,
    ShardGeometry,
    ShardMismatchError,
    gather_unit_tensors,
    pipeline_paths,
    read_layout,
    shard_bounds,
)
from fuyou_ray.plan import make_plan
from fuyou_ray.records import RecordKind
from fuyou_ray.ring import make_spec
from fuyou_ray.schedule import Ref, StepInputs
from fuyou_ray.store import MANIFEST, STORE_DIR, SSDTensorStore, align_up
from tests.conftest import tiny_config

TOL = 1e-6
POOL = {"device": "cpu", "optimizer_actors": 1, "optimizer_threads": 1}
KINDS = (RecordKind.PARAM, RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)


def config(tmp: Path, clip: float, world: int = 2, micro_batch: int = 2) -> RunConfig:
    """8 sequences a step; micro_batch 2: 4 micro-batches, 2 per pipeline (accumulated on both sides)."""
    return tiny_config(
        tmp,
        steps=3,
        batch={"global_batch": 8, "micro_batch": micro_batch},
        optimizer={"max_grad_norm": clip},
        runtime={**POOL, "data_parallel": world},
    )


def state(cfg: RunConfig) -> dict[RecordKind, list[torch.Tensor]]:
    load = gather_unit_tensors if cfg.runtime.data_parallel > 1 else load_unit_tensors
    return {kind: load(cfg, kind) for kind in KINDS}


def manifests(cfg: RunConfig) -> list[str]:
    return [
        (Path(p[0]) / STORE_DIR / MANIFEST).read_text()
        for p in pipeline_paths(cfg.ssd.paths, cfg.runtime.data_parallel)
    ]


def assert_close(
    ours: dict[RecordKind, list[torch.Tensor]], single: dict[RecordKind, list[torch.Tensor]]
) -> None:
    for kind in KINDS:
        for unit, (a, b) in enumerate(zip(ours[kind], single[kind], strict=True)):
            assert a.shape == b.shape
            diff = (a - b).abs().max().item()
            assert diff <= TOL, f"{kind.value} of unit {unit}: max diff {diff:.3e} > {TOL}"


def fuyou_actors_alive(ray: Any) -> list[str]:
    from ray._private import state as ray_state

    return [
        str(a.get("Name"))
        for a in ray_state.actors().values()
        if str(a.get("Name", "")).startswith("fuyou:") and a.get("State") != "DEAD"
    ]


def wait_no_actors(ray: Any) -> None:
    deadline = time.monotonic() + 30
    while fuyou_actors_alive(ray) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not fuyou_actors_alive(ray), f"actors left alive: {fuyou_actors_alive(ray)}"
    groups = ray.util.placement_group_table()
    assert not [g for g in groups.values() if g.get("state") != "REMOVED"], "placement groups left"


# ------------------------------------------------------------------------------------- core, no Ray


def test_shard_bounds_cover_each_unit_once() -> None:
    for numel, world in [(8256, 2), (12672, 2), (12672, 3), (5, 4), (3 * SHARD_ALIGN + 1, 4)]:
        bounds = shard_bounds(numel, world)
        assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(lo < hi for lo, hi in bounds)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(lo % SHARD_ALIGN == 0 for lo, _ in shard_bounds(12672, 2))
    with pytest.raises(ValueError):
        shard_bounds(3, 4)


def test_optimizer_ranges_are_refused_with_what_would_fit(tmp_path: Path) -> None:
    """Pipelines update whole optimizer shards: a budget that needs optimizer ranges is refused, naming
    the two ways out."""
    from fuyou_ray.errors import BudgetError
    from fuyou_ray.parallel.driver import plan_job

    cfg = tiny_config(
        tmp_path,
        model={"vocab_size": 256, "n_layer": 1, "n_head": 4, "d_model": 448, "max_seq_len": 16},
        batch={"global_batch": 8, "micro_batch": 2, "seq_len": 16},
        budgets={"gpu_mem": "1GiB", "cpu_mem": "160MiB"},
        runtime={**POOL, "data_parallel": 2, "optimizer_range": 1},
    )
    with pytest.raises(BudgetError, match=r"raise budgets\.cpu_mem, or run with runtime\.data_parallel 1"):
        plan_job(cfg, ModelSpec(cfg.model))


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_pipelines_meet_in_the_same_collectives(tmp_path: Path, clip: float) -> None:
    """Every pipeline's schedule calls its comm actor with the same collectives in the same order (else
    the job deadlocks or exchanges the wrong data), and only through ops of its own pipeline."""
    cfg = config(tmp_path, clip)
    spec = ModelSpec(cfg.model)
    geometry = ShardGeometry(spec, 2)
    tokens = torch.zeros(4, 32, dtype=torch.int64)
    hp = AdamWStep(1, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    inputs = StepInputs(0, tokens, tokens, 2, hp, clip, "float32", 1, {}, step_key="k")
    ring = make_spec(4 * 1024 * 1024, 8)
    scheds = [
        build_pipeline_step(spec, ring, geometry, PipelineStep(k, 2, inputs, accum=4)) for k in range(2)
    ]
    job = merge(scheds)
    calls = [[(op.method, op.unit) for op in job.sched.ops if op.actor == f"p{k}.comm"] for k in range(2)]
    assert calls[0] == calls[1] and len(calls[0]) == 2 * spec.num_units + 2 + (clip > 0)
    for op in job.sched.ops:
        deps = list(op.after) + [a.op for a in op.args if isinstance(a, Ref)]
        assert all(d < op.id for d in deps), "dependencies must point backwards"
        assert all(job.sched.ops[d].actor[:3] == op.actor[:3] for d in deps), "no cross-pipeline data"


# ------------------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def clipped(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Exact clipping: an uninterrupted 2-pipeline job, a job stopped after step 1 and resumed (with refused
    resumes in between), and the 1-pipeline run of the same config."""
    root = tmp_path_factory.mktemp("dp-clip")
    straight = config(root / "straight", 0.5)
    result = train(straight)
    stopped = config(root / "resumed", 0.5)
    first = train(stopped, stop_after=1)
    before = manifests(stopped)
    refused = {}
    for world in (1, 4):  # another pipeline count
        with pytest.raises(ShardMismatchError) as info:
            train(config(root / "resumed", 0.5, world=world))
        refused[world] = str(info.value)
    assert manifests(stopped) == before, "a refused resume changed a store"
    second = train(stopped)
    single = config(root / "single", 0.5, world=1)
    reference = train(single, executor="local")
    return {
        "straight": straight,
        "result": result,
        "stopped": stopped,
        "first": first,
        "second": second,
        "refused": refused,
        "single": single,
        "reference": reference,
        "ray": ray_cluster,
    }


def test_clipped_job_matches_single_pipeline(clipped: dict[str, Any]) -> None:
    ours, single = clipped["result"].steps, clipped["reference"].steps
    assert any(s.grad_norm > 0.5 for s in single), "clipping must engage"
    for a, b in zip(ours, single, strict=True):
        assert abs(a.loss - b.loss) <= TOL and abs(a.grad_norm - b.grad_norm) <= TOL * b.grad_norm
    assert_close(state(clipped["straight"]), state(clipped["single"]))
    assert single[-1].loss < single[0].loss


def test_resumed_job_equals_uninterrupted(clipped: dict[str, Any]) -> None:
    assert (clipped["first"].start_step, clipped["first"].final_step) == (0, 1)
    assert (clipped["second"].start_step, clipped["second"].final_step) == (1, 3)
    a, b = state(clipped["straight"]), state(clipped["stopped"])
    for kind in KINDS:
        for unit, (x, y) in enumerate(zip(a[kind], b[kind], strict=True)):
            assert torch.equal(x, y), f"{kind.value} of unit {unit} differs after the resume"
    lines = (Path(clipped["stopped"].run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_each_store_holds_full_params_and_half_the_optimizer_state(clipped: dict[str, Any]) -> None:
    cfg, single = clipped["straight"], clipped["single"]
    spec = ModelSpec(cfg.model)
    geometry = ShardGeometry(spec, 2)

    def split(paths: tuple[str, ...]) -> tuple[int, int]:
        store = SSDTensorStore(paths, direct_io=False)
        try:
            recs = store.manifest.records.values()
            params = sum(r.padded_nbytes for r in recs if r.name.endswith(".param"))
            return params, sum(r.padded_nbytes for r in recs) - params
        finally:
            store.close()

    whole_params, whole_state = split(single.ssd.paths)
    shards = [split(paths) for paths in pipeline_paths(cfg.ssd.paths, 2)]
    for k, (params, opt_state) in enumerate(shards):
        assert params == whole_params
        expected = sum(3 * align_up(geometry.size(u, k) * 4) for u in range(spec.num_units))
        assert opt_state == expected
        assert opt_state <= whole_state / 2 + 3 * spec.num_units * 4096, "more than half the state"
    assert sum(s for _, s in shards) >= whole_state  # together they hold all of it
    layout = read_layout(cfg.run_dir)
    assert layout is not None and layout.world == 2


def test_other_pipeline_count_is_refused(clipped: dict[str, Any]) -> None:
    assert "runtime.data_parallel: 2" in clipped["refused"][1]
    assert "runtime.data_parallel: 2" in clipped["refused"][4]


def test_no_actor_or_placement_group_outlives_a_job(clipped: dict[str, Any]) -> None:
    wait_no_actors(clipped["ray"])


def test_unclipped_job_is_the_single_pipeline_bit_for_bit(ray_cluster: Any, tmp_path: Path) -> None:
    """Without clipping the optimizer of each unit overlaps the backward of the next (Fuyou's path). One
    micro-batch per pipeline, two in the single pipeline: the gradient sums are then the same additions,
    so the weights, moments and losses must be equal, not just close."""
    evaluate = {"eval_every": 3, "eval_batches": 1}  # the held-out loss after step 3, through pipeline 0
    cfg = dataclasses.replace(config(tmp_path / "dp", 0.0, micro_batch=4), data=DataConfig(**evaluate))
    ours = train(cfg).steps
    single = dataclasses.replace(config(tmp_path / "single", 0.0, world=1, micro_batch=4), data=cfg.data)
    theirs = train(single, executor="local").steps
    assert [s.loss for s in ours] == [s.loss for s in theirs]
    assert ours[-1].eval_loss is not None and ours[-1].eval_loss == theirs[-1].eval_loss
    a, b = state(cfg), state(single)
    for kind in KINDS:
        for unit, (x, y) in enumerate(zip(a[kind], b[kind], strict=True)):
            assert torch.equal(x, y), f"{kind.value} of unit {unit} differs"
    assert theirs[-1].loss < theirs[0].loss
    wait_no_actors(ray_cluster)


def test_swapped_or_lagging_stores_are_refused(clipped: dict[str, Any], tmp_path: Path) -> None:
    """The stores' own states, read from disk as the SSD actors report them, through the reconciliation:
    swapped pipeline stores, a store of another run, a store restored alone to an older step."""
    cfg = clipped["straight"]
    layout = read_layout(cfg.run_dir)
    assert layout is not None
    fingerprint = model_fingerprint(cfg, make_plan(cfg, ModelSpec(cfg.model)))
    num_units = ModelSpec(cfg.model).num_units
    copies = [tmp_path / f"p{k}" for k in range(2)]
    for k, src in enumerate(pipeline_paths(cfg.ssd.paths, 2)):
        shutil.copytree(src[0], copies[k])

    def states(order: list[int]) -> list[StoreState]:
        out = []
        for rank, k in enumerate(order):
            store = SSDTensorStore([copies[k]], direct_io=False)
            try:
                meta = dict(store.manifest.meta)
                out.append(StoreState(rank, (str(copies[k]),), store.committed_step, meta))
            finally:
                store.close()
        return out

    assert reconcile(states([0, 1]), layout, fingerprint, num_units).committed == 3
    with pytest.raises(ShardMismatchError, match="pipeline 1's store"):
        reconcile(states([1, 0]), layout, fingerprint, num_units)
    other = JobLayout(2, "another-run", layout.geometry, layout.pipelines)
    with pytest.raises(ShardMismatchError, match="another run"):
        reconcile(states([0, 1]), other, fingerprint, num_units)
    lagging = states([0, 1])
    lagging[1] = StoreState(1, lagging[1].paths, 2, lagging[1].meta)
    with pytest.raises(ShardMismatchError, match="not committed together"):
        reconcile(lagging, layout, fingerprint, num_units)
    # Phase 2 interrupted: pipeline 1 voted (every unit published under the step's key), did not commit.
    voted = StoreState(
        1, lagging[1].paths, 2, lagging[1].meta, 3, tuple(range(num_units)), lagging[0].meta["step_key"]
    )
    done = reconcile([lagging[0], voted], layout, fingerprint, num_units)
    assert (done.committed, done.commit) == (3, (1,))


@pytest.mark.slow
def test_killed_actor_rebuilds_the_pipelines_and_replays(clipped: dict[str, Any], tmp_path: Path) -> None:
    """kill -9 of pipeline 1's SSD actor during step 2: every pipeline is rebuilt, step 2 replays on all of
    them from the committed state (units some store had published stay), and the job ends bit for bit as
    the uninterrupted one."""
    import threading

    ray = clipped["ray"]
    cfg = config(tmp_path / "killed", 0.5)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    killed: list[int] = []

    def kill_during_step_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
                time.sleep(0.1)
                pid = ray.get(ray.get_actor("fuyou:p1:ssd-io").pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_during_step_2, daemon=True)
    killer.start()
    result = train(cfg)
    killer.join()
    assert killed and [s.step for s in result.steps] == [1, 2, 3]
    a, b = state(clipped["straight"]), state(cfg)
    for kind in KINDS:
        for unit, (x, y) in enumerate(zip(a[kind], b[kind], strict=True)):
            assert torch.equal(x, y), f"{kind.value} of unit {unit} differs after the rebuild"
    wait_no_actors(ray)
