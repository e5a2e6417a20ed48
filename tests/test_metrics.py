"""Per-step stats, Ray metrics, progress lines, the Grafana dashboard and `fuyou-ray status`, without a
cluster (tests/test_dashboard.py checks the same against a real `ray start --head`)."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from typing import Any

import pytest

from fuyou_ray.commands import status as status_cmd
from fuyou_ray.dashboard import Sample, dashboard_address, find_token, parse_prometheus
from fuyou_ray.metrics import (
    METRIC_BY_NAME,
    METRICS,
    RESOURCE_LANES,
    MetricDef,
    RunMetrics,
    lane_tag,
    ring_slots_in_use,
    step_stats,
)
from fuyou_ray.progress import EtaEstimator, Progress, format_duration, format_line, parse_line
from fuyou_ray.timeline import Span
from tests.conftest import REPO

GRAFANA = REPO / "configs" / "grafana" / "fuyou-ray.json"


def record(step: int = 3, seconds: float = 2.0, **kw: Any) -> dict[str, Any]:
    row = {"step": step, "loss": 2.5, "grad_norm": 0.7, "lr": 1e-3, "seconds": seconds}
    row |= {"tokens_per_s": 1000.0, "tflops": 0.5, "busy": {}}
    return row | kw


SPANS = [
    Span("ssd read", "u0.param", 0.0, 0.5, 1_000_000_000),
    Span("h2d", "u0.param", 0.5, 0.6, 1_000_000_000),
    Span("gpu compute", "forward 0", 0.6, 1.6),
    Span("gpu compute", "forward 0 overlap", 1.0, 1.2),  # overlapping spans count once
    Span("d2h", "u0.grad", 1.6, 1.7, 500_000_000),
    Span("ssd write", "u0.grad", 1.7, 1.9, 500_000_000),
    Span("cpu adam", "u0.master", 1.0, 1.5, 4 * 3_000_000_000),
]


class FakeMetric:
    """Records set/inc calls and checks their tags the way Ray does (exactly the declared keys)."""

    def __init__(self, definition: MetricDef, calls: list[tuple[str, float, dict[str, str]]]) -> None:
        self.definition = definition
        self.calls = calls

    def _check(self, value: float, tags: dict[str, str] | None) -> None:
        assert set(tags or {}) == set(self.definition.tags), (self.definition.name, tags)
        assert all(isinstance(v, str) for v in (tags or {}).values())
        assert math.isfinite(value)
        self.calls.append((self.definition.name, value, dict(tags or {})))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.definition.kind == "gauge"
        self._check(value, tags)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert self.definition.kind == "counter" and value > 0
        self._check(value, tags)


def fake_metrics(calls: list[tuple[str, float, dict[str, str]]], **kw: Any) -> RunMetrics:
    return RunMetrics("demo", 40, job="01000000", factory=lambda d: FakeMetric(d, calls), **kw)


# ------------------------------------------------------------------------------------------ stats


def test_step_stats_from_spans() -> None:
    st = step_stats(record(seconds=2.0), SPANS, ring_slots=24)
    assert st.busy_percent["gpu compute"] == pytest.approx(50.0)  # 0.6..1.6 of 2 s
    assert st.busy_percent["ssd read"] == pytest.approx(25.0)
    assert st.bottleneck == "gpu compute" and st.bottleneck_percent == pytest.approx(50.0)
    assert st.gpu_busy_percent == pytest.approx(50.0)
    assert st.pcie_gb_per_s == pytest.approx({"h2d": 0.5, "d2h": 0.25})
    assert st.ssd_gb_per_s == pytest.approx({"read": 0.5, "write": 0.25})
    assert st.adam_gparams_per_s == pytest.approx(1.5)  # 3 G params in 2 s
    assert st.ring_slots_in_use == 1  # u0.param, u0.master and u0.grad are in the ring one after another
    assert (st.step, st.loss, st.tokens_per_s, st.tflops) == (3, 2.5, 1000.0, 0.5)


def test_step_stats_from_a_metrics_row_alone() -> None:
    st = step_stats(record(seconds=4.0, busy={"ssd read": 3.0, "gpu compute": 1.0, "driver": 3.9}))
    assert st.bottleneck == "ssd read"  # the driver lane is bookkeeping, never the bottleneck
    assert st.busy_percent["ssd read"] == pytest.approx(75.0)
    assert st.ssd_gb_per_s == {"read": 0.0, "write": 0.0}
    assert step_stats(record(seconds=0.0)).bottleneck == ""


def test_ring_slot_estimate() -> None:
    # A param read for forward, used, then read again for backward: one slot at a time.
    spans = [
        Span("ssd read", "p", 0, 1),
        Span("h2d", "p", 1, 2),
        Span("ssd read", "p", 5, 6),
        Span("h2d", "p", 6, 7),
    ]
    assert ring_slots_in_use(spans) == 1
    # Three tensors in flight at once (W, m, v of one unit's optimizer), a fourth after they are written.
    spans = [Span("ssd read", t, 0, 1) for t in "Wmv"] + [Span("ssd write", t, 2, 3) for t in "Wmv"]
    spans.append(Span("ssd read", "x", 3, 4))
    assert ring_slots_in_use(spans) == 3
    assert ring_slots_in_use(spans, capacity=2) == 2
    assert ring_slots_in_use([]) == 0


# ------------------------------------------------------------------------------------------ metrics


def test_run_metrics_sets_every_metric_with_declared_tags() -> None:
    calls: list[tuple[str, float, dict[str, str]]] = []
    metrics = fake_metrics(calls)
    metrics.record_plan(24)
    metrics.record_step(step_stats(record(), SPANS, 24), 4096, grad_norm=0.7, lr=1e-3, eta_s=12.0)
    metrics.record_cluster(123456, {"gpu-compute": 0, "ssd-io": 1, "cpu-opt-0": 0})
    assert {name for name, _, _ in calls} == {m.name for m in METRICS}
    assert all(t["run"] == "demo" and t["job"] == "01000000" for _, _, t in calls)
    values = {(n, t.get("lane", t.get("direction", t["role"]))): v for n, v, t in calls}
    assert values[("fuyou_busy_percent", "gpu_compute")] == pytest.approx(50.0)
    assert values[("fuyou_bottleneck", "gpu_compute")] == 1.0
    assert values[("fuyou_bottleneck", "ssd_read")] == 0.0
    assert values[("fuyou_ssd_gb_per_s", "read")] == pytest.approx(0.5)
    assert values[("fuyou_actor_restarts", "ssd-io")] == 1
    assert values[("fuyou_tokens", "driver")] == 4096
    roles = {t["role"] for n, _, t in calls if n == "fuyou_busy_percent"}
    assert roles == {"gpu-compute", "ssd-io", "cpu-opt"}  # tagged by the role that does the work


def test_non_finite_loss_is_not_exported() -> None:
    calls: list[tuple[str, float, dict[str, str]]] = []
    fake_metrics(calls).record_step(
        step_stats(record(loss=float("nan"))), 1, grad_norm=float("inf"), lr=1e-3, eta_s=0
    )
    names = {n for n, _, _ in calls}
    assert "fuyou_loss" not in names and "fuyou_grad_norm" not in names and "fuyou_step" in names


def test_a_failing_metric_switches_metrics_off_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def set(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("agent gone")

        inc = set

    metrics = RunMetrics("demo", 10, factory=lambda d: Broken())
    metrics.record_step(step_stats(record()), 1, grad_norm=1.0, lr=1.0, eta_s=1.0)
    metrics.record_step(step_stats(record()), 1, grad_norm=1.0, lr=1.0, eta_s=1.0)
    assert not metrics.enabled
    assert sum("metrics are off" in r.message for r in caplog.records) == 1


def test_ray_accepts_the_metric_definitions(ray_cluster: Any) -> None:
    """The real ray.util.metrics objects: names, tag keys and values are all valid for Ray."""
    metrics = RunMetrics("demo", 10, job=ray_cluster.get_runtime_context().get_job_id())
    metrics.record_plan(8)
    metrics.record_step(step_stats(record(), SPANS, 8), 4096, grad_norm=0.5, lr=1e-3, eta_s=3.0)
    metrics.record_cluster(1 << 20, {"gpu-compute": 0})
    assert metrics.enabled


def test_exported_names() -> None:
    assert METRIC_BY_NAME["fuyou_loss"].exported == "ray_fuyou_loss"
    assert METRIC_BY_NAME["fuyou_tokens"].exported == "ray_fuyou_tokens_total"
    assert all(re.fullmatch(r"fuyou_[a-z0-9_]+", m.name) for m in METRICS)
    assert lane_tag("gpu compute") == "gpu_compute"


# ------------------------------------------------------------------------------------------ grafana


def test_grafana_dashboard_matches_the_metric_names() -> None:
    dash = json.loads(GRAFANA.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bray_fuyou_[a-z0-9_]+", e)}
    exported = {m.exported for m in METRICS}
    assert used <= exported, f"the dashboard queries unknown metrics: {sorted(used - exported)}"
    assert exported <= used, f"metrics without a panel: {sorted(exported - used)}"
    assert all('run=~"$run"' in e for e in exprs), "every query follows the run selector"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "run"} <= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "fuyou-ray"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["title"]
    lanes = {lane_tag(lane) for lane in RESOURCE_LANES}
    assert lanes == {
        "gpu_compute",
        "h2d",
        "d2h",
        "ssd_read",
        "ssd_write",
        "cache_read",
        "cache_write",
        "cpu_adam",
    }


# ------------------------------------------------------------------------------------------ progress


def test_progress_line_round_trips_through_the_parser() -> None:
    st = step_stats(record(step=12, seconds=2.0, tokens_per_s=4876.2, tflops=0.0031), SPANS)
    line = format_line(st, 40, grad_norm=0.812, lr=2.85e-3, eta_s=3725)
    assert line.startswith(
        "step 12/40 loss 2.5000 grad_norm 0.812 lr 2.85e-03 2.00s 4,876 tok/s 0.0031 TFLOPS"
    )
    assert "eta 1:02:05" in line and line.endswith("bottleneck gpu compute 50%")
    parsed = parse_line("(driver) " + line)
    assert parsed is not None
    assert parsed["step"] == 12 and parsed["total"] == 40 and parsed["tokens_per_s"] == 4876
    assert parsed["bottleneck"] == "gpu compute" and parsed["eta"] == "1:02:05"
    assert parse_line("step 1/2 loss nan grad_norm nan lr 1.00e-03 1.00s 10 tok/s 0.0000 TFLOPS")
    assert parse_line("nothing here") is None


def test_progress_in_a_log_prints_every_log_every_steps_and_the_last() -> None:
    out = io.StringIO()
    progress = Progress(0, 5, log_every=2, stream=out, tty=False)
    for step in range(1, 6):
        progress.update(step_stats(record(step=step, seconds=1.0)), grad_norm=1.0, lr=1e-3)
    progress.close()
    steps = [int(m) for m in re.findall(r"^step (\d+)/5 ", out.getvalue(), re.M)]
    assert steps == [2, 4, 5]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no bar redraws in logs


def test_progress_on_a_terminal_uses_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(2, 5, stream=io.StringIO(), tty=True)
    progress.update(step_stats(record(step=3), SPANS), grad_norm=1.0, lr=1e-3)
    assert progress.bar is not None and progress.bar.n == 3
    assert "bottleneck" in str(progress.bar.postfix)
    progress.close()


def test_eta() -> None:
    eta = EtaEstimator(total=10)
    assert eta.update(1, 30.0) == pytest.approx(270.0)  # only the first step known
    assert eta.update(2, 2.0) == pytest.approx(16.0)  # the warm-up step no longer counts
    assert eta.update(10, 2.0) == 0.0
    assert format_duration(59) == "0:00:59"
    assert format_duration(2 * 86400 + 3661) == "2d 01:01:01"
    assert format_duration(float("nan")) == "?"


# ------------------------------------------------------------------------------------------ status


def test_parse_prometheus() -> None:
    text = (
        "# HELP ray_fuyou_loss training loss\n# TYPE ray_fuyou_loss gauge\n"
        'ray_fuyou_loss{Component="core_worker",job="01000000",role="driver",run="demo"} 2.5\n'
        'ray_fuyou_tokens_total{run="a\\"b"} 4096.0\n'
        'ray_tasks{State="RUNNING"} 1.0\n'
    )
    samples = parse_prometheus(text, "ray_fuyou_")
    assert [s.name for s in samples] == ["ray_fuyou_loss", "ray_fuyou_tokens_total"]
    assert samples[0].labels["run"] == "demo" and samples[0].value == 2.5
    assert samples[1].labels["run"] == 'a"b'


def test_token_and_address_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert find_token() == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert find_token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token() == "env-token" and find_token("given") == "given"
    assert dashboard_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert dashboard_address() == "http://10.0.0.5:8265"
    assert dashboard_address("127.0.0.1:9000") == "http://127.0.0.1:9000"


class FakeDashboard:
    address = "http://127.0.0.1:8265"

    def jobs(self) -> list[dict[str, Any]]:
        return [
            {
                "submission_id": "raysubmit_a",
                "job_id": "02000000",
                "status": "RUNNING",
                "entrypoint": "fuyou-ray train x",
            },
            {
                "submission_id": "raysubmit_b",
                "job_id": "03000000",
                "status": "RUNNING",
                "entrypoint": "fuyou-ray train y",
            },
            {
                "submission_id": "other",
                "job_id": "04000000",
                "status": "RUNNING",
                "entrypoint": "python other.py",
            },
            {
                "submission_id": "old",
                "job_id": "01000000",
                "status": "SUCCEEDED",
                "entrypoint": "fuyou-ray train z",
            },
        ]

    def actors(self, prefix: str = "") -> list[dict[str, Any]]:
        return [
            {"name": "fuyou:ssd-io", "state": "ALIVE", "pid": 11, "num_restarts": "1", "job_id": "02000000"},
            {
                "name": "fuyou:gpu-compute",
                "state": "ALIVE",
                "pid": 10,
                "num_restarts": "0",
                "job_id": "02000000",
            },
        ]

    def samples(self, prefix: str = "") -> list[Sample]:
        tags = {"job": "02000000", "run": "demo", "role": "driver"}
        return [
            Sample("ray_fuyou_step", tags, 12.0),
            Sample("ray_fuyou_target_steps", tags, 40.0),
            Sample("ray_fuyou_loss", tags, 2.5),
            Sample("ray_fuyou_tokens_per_second", tags, 4876.0),
            Sample("ray_fuyou_eta_seconds", tags, 65.0),
            Sample("ray_fuyou_bottleneck", tags | {"lane": "ssd_read"}, 1.0),
            Sample("ray_fuyou_bottleneck", tags | {"lane": "gpu_compute"}, 0.0),
            Sample("ray_fuyou_busy_percent", tags | {"lane": "ssd_read"}, 91.0),
        ]

    def job_logs(self, submission_id: str) -> str:
        assert submission_id == "raysubmit_b"
        return (
            "step 3/8 loss 4.0000 grad_norm 1.000 lr 1.00e-03 0.50s 2,000 tok/s 0.0100 TFLOPS eta 0:00:03\n"
        )


def test_status_from_metrics_actors_and_logs() -> None:
    status = status_cmd.collect(FakeDashboard())
    jobs = {j["submission_id"]: j for j in status["jobs"]}
    assert set(jobs) == {"raysubmit_a", "raysubmit_b"}  # not the non-fuyou job, not the finished one
    a = jobs["raysubmit_a"]
    assert (
        a["progress_from"] == "metrics"
        and a["progress"]["step"] == 12
        and a["progress"]["bottleneck"] == "ssd read"
    )
    assert [x["name"] for x in a["actors"]] == ["fuyou:gpu-compute", "fuyou:ssd-io"]
    assert jobs["raysubmit_b"]["progress_from"] == "log" and jobs["raysubmit_b"]["progress"]["step"] == 3
    text = status_cmd.render(status)
    assert "step 12/40  loss 2.5000  4,876 tok/s" in text and "bottleneck ssd read 91%" in text
    assert "eta 0:01:05" in text
    assert re.search(r"fuyou:ssd-io\s+ALIVE\s+pid 11  restarts 1", text)
    assert "(from the log)" in text
    assert {
        j["submission_id"] for j in status_cmd.collect(FakeDashboard(), include_finished=True)["jobs"]
    } == {
        "raysubmit_a",
        "raysubmit_b",
        "old",
    }


def test_status_without_a_cluster_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_job_flow import free_ports

    (port,) = free_ports(1)
    args = argparse.Namespace(address=f"http://127.0.0.1:{port}", token_file=None, all=False, json=False)
    assert status_cmd.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fuyou-ray: error: cannot reach the Ray dashboard at http://127.0.0.1:")
    assert "ray start --head" in err and err.count("\n") == 1
