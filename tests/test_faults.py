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
import threading
import time
from collections.abc import Callable
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
from fuyou_ray.journal import Journal, StoreLock
from fuyou_ray.records import RecordKind
from fuyou_ray.store import JOURNAL, LOCK, MANIFEST, STORE_DIR, ManifestError, SSDTensorStore
from tests.conftest import REPO, fuyou_shm_segments, tiny_config
from tests.faults import (
    FaultInjector,
    actor_pids,
    all_actors_up,
    fuyou_actor_processes,
    kill_first,
    opening_store,
    starting,
    title,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

STEPS = 36  # long enough for a dozen kills, each waiting for the previous restart (tiny steps take
# ~0.05 s: at 18, a run could end 3 kills in, its steps outrunning the pause before each kill)
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


def assert_no_leaks(cfg: RunConfig, stopped_mid_step: bool = False) -> None:
    """Only the committed records, the manifest and the lock file are left; no actor process survives.
    A run that stopped mid-step may also hold the units that step published (its journal names them: they
    are durable, and the resumed run skips them); their committed state is gone then, their committed
    params stay until the commit (a replay reads them)."""
    store = Path(cfg.ssd.paths[0]) / STORE_DIR
    records = json.loads((store / MANIFEST).read_text())["records"]
    allowed = {MANIFEST, LOCK}
    if stopped_mid_step and (store / JOURNAL).exists():
        allowed.add(JOURNAL)
        published = [r for entry in Journal(store / JOURNAL).load() for r in entry["records"]]
        superseded = {r["name"] for r in published if not r["name"].endswith(".param")}
        records = [*(r for r in records if r["name"] not in superseded), *published]
    named = {f"{r['name']}.v{r['version']:08d}.s{k}" for r in records for k in range(len(r["stripes"]))}
    assert {f.name for f in store.iterdir()} == named | allowed, "leftover files in the store"
    if not stopped_mid_step:
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
        ("ssd", "write"),
        ("gpu", "emit_grad"),
        ("ssd", "read"),
        # the next step's forward, run ahead during the optimizer (lookahead)
        ("gpu", "forward"),
    ]
    injector = run_with_faults(cfg, plan, seed=1)
    report("kills, exact clipping", injector)
    assert len(injector.kills) >= 10, injector.missed
    assert {k.kind for k in injector.kills} == {"gpu", "ssd", "opt"}
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def test_kills_with_the_optimizer_overlapping_backward(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    """Without clipping, units are updated and published during backward: kills then leave a step partly
    applied, which the replay must finish without updating any unit twice."""
    cfg = fault_config(tmp_path, clip=False)
    plan = [(kind, method) for kind, method in (("opt", "update"), ("ssd", "publish"), ("gpu", ""))] * 2
    plan += [("ssd", ""), ("opt", ""), ("gpu", "backward"), ("gpu", "")]
    injector = run_with_faults(cfg, plan, seed=2)
    report("kills, overlapped optimizer", injector)
    assert len(injector.kills) >= 8, injector.missed
    assert_identical(cfg, references[False])
    assert_no_leaks(cfg)


def test_kills_of_the_gpu_actor_with_block_inputs_parked(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    """Both blocks' inputs wait for the backward in the compute actor's host arena (fuyou_ray/activations.py):
    a kill in a forward, a backward or the next step's forward run ahead takes them with the actor, and
    the replay parks them again, bit for bit as an uninterrupted run without parking."""
    cfg = fault_config(tmp_path, clip=True, park_block_inputs=2)
    plan = [("gpu", "forward"), ("gpu", "backward"), ("gpu", ""), ("gpu", "backward"), ("gpu", "forward")]
    injector = run_with_faults(cfg, plan, seed=4)
    report("kills, block inputs parked", injector)
    assert len(injector.kills) >= 4, injector.missed
    assert_identical(cfg, references[True])
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
    assert_no_leaks(cfg, stopped_mid_step=True)  # stopped cleanly: nothing staged, no actor left
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


# ------------------------------------------------------------------------------ failures while starting
# An actor's constructor maps the ring and, for the SSD actor, opens the store. The tests hold the store's
# lock (as a second process would) to keep a starting SSD actor inside the store's opening, and kill it
# there: at the run's start, and while it restarts after a kill mid-run.


def store_lock(cfg: RunConfig) -> StoreLock:
    store = Path(cfg.ssd.paths[0]) / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return StoreLock(store / LOCK)


def running(kind: str) -> list[int]:
    """Actor processes of `kind` that are up (not in their constructor)."""
    return [p for p in actor_pids(kind) if title(p) and "__init__" not in title(p)]


def in_background(work: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_actors_killed_while_starting_and_opening_the_store(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    """kill -9 of the SSD actor while it opens the store (at the run's start, and while it restarts after a
    kill mid-run) and of GPU compute and an optimizer while their restart constructs them: each is
    restarted, re-attached to the ring and the store, and the run ends bit-identical."""
    cfg = fault_config(tmp_path, clip=True)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    lock = store_lock(cfg)
    lock.acquire(5)  # the SSD actor will wait for it inside the store's opening
    kills: list[str] = []

    def inject() -> None:
        for _ in range(2):
            kill_first(lambda: opening_store(lock.path))
            kills.append("ssd opening the store at start")
        lock.release()
        assert wait_until(lambda: committed(metrics) >= 3, 120, 0.05)
        kill_first(lambda: running("ssd"))
        kills.append("ssd mid-run")
        lock.acquire(60)  # before the restarted actor (still importing torch) gets to the store
        kill_first(lambda: opening_store(lock.path))
        kills.append("ssd reopening the store")
        assert wait_until(lambda: bool(opening_store(lock.path)), 60, 0.05)
        lock.release()
        for kind in ("gpu", "opt"):
            target = committed(metrics) + 1
            assert wait_until(lambda t=target: committed(metrics) >= t and all_actors_up(), 120, 0.05)
            kill_first(lambda k=kind: running(k))
            kill_first(lambda k=kind: starting(k))
            kills.extend([f"{kind} mid-run", f"{kind} restarting"])

    thread, errors = in_background(inject)
    try:
        result = train(cfg, executor="ray")
    finally:
        thread.join(timeout=120)
        lock.release()
    assert not errors, errors
    assert result.final_step == cfg.steps
    n = len(kills)
    print(f"\n[faults] kills while starting: {n} injected, {n} survived ({', '.join(kills)})")
    assert len(kills) == 8
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def test_an_actor_that_keeps_dying_while_starting_stops_the_run(tmp_path: Path) -> None:
    """An actor that dies in its constructor every time is not restarted forever: past runtime.max_restarts
    the run stops with RestartLimitError naming it - at the start and while recovering mid-run - with the
    committed state intact."""
    cfg = fault_config(tmp_path, clip=True, steps=6, max_restarts=1)
    lock = store_lock(cfg)
    lock.acquire(5)

    def keep_killing() -> None:
        for _ in range(2):
            kill_first(lambda: opening_store(lock.path))

    thread, errors = in_background(keep_killing)
    try:
        with pytest.raises(RestartLimitError) as info:
            train(cfg, executor="ray")
    finally:
        thread.join(timeout=60)
        lock.release()
    assert not errors, errors
    message = str(info.value)
    assert "2 actor restarts while starting the run (fuyou:ssd-io)" in message, message
    assert "runtime.max_restarts = 1" in message
    assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()

    # Mid-run: killed once, then again while it reopens the store.
    metrics = Path(cfg.run_dir) / "metrics.jsonl"

    def kill_mid_run_then_while_restarting() -> None:
        assert wait_until(lambda: committed(metrics) >= 2, 120, 0.05)
        kill_first(lambda: running("ssd"))
        lock.acquire(60)
        kill_first(lambda: opening_store(lock.path))

    thread, errors = in_background(kill_mid_run_then_while_restarting)
    try:
        with pytest.raises(RestartLimitError) as info:
            train(cfg, executor="ray")
    finally:
        thread.join(timeout=60)
        lock.release()
    assert not errors, errors
    message = str(info.value)
    assert "2 actor restarts in the last" in message and "(ssd x2)" in message, message
    assert "ssd died again while restarting" in message and "re-run to resume" in message, message
    # Committed state intact: the store opens at the step metrics.jsonl records, with nothing staged.
    store = SSDTensorStore(cfg.ssd.paths)
    try:
        assert store.committed_step == committed(metrics) >= 2
    finally:
        store.close()
    assert_no_leaks(cfg)


def test_a_failing_constructor_stops_the_run_with_its_own_error(
    tmp_path: Path, references: dict[bool, Reference]
) -> None:
    """A constructor that raises (here: the SSD actor finds the store's manifest torn) is not restarted: the
    run stops with the actor's error under its own name (ManifestError, exit code 4), at the start and
    when it happens in a restart mid-run; once the manifest is back, a re-run finishes bit-identically."""
    cfg = fault_config(tmp_path, clip=True)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    manifest = Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST
    lock = store_lock(cfg)
    good: list[bytes] = []

    def tear_manifest_while_restarting() -> None:
        assert wait_until(lambda: committed(metrics) >= 4, 120, 0.05)
        kill_first(lambda: running("ssd"))
        lock.acquire(60)
        good.append(manifest.read_bytes())
        manifest.write_bytes(good[0][: len(good[0]) // 2])
        lock.release()

    thread, errors = in_background(tear_manifest_while_restarting)
    try:
        with pytest.raises(ManifestError) as info:
            train(cfg, executor="ray")
    finally:
        thread.join(timeout=60)
        lock.release()
    assert not errors, errors
    assert "fuyou:ssd-io could not be restarted" in str(info.value), info.value
    assert "unreadable manifest" in str(info.value)
    assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()

    # At the start, the same error (no restart loop, no hang).
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=r"fuyou:ssd-io could not start: .*unreadable manifest"):
        train(cfg, executor="ray")
    assert time.monotonic() - t0 < 60
    manifest.write_bytes(good[0])
    train(cfg, executor="ray")
    assert_identical(cfg, references[True])
    assert_no_leaks(cfg)


def ranged_config(tmp: Path) -> RunConfig:
    """A block of 2.4 M params (d_model 448) updated in optimizer ranges of 1 Mi elements: three ranges."""
    return tiny_config(
        tmp,
        steps=16,
        model={"vocab_size": 256, "n_layer": 1, "n_head": 4, "d_model": 448, "max_seq_len": 16},
        batch={"global_batch": 4, "micro_batch": 2, "seq_len": 16},
        budgets={"gpu_mem": "1GiB", "cpu_mem": "160MiB"},
        optimizer={"max_grad_norm": 0.5},
        runtime={"optimizer_actors": 2, "optimizer_threads": 1, "max_restarts": 1000, "optimizer_range": 1},
    )


def test_kills_while_a_unit_is_updated_in_optimizer_ranges(tmp_path: Path) -> None:
    """Its gradient emitted, logged and read back by range, its master weights and moments assembled range
    by range into new versions: kills in the middle leave half-assembled versions, which the replay must
    discard and write again, bit for bit as an uninterrupted run."""
    ref_cfg = ranged_config(tmp_path / "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each actor gets: the reference is then bit-identical
    try:
        assert train(ref_cfg, executor="local").plan.optimizer_range > 0
    finally:
        torch.set_num_threads(threads)
    reference = Reference(losses(ref_cfg), {k: load_unit_tensors(ref_cfg, k) for k in KINDS})
    cfg = ranged_config(tmp_path / "faults")
    plan = [
        ("ssd", "write_range"),
        ("opt", "update"),
        ("ssd", "read_range"),
        ("gpu", "emit_grad"),
        ("ssd", ""),
    ]
    injector = run_with_faults(cfg, plan, seed=3)
    report("kills, optimizer ranges", injector)
    assert len(injector.kills) >= 4, injector.missed
    assert_identical(cfg, reference)
    assert_no_leaks(cfg)
