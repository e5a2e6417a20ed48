"""`ray job stop` of a running training job on a real `ray start --head` cluster: it cleans up, and the
re-submitted job resumes to the weights of a run that was never stopped.

`ray job stop` (Ray 2.60, dashboard/modules/job/job_supervisor.py) sends SIGTERM to the entrypoint and
its children, waits RAY_JOB_STOP_WAIT_TIME_S (3 s by default), then SIGKILLs what is left and marks the
job STOPPED. The driver turns SIGTERM into the same unwinding as Ctrl-C (fuyou_ray/supervisor.py
`run_guard`): the ring's segments go at once, the actors are stopped (the SSD actor drains its I/O and
deletes what the unfinished step staged first) - all inside those 3 s. The test checks each leftover the
issue names: a /dev/shm segment, a mapping of one (what a pinned registration would hold on a GPU), a
staged file in the store, a `fuyou:*` actor alive in Ray's state API; then that the committed state
reads back with valid checksums, and that re-submitting the same command resumes from the committed step
and ends bit-identical (params, master weights, Adam moments, losses) to an uninterrupted run.

The cluster is tests/test_job_flow.py's (own temp dir, ports and auth token; stopped by pid, never with
`ray stop`). The job runs the installed `fuyou-ray` without uploading a working dir: the paths are
absolute, and the upload is covered by test_job_flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import tests.test_job_flow as job_flow
from fuyou_ray.config import RunConfig
from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.journal import Journal
from fuyou_ray.records import RecordKind
from fuyou_ray.store import JOURNAL, LOCK, MANIFEST, STORE_DIR, SSDTensorStore
from tests.conftest import fuyou_shm_segments, tiny_config

pytestmark = pytest.mark.slow

STEPS = 14
STOP_AT = 1  # committed steps when `ray job stop` starts (it takes a few steps' time to start up)
KINDS = (RecordKind.PARAM, RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Ray's unix socket paths live under it (limit ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tensors(cfg: RunConfig) -> dict[RecordKind, list[torch.Tensor]]:
    return {k: load_unit_tensors(cfg, k) for k in KINDS}


def losses(cfg: RunConfig) -> list[float]:
    lines = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def committed(cfg: RunConfig) -> int:
    try:
        return len((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def staged_files(cfg: RunConfig) -> set[str]:
    """Files in the store that neither the manifest nor the journal names (a step's staged writes)."""
    store = Path(cfg.ssd.paths[0]) / STORE_DIR
    records = json.loads((store / MANIFEST).read_text())["records"]
    for entry in Journal(store / JOURNAL).load():
        records += entry["records"]
    named = {f"{r['name']}.v{r['version']:08d}.s{k}" for r in records for k in range(len(r["stripes"]))}
    return {f.name for f in store.iterdir()} - named - {MANIFEST, LOCK, JOURNAL}


def ring_mappings(pids: set[int]) -> list[str]:
    """Mappings of a fuyou ring segment in these processes (a pinned registration needs one)."""
    out = []
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        out += [f"{pid}: {line.split()[-1]}" for line in maps.splitlines() if "/dev/shm/fuyou-" in line]
    return out


class Cluster(job_flow.Cluster):
    def stop(self) -> None:
        """SIGTERM this cluster's processes, SIGKILL what is left after 2 s. (Ray's GCS and raylet take
        15 s and more to exit on SIGTERM; this cluster's state is thrown away with its temp dir.)"""
        pids = self.mine()
        for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                pids = self.mine()
                if not pids:
                    return
                time.sleep(0.1)


def test_ray_job_stop_cleans_up_and_the_resubmitted_job_resumes(short_tmp: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc and /dev/shm")
    for tool in ("ray", "fuyou-ray"):
        if not (job_flow.BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    t0 = time.monotonic()
    cfg = tiny_config(short_tmp, steps=STEPS)
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))

    # The uninterrupted run: in process with one torch thread, what each actor gets (test_faults.py).
    ref_cfg = tiny_config(short_tmp / "reference", steps=STEPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(ref_cfg, executor="local")
    finally:
        torch.set_num_threads(threads)
    reference, ref_losses = tensors(ref_cfg), losses(ref_cfg)

    shm_before = fuyou_shm_segments()
    cluster = Cluster(short_tmp)
    address = f"--address={cluster.dashboard}"

    def submit(job: str) -> None:
        r = cluster.ray(
            "job",
            "submit",
            address,
            f"--submission-id={job}",
            "--no-wait",
            "--log-color=false",
            "--",
            "fuyou-ray",
            "train",
            str(config),
        )
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"

    def job_api(path: str) -> Any:
        """GET from the job REST API (what `ray job status` / `logs` read, without a CLI's start-up)."""
        request = urllib.request.Request(
            f"{cluster.dashboard}/api/jobs/{path}",
            headers={"Authorization": f"Bearer {cluster.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def job_status(job: str) -> str:
        return str(job_api(job)["status"])

    def job_logs(job: str) -> str:
        return str(job_api(f"{job}/logs")["logs"])

    def wait_status(job: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = job_status(job)
        while status not in job_flow.TERMINAL and time.monotonic() < deadline:
            time.sleep(0.2)
            status = job_status(job)
        return status

    try:
        cluster.start()
        t_started = time.monotonic()
        first = f"fuyou-stop-{secrets.token_hex(4)}"
        submit(first)
        t_submitted = time.monotonic()
        deadline = time.monotonic() + 120
        while committed(cfg) < STOP_AT:
            assert time.monotonic() < deadline, "no progress:\n" + job_logs(first)
            assert job_status(first) not in job_flow.TERMINAL, job_logs(first)
            time.sleep(0.02)
        t_progress = time.monotonic()
        cluster.mine()  # remember the job's pids (the driver's segments carry its pid)
        t_stop = time.monotonic()
        r = cluster.ray("job", "stop", first, address, "--log-color=false", timeout=60)
        assert r.returncode == 0, f"ray job stop failed:\n{r.stdout}\n{r.stderr}"
        status = wait_status(first, 30)
        t_stopped = time.monotonic()
        logs = job_logs(first)
        assert status == "STOPPED", f"job {status}:\n{logs}"
        stopped_at = committed(cfg)
        assert STOP_AT <= stopped_at < STEPS, f"stopped at step {stopped_at}, not mid-run:\n{logs}"

        # Nothing left behind: segments, mappings, staged files, actors.
        new = fuyou_shm_segments() - shm_before
        assert not new, f"the stopped job left shared-memory segments: {sorted(new)}\n{logs}"
        assert not ring_mappings(cluster.mine()), ring_mappings(cluster.mine())
        assert not staged_files(cfg), f"staged files left in the store: {sorted(staged_files(cfg))}\n{logs}"
        alive = {n: s for n, s in cluster.list_actors().items() if n.startswith("fuyou:") and s != "DEAD"}
        assert not alive, f"actors outlived the stopped job: {alive}"
        assert "interrupted; the run resumes from its last committed step" in logs, logs

        # The committed state is intact: it opens at the step metrics.jsonl records (or the next one, when
        # the stop came between a commit and its metrics line), and reads back with every chunk's checksum
        # verified.
        store = SSDTensorStore(cfg.ssd.paths, direct_io=False)
        try:
            stopped_at = store.committed_step
        finally:
            store.close()
        assert stopped_at - committed(cfg) in (0, 1), (stopped_at, committed(cfg))
        tensors(cfg)

        # The same command again resumes from the committed step and ends as if never stopped.
        second = f"fuyou-resume-{secrets.token_hex(4)}"
        t_resubmit = time.monotonic()
        submit(second)
        status = wait_status(second, 120)
        logs = job_logs(second)
        assert status == "SUCCEEDED", f"job {status}:\n{logs}"
        assert f"resuming from committed step {stopped_at}" in logs, logs
        assert f"done: committed step {STEPS}/{STEPS}" in logs, logs
        t_done = time.monotonic()
    finally:
        cluster.stop()
        left = cluster.mine()
        leaked = {
            n
            for n in fuyou_shm_segments() - shm_before
            if (m := re.match(r"fuyou-\w+-(\d+)-", n)) is None or int(m.group(1)) in cluster.seen
        }
        for name in leaked:  # never leave a ring behind for the next test, even when this one failed
            Path("/dev/shm", name).unlink(missing_ok=True)
    assert not left, f"processes of the test cluster survived the stop: {sorted(left)}"
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
    ours = tensors(cfg)
    for kind in KINDS:
        for unit, (a, b) in enumerate(zip(ours[kind], reference[kind], strict=True)):
            assert torch.equal(a, b), f"unit {unit} {kind.value} differs from the uninterrupted run"
    assert losses(cfg) == ref_losses, "the losses differ from the uninterrupted run"
    print(
        f"\nreference + ray start {t_started - t0:.1f}s; submit {t_submitted - t_started:.1f}s; "
        f"{STOP_AT} steps {t_progress - t_submitted:.1f}s; stop {t_stopped - t_stop:.1f}s (at step "
        f"{stopped_at}); checks {t_resubmit - t_stopped:.1f}s; resumed run {t_done - t_resubmit:.1f}s; "
        f"total {time.monotonic() - t0:.1f}s"
    )
