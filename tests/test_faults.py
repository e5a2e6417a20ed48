"""The fault-injection suite: kill -9 real actors (GPU compute, SSD I/O, CPU optimizer) and the driver at
random and at chosen points of multi-step runs on a real Ray cluster; every run must end with weights
bit-identical to an uninterrupted run, with no leaks (no /dev/shm segment, staged file, journal or actor
process left behind).

Kills land while the run makes progress (tests/faults.py waits for a step to commit after each restart),
so they hit forward, backward, the optimizer, publication and commits rather than restarts. The suite
prints one line per test: kills injected and survived; the totals are in README.md (Reliability).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fuyou_ray.config import RunConfig
from fuyou_ray.driver import train
from fuyou_ray.errors import RestartLimitError
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.records import RecordKind
from fuyou_ray.store import JOURNAL, LOCK, MANIFEST, STORE_DIR
from tests.conftest import REPO, fuyou_shm_segments, tiny_config
from tests.faults import FaultInjector, fuyou_actor_processes, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 18  # long enough for a dozen kills, each waiting for the previous restart
KINDS = (RecordKind.PARAM, RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)


def fault_config(tmp: Path, clip: bool, steps: int = STEPS, **runtime: Any) -> RunConfig:
    return tiny_config(
        tmp,
        steps=steps,
        optimizer={"max_grad_norm": 0.5 if clip else 0.0},
        runtime={
            "device": "cpu",
            "optimizer_actors": 2,
            "optimizer_threads": 1,
            "max_restarts": 1000,
            **runtime,
        },
    )


@dataclass
class Reference:
    losses: list[float]
    tensors: dict[RecordKind, list[torch.Tensor]]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Reference]:
    """Uninterrupted runs, with exact clipping (gradient log) and without (optimizer overlapping backward).

    Run in process with one torch thread - what each Ray actor gets - they are bit-identical to runs
    through Ray actors (test_resume compares Ray runs with each other) and take seconds, not a cluster."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for clip in (True, False):
            cfg = fault_config(tmp_path_factory.mktemp(f"reference-{clip}"), clip)
            train(cfg, executor="local")
            out[clip] = Reference(losses(cfg), {k: load_unit_tensors(cfg, k) for k in KINDS})
    finally:
        torch.set_num_threads(threads)
    return out


def losses(cfg: RunConfig) -> list[float]:
    lines = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_identical(cfg: RunConfig, ref: Reference) -> None:
    for kind in KINDS:
        for unit, (ours, theirs) in enumerate(
            zip(load_unit_tensors(cfg, kind), ref.tensors[kind], strict=True)
        ):
            assert torch.equal(ours, theirs), f"unit {unit} {kind.value} differs from the uninterrupted run"
    assert losses(cfg) == ref.losses, "the losses differ from the uninterrupted run"


def assert_no_leaks(cfg: RunConfig) -> None:
    """Only the committed records, the manifest and the lock file are left; no actor process survives."""
    store = Path(cfg.ssd.paths[0]) / STORE_DIR
    manifest = json.loads((store / MANIFEST).read_text())
    named = {
        f"{r['name']}.v{r['version']:08d}.s{k}" for r in manifest["records"] for k in range(len(r["stripes"]))
    }
    assert {f.name for f in store.iterdir()} == named | {MANIFEST, LOCK}, "leftover files in the store"
    assert not (store / JOURNAL).exists()
    assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()


def run_with_faults(cfg: RunConfig, plan: list[tuple[str, str]], seed: int, **kw: Any) -> FaultInjector:
    with FaultInjector(Path(cfg.run_dir) / "metrics.jsonl", plan, seed=seed, **kw) as injector:
        result = train(cfg, executor="ray")
    assert result.final_step == cfg.steps
    return injector


def report(name: str, injector: FaultInjector) -> None:
    kinds = ", ".join(f"{k.kind}{'.' + k.method if k.method else ''}" for k in injector.kills)
    print(f"\n[faults] {name}: {len(injector.kills)} injected, {len(injector.kills)} survived ({kinds})")


