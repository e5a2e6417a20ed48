"""The real job flow end to end: `ray start --head`, `ray job submit -- fuyou-ray train`, the state API.

What Ray 2.60 does here (observed on this machine, and what the test relies on):

- Token auth. With RAY_AUTH_MODE unset, `ray start --head` turns token authentication ON when a token is
  available (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) and logs "Token authentication is
  enabled for this Ray cluster". With no token anywhere it starts with auth OFF and only warns; it does
  not create one. `ray.init()` of a local cluster does create ~/.ray/auth_token, so on a machine where
  Ray has run once, the default is "on". CLI clients (`ray job ...`, `ray list ...`) send the token only
  with RAY_AUTH_MODE=token; without it they fail with "Missing authentication token", even when the
  token file is there. The test gives the cluster its own token file (RAY_AUTH_TOKEN_PATH) so it covers
  the token-on default without reading or writing ~/.ray, and checks that a client without
  RAY_AUTH_MODE=token is refused.
- `--node-ip-address 127.0.0.1` is rewritten by Ray to the host's routable address, and the GCS listens on
  all interfaces; `--dashboard-host 127.0.0.1` is honoured (the dashboard and the job API are on loopback).
- Besides --port and --dashboard-port, `ray start` has fixed default ports that collide with another
  cluster on the same host: the dashboard agent's HTTP port (52365: without it job submission fails),
  the Ray client server (10001) and the worker port range. The test passes its own free ports.
- `ray job submit --working-dir` honours the repo's .gitignore (.venv/, runs/, .device-bundle/ ... are not
  uploaded) but uploads .git unless excluded; the test excludes it with `--runtime-env-json`.
- A job's entrypoint runs with the PATH of the `ray start` process: the venv's bin goes first.
- `ray stop [--force]` kills every Ray process on the host (it matches process names, not a cluster), so
  it would also kill other test sessions' clusters (tests/conftest.py `ray_cluster`). The test stops its
  own cluster instead: the processes whose command line names its temp dir or its ports, and their
  descendants, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, fuyou_shm_segments

pytestmark = pytest.mark.slow

STEPS = 8
ACTORS = ("fuyou:gpu-compute", "fuyou:ssd-io", "fuyou:cpu-opt-0")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


class Cluster:
    """A `ray start --head` cluster of this test only: its own temp dir, ports and auth token."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gcs_port, self.dash_port, self.agent_port, self.client_port = free_ports(4)
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.token_path = tmp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        self.server_env = env  # RAY_AUTH_MODE unset: Ray's default
        self.client_env = {**env, "RAY_AUTH_MODE": "token"}
        self.seen: set[int] = set()

    def ray(self, *args: str, client: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.client_env if client else self.server_env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        r = self.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dash_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={self.client_port}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--num-cpus=2",
            f"--object-store-memory={256 * 1024**2}",
            f"--temp-dir={self.tmp}",
            "--disable-usage-stats",
            client=False,
            timeout=90,
        )
        assert r.returncode == 0, f"ray start failed:\n{r.stdout}\n{r.stderr}"

    def mine(self) -> set[int]:
        """Pids of this cluster's processes: command line names the temp dir or a port, plus descendants."""
        procs = processes()
        marks = (str(self.tmp), f":{self.gcs_port} ", f"--port={self.client_port} ")
        pids = {pid for pid, (_, cmd) in procs.items() if any(m in cmd + " " for m in marks)}
        pids.discard(os.getpid())
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _) in procs.items():
                if ppid in pids and pid not in pids:
                    pids.add(pid)
                    grew = True
        self.seen |= pids
        return pids

    def stop(self) -> None:
        """SIGTERM this cluster's processes, then SIGKILL what is left after 15 s. Never `ray stop`."""
        pids = self.mine()
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                pids = self.mine()
                if not pids:
                    return
                time.sleep(0.25)

    def list_actors(self) -> dict[str, str]:
        r = self.ray("list", "actors", f"--address={self.dashboard}", "--format=json", "--limit=1000")
        assert r.returncode == 0, f"ray list actors failed:\n{r.stdout}\n{r.stderr}"
        return {a["name"]: a["state"] for a in json.loads(r.stdout) if a.get("name")}

    def job_status(self, job: str) -> str:
        r = self.ray("job", "status", job, f"--address={self.dashboard}", "--log-color=false")
        out = r.stdout + r.stderr
        if m := re.search(rf"Job '{re.escape(job)}' (succeeded|failed|was stopped)", out):
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
        if m := re.search(rf"Status for job '{re.escape(job)}': (\w+)", out):
            return m.group(1).upper()
        raise AssertionError(f"cannot read the status of job {job}:\n{out}")

    def job_logs(self, job: str) -> str:
        return self.ray("job", "logs", job, f"--address={self.dashboard}", "--log-color=false").stdout


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Ray's unix socket paths live under it (limit ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ray_job_submit_trains_with_named_actors(short_tmp: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc and /dev/shm")
    for tool in ("ray", "fuyou-ray"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    t0 = time.monotonic()
    shm_before = fuyou_shm_segments()
    cluster = Cluster(short_tmp)
    run_dir, ssd = short_tmp / "run", short_tmp / "ssd"
    job = f"fuyou-test-{secrets.token_hex(4)}"
    failed = True
    try:
        cluster.start()

        # Token auth is on: a client without RAY_AUTH_MODE=token is turned away.
        anon = subprocess.run(
            [str(BIN / "ray"), "job", "list", f"--address={cluster.dashboard}"],
            env=cluster.server_env,
            cwd=short_tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )
        refused = anon.stdout + anon.stderr
        assert anon.returncode != 0 and "authentication" in refused.lower(), (
            f"token auth should refuse a client without RAY_AUTH_MODE=token:\n{refused}"
        )

        r = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--working-dir={REPO}",
            "--runtime-env-json",
            json.dumps({"excludes": [".git"]}),
            f"--submission-id={job}",
            "--no-wait",
            "--log-color=false",
            "--",
            "fuyou-ray",
            "train",
            "configs/demo.yaml",
            "--set",
            f"steps={STEPS}",
            "--set",
            f"run_dir={run_dir}",
            "--set",
            f"ssd.paths=[{ssd}]",
        )
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
        t_submit = time.monotonic()

        # While the job runs, the state API (as the dashboard shows it) lists the named actors ALIVE.
        deadline = t_submit + 150
        states: dict[str, str] = {}
        while True:
            states = cluster.list_actors()
            cluster.mine()  # remember the pids of the job's processes (for the /dev/shm check)
            if all(states.get(name) == "ALIVE" for name in ACTORS):
                break
            status = cluster.job_status(job)
            assert status not in TERMINAL, (
                f"job ended ({status}) before its actors were seen alive; actors {states}\n"
                + cluster.job_logs(job)
            )
            assert time.monotonic() < deadline, (
                f"actors not alive after 150 s: {states}\n" + cluster.job_logs(job)
            )
            time.sleep(1)
        t_alive = time.monotonic()

        status = cluster.job_status(job)
        while status not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status} after 150 s\n" + cluster.job_logs(job)
            time.sleep(1)
            status = cluster.job_status(job)
        t_done = time.monotonic()
        logs = cluster.job_logs(job)
        assert status == "SUCCEEDED", f"job {status}:\n{logs}"

        for step in range(1, STEPS + 1):
            assert re.search(rf"^step {step}/{STEPS} loss \d", logs, re.M), (
                f"no line for step {step}:\n{logs}"
            )
        assert f"done: committed step {STEPS}/{STEPS}" in logs, logs
        assert (run_dir / "config.yaml").is_file()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))

        # The upload honoured .gitignore (and the .git exclude): no venv, no run outputs.
        packages = short_tmp / "session_latest" / "runtime_resources" / "working_dir_files"
        uploads = [p for p in packages.glob("*") if p.is_dir()]
        assert uploads, "no working_dir package found in the session dir"
        for pkg in uploads:
            assert (pkg / "configs" / "demo.yaml").is_file()
            for ignored in (".venv", "runs", ".git", "fuyou_ray.egg-info"):
                assert not (pkg / ignored).exists(), f"{ignored} was uploaded with the working dir"
        print(
            f"\nray start {t_submit - t0:.1f}s, actors alive {t_alive - t_submit:.1f}s after submit, "
            f"job done {t_done - t_submit:.1f}s after submit"
        )
        failed = False
    finally:
        cluster.stop()
        left = cluster.mine()
        new = fuyou_shm_segments() - shm_before
        # Attribute new segments by the pid in their name (fuyou-ring-<pid>-...): ours, or of a dead process.
        ours = {
            n for n in new if (m := re.match(r"fuyou-\w+-(\d+)-", n)) is None or _ours_or_dead(m, cluster)
        }
        if failed:
            for name in ours:  # don't leave a failed run's ring behind for the next test
                Path("/dev/shm", name).unlink(missing_ok=True)
    assert not left, f"processes of the test cluster survived the stop: {sorted(left)}"
    assert not ours, f"the job left shared-memory segments behind: {sorted(ours)}"
    print(f"total {time.monotonic() - t0:.1f}s")


def _ours_or_dead(match: re.Match[str], cluster: Cluster) -> bool:
    pid = int(match.group(1))
    return pid in cluster.seen or not Path(f"/proc/{pid}").exists()
