"""Shared fixtures: one local Ray cluster per test session, tiny configs, and a /dev/shm leak check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuyou_ray.config import RunConfig, config_from_dict

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp: Path, **sections: Any) -> RunConfig:
    """A small GPT run writing under `tmp`; keyword args override whole sections or top-level keys."""
    tree: dict[str, Any] = {
        "run_dir": str(tmp / "run"),
        "steps": 4,
        "seed": 0,
        "model": {"vocab_size": 256, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.1},
        "batch": {"global_batch": 8, "micro_batch": 4, "seq_len": 32},
        "budgets": {"gpu_mem": "1GiB", "cpu_mem": "16MiB"},
        "ssd": {"paths": [str(tmp / "ssd")]},
        # The host cache (runtime.cpu_cache: auto, the default) has its own suite, tests/test_cache.py; the
        # others test the SSD path they were written for (steps that read and write the SSD).
        "runtime": {"device": "cpu", "optimizer_actors": 2, "optimizer_threads": 1, "cpu_cache": "off"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return config_from_dict(tree)


def fuyou_shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("fuyou-*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster shared by the session's tests (2 cores: start it once)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _owner_gone_or_us(segment: str) -> bool:
    """Segments are named fuyou-ring-<pid>-...: a leak is one of ours, or one whose creator has died.
    (Segments of other live processes - a concurrent test session - are not this test's business.)"""
    try:
        pid = int(segment.split("-")[2])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@pytest.fixture(autouse=True)
def no_shm_leaks() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it."""
    before = fuyou_shm_segments()
    yield
    leaked = {s for s in fuyou_shm_segments() - before if _owner_gone_or_us(s)}
    assert not leaked, f"test left shared-memory segments behind: {sorted(leaked)}"