def test_kills_of_every_actor_kind(tmp_path: Path, references: dict[bool, Reference]) -> None:
    """Kills at random points, and while an actor runs the call where a crash hurts most: a unit's
    publication, the commit, an optimizer update, a backward pass, a write, a gradient leaving the device."""
    cfg = fault_config(tmp_path, clip=True)
    plan = [
        ("gpu", ""),
        ("ssd", "publish"),
        ("opt", ""),
        ("ssd", ""),
        ("gpu", "backward"),
        ("opt", "update"),
        ("ssd", "commit"),
        ("gpu", ""),
        ("ssd", "write"),
        ("opt", ""),
        ("gpu", "emit_grad"),
        ("ssd", "read"),
    ]
    injector = run_with_faults(cfg, plan, seed=1)
    report("kills, exact clipping", injector)
    assert len(injector.kills) >= 11, injector.missed
    assert {k.kind for k in injector.kills} == {"gpu", "ssd", "opt"}
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def test_kills_with_the_optimizer_overlapping_backward(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    """Without clipping, units are updated and published during backward: kills then leave a step partly
    applied, which the replay must finish without updating any unit twice."""
    cfg = fault_config(tmp_path, clip=False)
    plan = [(kind, method) for kind, method in (("opt", "update"), ("ssd", "publish"), ("gpu", ""))] * 3
    plan += [("ssd", ""), ("opt", ""), ("gpu", "backward")]
    injector = run_with_faults(cfg, plan, seed=2)
    report("kills, overlapped optimizer", injector)
    assert len(injector.kills) >= 11, injector.missed
    assert_identical(cfg, references[False])
    assert_no_leaks(cfg)


def test_hung_actors_are_restarted(tmp_path: Path, references: dict[bool, Reference]) -> None:
    """SIGSTOP freezes an actor without killing it; the step's watchdog notices, restarts it, replays."""
    cfg = fault_config(tmp_path, clip=True, hang_timeout_s=2.0)
    injector = run_with_faults(cfg, [("gpu", ""), ("ssd", "")], seed=4, sig=signal.SIGSTOP)
    report("hung actors", injector)
    assert len(injector.kills) == 2
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def test_restart_limit_stops_with_a_clear_error_then_resumes(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    cfg = fault_config(tmp_path, clip=True, max_restarts=2)
    with (
        FaultInjector(Path(cfg.run_dir) / "metrics.jsonl", [("gpu", ""), ("opt", ""), ("ssd", "")], seed=5),
        pytest.raises(RestartLimitError) as info,
    ):
        train(cfg, executor="ray")
    message = str(info.value)
    assert "3 actor restarts" in message and "runtime.max_restarts = 2" in message
    assert "re-run to resume" in message
    assert_no_leaks(cfg)  # stopped cleanly: nothing staged, no actor left
    # The committed state is intact: a re-run (with a higher limit) finishes bit-identically.
    train(fault_config(tmp_path, clip=True), executor="ray")
    print("\n[faults] restart limit: 3 injected, 3 survived (the run stopped cleanly and resumed)")
    assert_identical(cfg, references[True])


def test_driver_killed_and_resubmitted(
    tmp_path: Path, references: dict[bool, Reference], ray_cluster: Any
) -> None:
    """kill -9 of the driver (the job's entry point) at random points; each re-submitted driver resumes,
    removes the dead one's /dev/shm segments and staged files, and the last one finishes the run."""
    cfg = fault_config(tmp_path, clip=True)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    command = [sys.executable, "-m", "fuyou_ray", "train", str(config_file)]
    kills, stale = 0, set()
    for target in (3, 7, 11):
        before = fuyou_shm_segments()
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            reached = lambda t=target, p=proc: committed(metrics) >= t or p.poll() is not None  # noqa: E731
            done = wait_until(reached, 180, 0.01)
            assert done and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05 * kills)  # vary the point inside the step
            proc.kill()
        finally:
            proc.wait()
        kills += 1
        # Its actors die with it (Ray kills the actors of a dead job)...
        assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()
        stale |= {s for s in fuyou_shm_segments() - before if f"-{proc.pid}-" in s}
    assert stale, "a killed driver leaves its ring segments until the next start"
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert "done: committed step" in final.stdout
    # ...and the next start removed the segments the killed drivers left.
    assert not stale & fuyou_shm_segments()
    print(f"\n[faults] driver kills: {kills} injected, {kills} survived (re-submitted)")
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def committed(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except OSError:
        return 0
