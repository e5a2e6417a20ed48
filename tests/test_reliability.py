"""Bad input and bad environment, NaN policies, checkpoints, cleanup on every exit path, and security.

Each failure must stop with one clear error naming the problem, leave committed state intact, and let a
re-run resume to the weights an undisturbed run reaches. Most cases run in process (LocalExecutor): the
failure paths are the same code as through Ray; the Ray-specific ones live in test_faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import fuyou_ray.driver as driver_mod
import fuyou_ray.store as store_mod
from fuyou_ray import checkpoint
from fuyou_ray.config import ConfigError, RunConfig
from fuyou_ray.driver import train
from fuyou_ray.errors import NonFiniteStepError, RestartLimitError, RunStateError, SnapshotError
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.journal import Journal
from fuyou_ray.records import RecordKind
from fuyou_ray.store import JOURNAL, LOCK, MANIFEST, STORE_DIR, SSDTensorStore, StoreFullError, StorePathError
from fuyou_ray.supervisor import RestartBudget
from tests.conftest import REPO, fuyou_shm_segments, tiny_config
from tests.faults import fuyou_actor_processes, wait_until

KINDS = (RecordKind.PARAM, RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fuyou_ray", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tensors(cfg: RunConfig) -> dict[RecordKind, list[torch.Tensor]]:
    return {k: load_unit_tensors(cfg, k) for k in KINDS}


def same(a: dict[RecordKind, list[torch.Tensor]], b: dict[RecordKind, list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for k in KINDS for x, y in zip(a[k], b[k], strict=True))


def store_listing(cfg: RunConfig) -> set[str]:
    return {f.name for p in cfg.ssd.paths for f in (Path(p) / STORE_DIR).iterdir()}


def only_durable_files(cfg: RunConfig) -> bool:
    """The store holds only what its manifest and journal name: no staged file of an abandoned attempt.
    (A step interrupted after some units were published keeps those, with the journal naming them.)"""
    store = Path(cfg.ssd.paths[0]) / STORE_DIR
    records = json.loads((store / MANIFEST).read_text())["records"]
    for entry in Journal(store / JOURNAL).load():
        records += entry["records"]
    named = {f"{r['name']}.v{r['version']:08d}.s{k}" for r in records for k in range(len(r["stripes"]))}
    extra = {JOURNAL} if (store / JOURNAL).exists() else set()
    left = store_listing(cfg) - (named | {MANIFEST, LOCK} | extra)
    assert not left, f"files no manifest or journal names: {sorted(left)}"
    return True


def committed_state(cfg: RunConfig) -> dict[str, str]:
    """Hashes of every file in the SSD directories and of metrics.jsonl."""
    files = [p for d in cfg.ssd.paths for p in Path(d).rglob("*") if p.is_file()]
    files.append(Path(cfg.run_dir) / "metrics.jsonl")
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.fixture
def at_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """{'step': the 0-based step the driver is running}, to trigger faults inside a chosen step."""
    current = {"step": -1}
    real = driver_mod.learning_rate

    def spy(cfg: Any, step: int, total: int) -> float:
        current["step"] = step
        return real(cfg, step, total)

    monkeypatch.setattr(driver_mod, "learning_rate", spy)
    yield current


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[RecordKind, list[torch.Tensor]]:
    cfg = tiny_config(tmp_path_factory.mktemp("reference"), steps=4)
    train(cfg, executor="local")
    return tensors(cfg)


# ------------------------------------------------------------------------------------ bad environment


def test_disk_full_mid_step_fails_cleanly_and_resumes(
    tmp_path: Path, at_step: dict[str, int], monkeypatch: pytest.MonkeyPatch, reference: Any
) -> None:
    cfg = tiny_config(tmp_path, steps=4)
    real = os.posix_fallocate

    def full_in_step_3(fd: int, offset: int, length: int) -> None:
        if at_step["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(store_mod.os, "posix_fallocate", full_in_step_3)
    with pytest.raises(StoreFullError, match="Committed state is intact"):
        train(cfg, executor="local")
    check = SSDTensorStore(cfg.ssd.paths)
    try:
        assert check.committed_step == 2 and check.pending is None
    finally:
        check.close()
    assert only_durable_files(cfg), "the failed step left files behind"
    monkeypatch.setattr(store_mod.os, "posix_fallocate", real)  # space was freed
    assert train(cfg, executor="local").final_step == 4
    assert same(tensors(cfg), reference)


def test_a_step_is_refused_when_the_ssd_lacks_room_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, steps=3)
    train(cfg, executor="local", stop_after=1)
    before = committed_state(cfg)
    monkeypatch.setattr(SSDTensorStore, "free_bytes", lambda self: 1000)
    with pytest.raises(StoreFullError, match=r"1000 B free, but the next step needs .* resume from step 1"):
        train(cfg, executor="local")
    assert committed_state(cfg) == before


def test_ssd_directory_removed_mid_run(
    tmp_path: Path, at_step: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, steps=4)
    real = driver_mod.step_key

    def remove_in_step_3(inputs: Any) -> str:
        if inputs.step == 2:
            while Path(cfg.ssd.paths[0]).exists():  # the store may be unlinking old files meanwhile
                shutil.rmtree(cfg.ssd.paths[0], ignore_errors=True)
        return real(inputs)

    monkeypatch.setattr(driver_mod, "step_key", remove_in_step_3)
    with pytest.raises(StorePathError, match="was the SSD directory removed"):
        train(cfg, executor="local")
    monkeypatch.undo()
    # A re-run does not silently start a new model in the emptied directory.
    with pytest.raises(RunStateError, match=r"store .* is empty: was the SSD directory removed"):
        train(cfg, executor="local")


def test_a_manifest_of_another_model_is_refused_and_nothing_is_lost(tmp_path: Path, reference: Any) -> None:
    """The store's manifest replaced by one of another model (fewer layers): the run is refused before
    anything opens the store - opening it would delete the records that manifest does not name, i.e. this
    run's own - and once the right manifest is back it resumes to the weights of an undisturbed run."""
    cfg = tiny_config(tmp_path / "a", steps=4)
    other = tiny_config(tmp_path / "b", steps=4, model={"n_layer": 1})
    train(cfg, executor="local", stop_after=2)
    train(other, executor="local", stop_after=2)
    manifest = Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST
    ours = manifest.read_bytes()
    shutil.copy(Path(other.ssd.paths[0]) / STORE_DIR / MANIFEST, manifest)
    before = committed_state(cfg)
    with pytest.raises(RunStateError, match=r"holds a different model .*'n_layer': 1"):
        train(cfg, executor="local")
    assert committed_state(cfg) == before, "a refused start changed the SSD directory"
    manifest.write_bytes(ours)
    assert train(cfg, executor="local").start_step == 2
    assert same(tensors(cfg), reference)


