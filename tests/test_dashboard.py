"""Watching a real run: `ray start --head` (token auth on, dashboard on 127.0.0.1), `ray job submit --
fuyou-ray train`, then, while it trains:

- the dashboard's HTTP API lists the named actors ALIVE (state API), and the metrics agents that the
  dashboard's Prometheus service discovery (/api/prometheus/sd) names serve every fuyou metric;
- `fuyou-ray status` shows the job's step, throughput and actors;
- headless Debian chromium (playwright-core) opens the dashboard's Actors page with the token cookie;
and once it is done, the run report in the run dir holds the pipeline timeline, and chromium renders it.

Screenshots (and a copy of the report) go to test-artifacts/dashboard/. The browser part needs chromium,
node and playwright-core: `.ci/install-browser.sh` installs them (make test runs it); where they truly
cannot be installed it records why, and the browser tests SKIP with that reason.

Ray 2.60 facts this relies on (observed here): a gauge set by the driver reaches the metrics agent at
the report interval (RAY_metrics_report_interval_ms, 10 s by default) and the agent drops it two of ITS
intervals after the last report, so metrics are checked while the job runs (and the interval is left at
its default: an agent with a shorter interval than the driver's drops the driver's gauges between
reports, which is what a test cluster with RAY_metrics_report_interval_ms=1000 showed). The
metrics agents' /metrics needs no token; the dashboard and its API do (header or the
`ray-authentication-token` cookie that the dashboard's login sets).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fuyou_ray.commands import status as status_cmd
from fuyou_ray.dashboard import DashboardClient
from fuyou_ray.metrics import METRICS
from tests.conftest import REPO
from tests.test_job_flow import BIN, TERMINAL, Cluster

pytestmark = pytest.mark.slow

ACTORS = ("fuyou:gpu-compute", "fuyou:ssd-io", "fuyou:cpu-opt-0")
LANE_TITLES = ["GPU compute", "H2D", "D2H", "SSD read", "SSD write", "CPU Adam"]
STEPS = 40
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
BROWSER_DIR = REPO / ".ci" / "browser"
SHOOT = REPO / "tests" / "browser" / "shoot.cjs"


@dataclass
class LiveJob:
    """A test cluster running one fuyou-ray job, and what was seen while it ran."""

    cluster: Cluster
    client: DashboardClient
    job: str
    run_dir: Path
    alive: dict[str, str] = field(default_factory=dict)  # actor name -> state when all were first ALIVE
    metric_names: set[str] = field(default_factory=set)
    samples: dict[str, float] = field(default_factory=dict)
    status_text: str = ""
    dashboard_page: dict[str, object] | None = None
    browser_skip: str = ""
    final_status: str = ""
    logs: str = ""


def wait(what: str, deadline: float, job: LiveJob, poll: float = 0.5) -> None:
    """Sleep one poll; fail with the job's log when the deadline passed or the job ended early."""
    if time.monotonic() > deadline:
        pytest.fail(f"timed out waiting for {what}\n{job.cluster.job_logs(job.job)}")
    status = job.cluster.job_status(job.job)
    if status in TERMINAL:
        pytest.fail(f"job ended ({status}) while waiting for {what}\n{job.cluster.job_logs(job.job)}")
    time.sleep(poll)


# ------------------------------------------------------------------------------------------ browser


def browser() -> tuple[str, str]:
    """(chromium, node) ready to drive, or a pytest skip naming why they cannot be installed here."""
    status_file = BROWSER_DIR / "status"

    def ready() -> tuple[str, str] | None:
        chromium = shutil.which(os.environ.get("CHROMIUM", "chromium")) or shutil.which("chromium-browser")
        node = shutil.which("node")
        playwright = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
        return (chromium, node) if chromium and node and playwright.is_file() else None

    found = ready()
    if found is None:
        # Not installed yet (e.g. pytest run by hand): install now, as `make test` does before pytest.
        r = subprocess.run(
            [str(REPO / ".ci" / "install-browser.sh")], capture_output=True, text=True, timeout=900
        )
        status = status_file.read_text().strip() if status_file.exists() else ""
        if status.startswith("skip:"):
            pytest.skip(f"browser tests: {status.removeprefix('skip:').strip()}")
        assert r.returncode == 0, f".ci/install-browser.sh failed:\n{r.stdout}\n{r.stderr}"
        found = ready()
        assert found is not None, f".ci/install-browser.sh reported '{status}' but the browser is missing"
    return found


