"""Bad input gets one clear line, a non-zero exit code, and leaves committed state untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config

DEMO = str(REPO / "configs" / "demo.yaml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "fuyou_ray", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tiny_args(tmp: Path) -> list[str]:
    return [
        f"run_dir={tmp / 'run'}",
        f"ssd.paths=[{tmp / 'ssd'}]",
        "model.n_layer=2",
        "model.d_model=32",
        "model.n_head=2",
        "batch.global_batch=4",
        "batch.micro_batch=2",
        "batch.seq_len=32",
        "budgets.cpu_mem=4MiB",
        "runtime.device=cpu",
    ]


def with_sets(assignments: list[str]) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with 2 committed steps, to check that failed commands leave it exactly as it was."""
    tmp = tmp_path_factory.mktemp("committed")
    done = run_cli("train", DEMO, "--executor", "local", *with_sets([*tiny_args(tmp), "steps=2"]), cwd=tmp)
    assert done.returncode == 0, done.stderr
    assert "done: committed step 2/2" in done.stdout
    return tmp


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fuyou-ray: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_unknown_config_key(committed_run: Path) -> None:
    before = snapshot(committed_run)
    proc = run_cli(
        "train", DEMO, *with_sets([*tiny_args(committed_run), "optimizer.learning_rate=1"]), cwd=committed_run
    )
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "unknown key 'optimizer.learning_rate'" in line and "lr" in line
    assert snapshot(committed_run) == before


def test_budget_too_small_for_one_layer(committed_run: Path) -> None:
    before = snapshot(committed_run)
    proc = run_cli(
        "train", DEMO, *with_sets([*tiny_args(committed_run), "budgets.cpu_mem=64KiB"]), cwd=committed_run
    )
    assert proc.returncode == 3
    line = one_line_error(proc)
    assert "budgets.cpu_mem" in line and "too small for one layer" in line and "at least" in line
    assert snapshot(committed_run) == before


def test_ssd_path_not_writable(committed_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    fresh = tmp_path / "fresh"
    args = tiny_args(fresh)
    args[1] = f"ssd.paths=[{blocker / 'ssd'}]"
    proc = run_cli("train", DEMO, *with_sets(args), cwd=tmp_path)
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert str(blocker / "ssd") in line and "ssd.paths" in line
    assert not fresh.exists(), "a failed start must not create the run dir"


def test_resume_with_another_model_is_refused(committed_run: Path) -> None:
    before = snapshot(committed_run)
    proc = run_cli(
        "train",
        DEMO,
        "--executor",
        "local",
        *with_sets([*tiny_args(committed_run), "model.d_model=64", "steps=3"]),
        cwd=committed_run,
    )
    assert proc.returncode == 4
    assert "different model" in one_line_error(proc)
    assert snapshot(committed_run) == before


def test_help_lists_examples(tmp_path: Path) -> None:
    proc = run_cli("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "ray job submit" in proc.stdout


def test_a_store_fingerprinted_before_newer_model_fields_still_resumes(tmp_path: Path) -> None:
    """A store made by an older fuyou-ray names fewer model fields: it agrees with a config that leaves the
    newer ones at their defaults, and not with one that sets them."""
    from fuyou_ray.driver import model_fingerprint, same_model
    from fuyou_ray.models import ModelSpec
    from fuyou_ray.plan import make_plan

    cfg = tiny_config(tmp_path)
    current = model_fingerprint(cfg, make_plan(cfg, ModelSpec(cfg.model)))
    older = {
        **current,
        "model": {k: v for k, v in current["model"].items() if k not in ("n_kv_head", "head_dim")},
    }
    assert same_model(older, current)
    gqa = {**current, "model": {**current["model"], "n_kv_head": 2}}
    assert not same_model(older, gqa)
    assert not same_model(current, {**current, "seed": 1})
    assert not same_model({**current, "model": {**current["model"], "gone": 1}}, current)