def test_dev_shm_too_small_for_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/dev/shm with less room than the ring: exit code 3, one line saying how much the ring needs and
    how to get it, nothing committed touched; the run resumes once there is room."""
    import fuyou_ray.ring as ring_mod
    from fuyou_ray.cli import main
    from fuyou_ray.models import ModelSpec
    from fuyou_ray.plan import make_plan

    cfg = tiny_config(tmp_path, steps=3)
    train(cfg, executor="local", stop_after=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    plan = make_plan(cfg, ModelSpec(cfg.model))
    needed = ring_mod.make_spec(plan.slot_bytes, plan.num_slots).total_bytes
    before = committed_state(cfg)
    monkeypatch.setattr(ring_mod, "_shm_free_bytes", lambda: needed // 2)
    capsys.readouterr()
    assert main(["train", str(config), "--executor", "local"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuyou-ray: error: /dev/shm has"), err
    assert f"the ring needs {needed / 2**20:.0f} MiB" in err[0], err
    assert "docker --shm-size" in err[0] and "budgets.cpu_mem" in err[0], err
    assert committed_state(cfg) == before
    monkeypatch.undo()
    assert main(["train", str(config), "--executor", "local"]) == 0
    assert train(cfg, executor="local").final_step == 3


def test_corrupted_record_is_named_and_never_trained_on(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, steps=3)
    train(cfg, executor="local", stop_after=2)
    store = SSDTensorStore(cfg.ssd.paths)
    rec = store.record("u00001.master")
    path = store.dirs[rec.stripes[0].directory] / rec.file_name(0)
    store.close()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x10
    path.write_bytes(bytes(raw))
    corrupted = path.read_bytes()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    manifest = (Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST).read_bytes()
    metrics = (Path(cfg.run_dir) / "metrics.jsonl").read_bytes()
    proc = cli("train", str(config), "--executor", "local", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fuyou-ray: error:")]
    assert len(errors) == 1 and "u00001.master v2" in errors[0] and "corrupted on disk" in errors[0]
    assert "restore a checkpoint" in errors[0]
    # Step 2 stays the committed step; units of step 3 updated before the corrupted one was reached stay
    # published (a resume finishes the step once the record is restored); nothing else is left behind.
    assert (Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST).read_bytes() == manifest
    assert (Path(cfg.run_dir) / "metrics.jsonl").read_bytes() == metrics
    assert path.read_bytes() == corrupted
    store = SSDTensorStore(cfg.ssd.paths)
    try:
        assert store.committed_step == 2
        pending = store.pending
        assert pending is None or not any(n.startswith("u00001.") for n in pending.records)
        referenced = {(r.name, r.version) for r in store.manifest.records.values()}
        if pending:
            referenced |= {(r.name, r.version) for r in pending.records.values()}
    finally:
        store.close()
    on_disk = {f for f in store_listing(cfg) if f.startswith("u")}
    assert on_disk <= {f"{n}.v{v:08d}.s0" for n, v in referenced}, "staged files were left behind"


def test_truncated_safetensors_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fuyou_ray.safetensors_io import CheckpointError, CheckpointReader

    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        reader = CheckpointReader(tmp_path)
        reader.read_into("w", torch.empty(4096))
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        CheckpointReader(tmp_path)


def test_truncated_safetensors_is_refused_at_import_before_anything_is_written(tmp_path: Path) -> None:
    from fuyou_ray.hf import import_checkpoint
    from fuyou_ray.safetensors_io import CheckpointError
    from tests.hf_testlib import save_tiny_model

    save_tiny_model("llama", tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])  # a download cut short: the last tensors' bytes are missing
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.[\w.]+'"):
        import_checkpoint(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run").exists(), "a refused import created the run"


# ------------------------------------------------------------------------------------ NaN / inf


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """0-based steps whose loss is made NaN (inside the compute actor, as a real overflow would be). The
    step is the one whose batch the compute actor holds: with lookahead a step's head runs while the
    driver is still in the step before."""
    import actors.gpu_compute as gpu

    steps: set[int] = set()
    real_loss, real_head = gpu.lm_loss, gpu.GPUComputeActor.head
    holds = {"step": -1}

    def head(self: gpu.GPUComputeActor, *args: Any) -> int:
        holds["step"] = self.step
        return real_head(self, *args)

    def loss(*args: Any) -> torch.Tensor:
        value = real_loss(*args)
        return value * math.nan if holds["step"] in steps else value

    monkeypatch.setattr(gpu.GPUComputeActor, "head", head)
    monkeypatch.setattr(gpu, "lm_loss", loss)
    return steps


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_nonfinite_step_stops_without_writing_nan(tmp_path: Path, poison: set[int], clip: float) -> None:
    cfg = tiny_config(tmp_path, steps=4, optimizer={"max_grad_norm": clip})
    poison.add(2)
    with pytest.raises(NonFiniteStepError, match="non-finite"):
        train(cfg, executor="local")
    store = SSDTensorStore(cfg.ssd.paths)
    try:
        assert store.committed_step == 2 and store.pending is None
    finally:
        store.close()
    assert only_durable_files(cfg)
    assert all(torch.isfinite(t).all() for ts in tensors(cfg).values() for t in ts)
    assert len((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()) == 2


def test_nonfinite_step_is_skipped_when_configured(tmp_path: Path, poison: set[int]) -> None:
    cfg = tiny_config(tmp_path, steps=4, runtime={"device": "cpu", "on_nonfinite": "skip"})
    poison.add(2)
    train(cfg, executor="local", stop_after=2)
    before = tensors(cfg)
    result = train(cfg, executor="local", stop_after=3)
    assert math.isnan(result.steps[0].loss)
    assert same(tensors(cfg), before), "a skipped step changed the state"
    meta = json.loads((Path(cfg.ssd.paths[0]) / STORE_DIR / MANIFEST).read_text())["meta"]
    assert "skipped" in meta
    assert train(cfg, executor="local").final_step == 4


def test_too_many_nonfinite_steps_in_a_row_stop(tmp_path: Path, poison: set[int]) -> None:
    cfg = tiny_config(tmp_path, steps=8, runtime={"device": "cpu", "on_nonfinite": "skip"})
    poison.update(range(1, 8))
    with pytest.raises(NonFiniteStepError, match="4 non-finite steps in a row"):
        train(cfg, executor="local")


def test_skip_needs_clipping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.on_nonfinite.*max_grad_norm"):
        tiny_config(tmp_path, optimizer={"max_grad_norm": 0.0}, runtime={"on_nonfinite": "skip"})


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_keep_last_n_and_restore_bit_identically(tmp_path: Path, reference: Any) -> None:
    cfg = tiny_config(tmp_path, steps=4, checkpoint={"every": 1, "keep": 2})
    train(cfg, executor="local")
    assert same(tensors(cfg), reference)
    infos = checkpoint.list_checkpoints(cfg.ssd.paths)
    assert [i.step for i in infos] == [3, 4]
    assert infos[0].data_step == 3 and infos[0].fingerprint
    # Hard links: the newest checkpoint shares every file with the store.
    ckpt = checkpoint.checkpoint_dirs(cfg.ssd.paths, "step-00000004")[0]
    assert all(f.stat().st_nlink >= 2 for f in ckpt.iterdir() if f.name.startswith("u"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    listed = cli("checkpoint", cfg.run_dir, "--list", cwd=tmp_path)
    assert listed.returncode == 0 and [c["name"] for c in json.loads(listed.stdout)] == [
        "step-00000003",
        "step-00000004",
    ]
    restored = cli("checkpoint", cfg.run_dir, "--restore", "step-00000003", cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "resumes from step 3" in restored.stdout
    assert len((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()) == 3
    again = train(cfg, executor="local")
    assert (again.start_step, again.final_step) == (3, 4)
    assert same(tensors(cfg), reference)
    # `fuyou-ray checkpoint RUN` of the stopped run, keeping one.
    took = cli("checkpoint", cfg.run_dir, "--keep", "1", cwd=tmp_path)
    assert took.returncode == 0, took.stderr
    assert [i.name for i in checkpoint.list_checkpoints(cfg.ssd.paths)] == ["step-00000004"]


def test_checkpoint_restore_refusals(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "a", steps=2, checkpoint={"every": 2})
    train(cfg, executor="local")
    with pytest.raises(SnapshotError, match="not a checkpoint name"):
        checkpoint.restore(cfg.ssd.paths, "../../etc")
    with pytest.raises(SnapshotError, match="no checkpoint step-00000009"):
        checkpoint.restore(cfg.ssd.paths, "step-00000009")
    # A checkpoint of another model.
    other = tiny_config(tmp_path / "b", steps=2, checkpoint={"every": 2}, model={"d_model": 64, "n_head": 2})
    train(other, executor="local")
    shutil.rmtree(Path(cfg.ssd.paths[0]) / checkpoint.CHECKPOINT_DIR)
    shutil.copytree(
        Path(other.ssd.paths[0]) / checkpoint.CHECKPOINT_DIR,
        Path(cfg.ssd.paths[0]) / checkpoint.CHECKPOINT_DIR,
    )
    with pytest.raises(SnapshotError, match="another model"):
        checkpoint.restore(cfg.ssd.paths, "latest")
    # Not while a run (anyone holding the store) is using it.
    held = SSDTensorStore(other.ssd.paths)
    try:
        with pytest.raises(store_mod.StoreBusyError, match="in use by another process"):
            checkpoint.restore(other.ssd.paths, "latest")
    finally:
        held.close()


# ------------------------------------------------------------------------------------ supervision


def test_restart_budget_counts_a_sliding_window() -> None:
    now = [0.0]
    budget = RestartBudget(limit=2, window_s=60, clock=lambda: now[0])
    budget.record(["gpu"], "killed", committed=3)
    now[0] = 30
    budget.record(["ssd"], "killed", committed=3)
    now[0] = 61  # the first one left the window
    budget.record(["gpu"], "killed", committed=4)
    with pytest.raises(RestartLimitError, match=r"3 actor restarts in the last 1 min \(gpu x2, ssd x1\)"):
        budget.record(["gpu"], "segfault", committed=4)


# ------------------------------------------------------------------------------------ cleanup


def interrupt_run(
    config: Path, metrics: Path, env: dict[str, str], sig: int, executor: str
) -> tuple[int, str, int]:
    """Start `fuyou-ray train`, send `sig` once this run has committed a step, and return (exit code,
    stderr, pid). The exit code is -1 when the run finished every step before the signal landed (on 2
    loaded cores the tiny run can outrun it): the caller starts over rather than test nothing."""

    def committed() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    before, steps = committed(), yaml.safe_load(config.read_text())["steps"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuyou_ray", "train", str(config), "--executor", executor],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reached = wait_until(lambda: committed() > before or proc.poll() is not None, 180, 0.01)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert reached, err
    if proc.returncode != 130 and committed() >= steps:
        return -1, err, proc.pid
    return proc.returncode, err, proc.pid


def test_ctrl_c_and_sigterm_clean_up_and_resume(tmp_path: Path, ray_cluster: Any, reference: Any) -> None:
    """SIGINT (Ctrl-C) in process, SIGTERM (what `ray job stop` sends) through Ray actors: both exit with
    code 130, leave no /dev/shm segment, staged file, journal or actor, and the run resumes."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address}
    for attempt in range(3):
        cfg = tiny_config(tmp_path / f"attempt{attempt}", steps=4)
        config = tmp_path / f"config{attempt}.yaml"
        config.write_text(yaml.safe_dump(cfg.to_dict()))
        metrics = Path(cfg.run_dir) / "metrics.jsonl"
        outran = False
        for sig, executor in ((signal.SIGINT, "local"), (signal.SIGTERM, "ray")):
            code, err, pid = interrupt_run(config, metrics, env, sig, executor)
            if code == -1:
                outran = True
                break
            assert code == 130, err
            assert "resumes from its last committed step" in err
            assert not {s for s in fuyou_shm_segments() if f"-{pid}-" in s}, "ring segments left behind"
            assert only_durable_files(cfg), store_listing(cfg)
            assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()
        if not outran:
            break
    else:
        pytest.fail("the run finished before the signal three times: it is too fast to interrupt")
    assert train(cfg, executor="local").final_step == 4
    assert same(tensors(cfg), reference)


# ------------------------------------------------------------------------------------ security


def test_no_pickle_of_user_files() -> None:
    """Weights and state load through safetensors, JSON and YAML only: no pickle anywhere in the package."""
    offenders = []
    for path in list((REPO / "fuyou_ray").rglob("*.py")) + list((REPO / "actors").rglob("*.py")):
        text = path.read_text()
        for needle in ("import pickle", "pickle.load", "cloudpickle.load", "allow_pickle=True", "yaml.load("):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders


def test_ssd_path_at_a_filesystem_root_is_refused() -> None:
    with pytest.raises(StorePathError, match="filesystem root"):
        store_mod.check_ssd_path("/")


def test_local_cluster_keeps_the_dashboard_off_or_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    seen: dict[str, Any] = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    driver_mod.connect_ray(tiny_config(Path("/tmp")))
    assert seen["include_dashboard"] is False or seen.get("dashboard_host") == "127.0.0.1"
    assert seen.get("dashboard_host") == "127.0.0.1"