def shoot(spec: dict[str, object], node: str, timeout: float = 120) -> dict[str, object]:
    """Run tests/browser/shoot.cjs: open a page in headless chromium, screenshot it, return its text."""
    env = {**os.environ, "NODE_PATH": str(BROWSER_DIR / "node_modules")}
    r = subprocess.run(
        [node, str(SHOOT), json.dumps(spec)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"the browser failed on {spec['url']}:\n{r.stderr[-3000:]}"
    result: dict[str, object] = json.loads(r.stdout)
    return result


# ------------------------------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def live_job() -> Iterator[LiveJob]:
    for tool in ("ray", "fuyou-ray"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to the test's python")
    try:
        chromium_node: tuple[str, str] | None = browser()
        browser_skip = ""
    except pytest.skip.Exception as exc:
        chromium_node, browser_skip = None, str(exc)
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = Cluster(tmp)
    token = cluster.token_path.read_text().strip()
    run_dir = tmp / "run"
    job = LiveJob(
        cluster,
        DashboardClient(cluster.dashboard, token=token),
        f"fuyou-dash-{secrets.token_hex(4)}",
        run_dir,
    )
    job.browser_skip = browser_skip
    try:
        cluster.start()
        r = cluster.ray(
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            f"--working-dir={REPO}",
            "--runtime-env-json",
            json.dumps({"excludes": [".git"]}),
            f"--submission-id={job.job}",
            "--no-wait",
            "--",
            "fuyou-ray",
            "train",
            "configs/demo.yaml",
            "--set",
            f"steps={STEPS}",
            "--set",
            "batch.global_batch=32",  # about 1 s a step here: time to look while it trains
            "--set",
            f"run_dir={run_dir}",
            "--set",
            f"ssd.paths=[{tmp / 'ssd'}]",
        )
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
        deadline = time.monotonic() + 180

        # 1. The state API (what the dashboard shows) has the named actors, ALIVE.
        while True:
            states = {a["name"]: a["state"] for a in job.client.actors("fuyou:")}
            cluster.mine()
            if all(states.get(name) == "ALIVE" for name in ACTORS):
                job.alive = states
                break
            wait(f"the actors to be ALIVE (seen {states})", deadline, job)

        # 2. Every fuyou metric is served by a metrics agent the dashboard names.
        wanted = {m.exported for m in METRICS}
        while True:
            samples = job.client.samples("ray_fuyou_")
            job.metric_names = {s.name for s in samples}
            if wanted <= job.metric_names:
                job.samples = {
                    s.name: s.value
                    for s in samples
                    if s.labels.get("role") in ("driver", "gpu-compute", "ssd-io")
                }
                break
            wait(f"metrics {sorted(wanted - job.metric_names)}", deadline, job)

        # 3. `fuyou-ray status` sees the job, its progress and its actors.
        job.status_text = status_cmd.render(status_cmd.collect(job.client))

        # 4. The dashboard's Actors page, in the browser, while the actors are alive.
        if chromium_node is not None:
            job.dashboard_page = shoot(
                {
                    "url": f"{cluster.dashboard}/#/actors",
                    "chromium": chromium_node[0],
                    "screenshot": str(ARTIFACTS / "dashboard-actors.png"),
                    "cookies": [
                        {"name": "ray-authentication-token", "value": token, "url": cluster.dashboard}
                    ],
                    "waitFor": f"text={ACTORS[0]}",
                    "settleMs": 1000,
                    "viewport": {"width": 1600, "height": 900},
                },
                chromium_node[1],
            )

        while (status := cluster.job_status(job.job)) not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status}\n{cluster.job_logs(job.job)}"
            time.sleep(1)
        job.final_status = status
        job.logs = cluster.job_logs(job.job)
        yield job
    finally:
        cluster.stop()
        left = cluster.mine()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test cluster survived the stop: {sorted(left)}"


def test_dashboard_api_lists_the_named_actors(live_job: LiveJob) -> None:
    assert all(live_job.alive[name] == "ALIVE" for name in ACTORS), live_job.alive
    assert live_job.final_status == "SUCCEEDED", live_job.logs
    # Once the job is over its actors stay listed, DEAD, with no restarts.
    actors = {a["name"]: a for a in live_job.client.actors("fuyou:")}
    assert set(ACTORS) <= set(actors)
    assert all(int(actors[name].get("num_restarts") or 0) == 0 for name in ACTORS)


def test_custom_metrics_reach_the_metrics_agent(live_job: LiveJob) -> None:
    missing = {m.exported for m in METRICS} - live_job.metric_names
    assert not missing, f"metrics not exported: {sorted(missing)}"
    s = live_job.samples
    assert 1 <= s["ray_fuyou_step"] <= STEPS and s["ray_fuyou_target_steps"] == STEPS
    assert s["ray_fuyou_tokens_per_second"] > 0 and s["ray_fuyou_model_tflops"] > 0
    assert 0 < s["ray_fuyou_loss"] < 10 and s["ray_fuyou_ssd_bytes"] > 0
    assert s["ray_fuyou_ring_slots"] >= s["ray_fuyou_ring_slots_in_use"] > 0


def test_status_command_shows_the_running_job(live_job: LiveJob) -> None:
    text = live_job.status_text
    assert f"job {live_job.job} [RUNNING]" in text, text
    assert re.search(rf"step \d+/{STEPS}  loss \d+\.\d+  [\d,]+ tok/s", text), text
    for name in ACTORS:
        assert re.search(rf"{name}\s+ALIVE\s+pid \d+  restarts 0", text), text


def test_progress_lines_in_the_job_log(live_job: LiveJob) -> None:
    lines = re.findall(rf"^step (\d+)/{STEPS} loss .* eta \S+ bottleneck [a-z ]+ \d+%$", live_job.logs, re.M)
    assert [int(s) for s in lines] == list(range(1, STEPS + 1)), live_job.logs
    assert "\r" not in live_job.logs  # no progress bar redraws in a log


def test_browser_shows_the_actors_on_the_dashboard(live_job: LiveJob) -> None:
    if live_job.dashboard_page is None:
        pytest.skip(live_job.browser_skip)
    page = live_job.dashboard_page
    assert page["title"] == "Actors | Ray Dashboard"
    text = str(page["text"])
    for name in ACTORS:
        assert name in text, f"{name} not on the dashboard's Actors page:\n{text[:3000]}"
    assert "ALIVE" in text
    assert (ARTIFACTS / "dashboard-actors.png").stat().st_size > 10_000


def test_report_in_the_run_dir_and_in_the_browser(live_job: LiveJob) -> None:
    report = live_job.run_dir / "report"
    html = (report / "index.html").read_text()
    assert "committed step</th><td>40 / 40" in html and '<svg id="timeline"' in html
    shutil.copytree(report, ARTIFACTS / "report")  # the report itself is an artifact too
    chromium_node = None if live_job.browser_skip else browser()
    if chromium_node is None:
        pytest.skip(live_job.browser_skip)
    page = shoot(
        {
            "url": (ARTIFACTS / "report" / "index.html").as_uri(),
            "chromium": chromium_node[0],
            "screenshot": str(ARTIFACTS / "report.png"),
            "waitFor": "svg#timeline",
            "queries": ["svg#timeline text.lane-label", "svg#timeline rect.span", "svg.chart .title"],
        },
        chromium_node[1],
    )
    queries = page["queries"]
    assert isinstance(queries, dict)
    # The demo keeps its state in the host cache (runtime.cpu_cache: auto), so the cache's lanes are drawn.
    assert queries["svg#timeline text.lane-label"] == [
        *LANE_TITLES[:5],
        "cache read",
        "cache write",
        "CPU Adam",
    ]
    assert len(queries["svg#timeline rect.span"]) > 20
    assert queries["svg.chart .title"] == ["Loss", "Throughput over training time", "Busy % of each resource"]
    text = str(page["text"])
    assert "Pipeline timeline of step 40" in text and "bottleneck (step 40)" in text
    assert (ARTIFACTS / "report.png").stat().st_size > 20_000
