"""The run report: self-contained HTML with inline SVG charts (with or without matplotlib), PNGs, the
`fuyou-ray report` command, and the observer that refreshes it during a run."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from fuyou_ray.commands import report as report_cmd
from fuyou_ray.errors import RunStateError
from fuyou_ray.observer import RunObserver
from fuyou_ray.progress import Progress
from fuyou_ray.report import build_report, load_run
from fuyou_ray.svgplot import Series, line_chart, reduce_points
from fuyou_ray.timeline import Span
from tests.conftest import tiny_config

LANE_TITLES = ["GPU compute", "H2D", "D2H", "SSD read", "SSD write", "CPU Adam"]


def make_run_dir(root: Path, steps: int = 30, name: str = "run") -> Path:
    """A run dir as the driver leaves it: config, plan, metrics, timeline, summary."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "run_dir: x\nsteps: 40\nmodel: {arch: gpt, n_layer: 4, d_model: 128, vocab_size: 256}\n"
    )
    (run / "plan.json").write_text(
        json.dumps({"device": "cpu", "param_dtype": "float32", "num_slots": 24, "slot_bytes": 794624})
    )
    rows = []
    for step in range(1, steps + 1):
        busy = {"gpu compute": 0.3, "ssd read": 0.05, "ssd write": 0.04, "h2d": 0.01, "cpu adam": 0.01}
        row = {"step": step, "loss": 5.5 - step * 0.08, "grad_norm": 1.0, "lr": 1e-3, "seconds": 0.4}
        rows.append(row | {"tokens_per_s": 5000.0 + step, "tflops": 0.03, "busy": busy})
        if step % 10 == 0:
            rows.append({"step": step, "eval_loss": 5.6 - step * 0.07})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 31, "loss": 1.'  # a line being written
    (run / "metrics.jsonl").write_text(text)
    spans = [
        {"lane": "ssd read", "label": "u00001.param", "start": 0.0, "end": 0.01, "nbytes": 794624},
        {"lane": "h2d", "label": "u00001.param", "start": 0.01, "end": 0.012, "nbytes": 794624},
        {"lane": "gpu compute", "label": "forward 1", "start": 0.012, "end": 0.2, "nbytes": 0},
        {"lane": "d2h", "label": "u00001.grad", "start": 0.2, "end": 0.21, "nbytes": 794624},
        {"lane": "ssd write", "label": "u00001.grad", "start": 0.21, "end": 0.25, "nbytes": 794624},
        {"lane": "cpu adam", "label": "u00001.master", "start": 0.25, "end": 0.3, "nbytes": 794624},
    ]
    (run / "timeline.json").write_text(json.dumps({"step": steps, "spans": spans}))
    return run


def svg(html: str, element_id: str) -> str:
    m = re.search(rf'<svg id="{element_id}".*?</svg>', html, re.S)
    assert m, f"no <svg id={element_id}> in the report"
    return m.group(0)


def assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower() and "<link" not in html.lower()
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert all(not r.startswith(("http:", "https:", "//")) for r in refs), refs
    assert "@import" not in html and "url(" not in html


def test_report_has_every_chart_inline(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    files = build_report(run, png=False)
    assert files.html == run / "report" / "index.html" and files.pngs == ()
    html = files.html.read_text()
    assert_self_contained(html)
    timeline = svg(html, "timeline")
    labels = re.findall(r'<text class="lane-label"[^>]*>([^<]*)</text>', timeline)
    assert labels == LANE_TITLES
    assert len(re.findall(r'<rect class="span"', timeline)) == 6
    assert "Pipeline timeline of step 30" in timeline
    loss = svg(html, "chart-loss")
    assert 'data-label="train loss"' in loss and 'data-label="eval loss"' in loss
    assert "model TFLOPS" in svg(html, "chart-throughput")  # the right axis
    utilisation = svg(html, "chart-utilisation")
    assert all(f'data-label="{t}"' in utilisation for t in ("GPU compute", "SSD read", "SSD write"))
    assert "committed step</th><td>30 / 40" in html
    assert "bottleneck (step 30)</th><td>GPU compute" in html
    assert '<span class="badge done">finished</span>' in html and 'http-equiv="refresh"' not in html


def test_report_pngs_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = make_run_dir(tmp_path)
    files = build_report(run)
    names = sorted(p.name for p in files.pngs)
    assert names == ["loss.png", "throughput.png", "timeline.png", "utilisation.png"]
    for p in files.pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    html = files.html.read_text()
    assert '<a href="timeline.png">' in html
    assert_self_contained(html)


def test_report_without_matplotlib_still_has_its_charts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run = make_run_dir(tmp_path)
    files = build_report(run)
    assert files.pngs == () and "matplotlib is not installed" in files.png_note
    html = files.html.read_text()
    assert svg(html, "timeline") and svg(html, "chart-loss") and "fuyou-ray[report]" in html
    assert not list((run / "report").glob("*.png"))


def test_running_report_reloads_itself_and_tolerates_missing_files(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 5\n")
    html = build_report(run, png=False, final=False).html.read_text()
    assert 'http-equiv="refresh"' in html and "no data yet" in html
    assert svg(html, "timeline")  # the lanes are drawn even before the first step


def test_report_escapes_what_it_shows(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, name="<script>alert(1)</script>")
    spans = [{"lane": "ssd read", "label": "<img src=x onerror=alert(1)>", "start": 0, "end": 1, "nbytes": 1}]
    (run / "timeline.json").write_text(json.dumps({"step": 1, "spans": spans}))
    html = build_report(run, png=False).html.read_text()
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_not_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(RunStateError, match="no such run dir"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunStateError, match="not a fuyou-ray run dir"):
        load_run(tmp_path)


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run_dir(tmp_path)
    args = argparse.Namespace(run_dir=str(run), no_png=True, running=False)
    assert report_cmd.run(args) == 0
    assert f"report: {run / 'report' / 'index.html'}" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    report_cmd.register(parser.add_subparsers())
    assert "examples:" in parser._subparsers._group_actions[0].choices["report"].format_help()  # type: ignore[union-attr]


def test_long_series_keep_their_extremes() -> None:
    xs = list(range(100_000))
    ys = [1.0] * 100_000
    ys[54_321] = 50.0
    pts = reduce_points(xs, ys, limit=1000)
    assert len(pts) <= 1002 and (54_321, 50.0) in pts and pts[-1] == (99_999, 1.0)
    chart = line_chart([Series("y", xs, ys)], title="t", x_label="x", y_label="y", element_id="c")
    assert chart.count(",") < 2100


# ------------------------------------------------------------------------------------------ observer


class FakeMetrics:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.cluster: list[tuple[int | None, dict[str, int]]] = []

    def record_plan(self, ring_slots: int) -> None:
        pass

    def record_step(self, stats: Any, tokens: int, **kw: Any) -> None:
        self.steps.append(stats.step)

    def record_cluster(self, ssd_bytes: int | None, restarts: dict[str, int]) -> None:
        self.cluster.append((ssd_bytes, dict(restarts)))


class Record:
    def __init__(self, step: int) -> None:
        self.step, self.loss, self.grad_norm, self.lr, self.seconds = step, 3.0, 1.0, 1e-3, 0.1
        self.tokens_per_s, self.tflops, self.busy = 100.0, 0.01, {}


def test_observer_fans_out_and_refreshes_the_report(tmp_path: Path) -> None:
    import io

    builds: list[bool] = []
    metrics = FakeMetrics()
    out = io.StringIO()
    observer = RunObserver(
        tmp_path,
        start=0,
        total=25,
        tokens_per_step=64,
        metrics=metrics,  # type: ignore[arg-type]
        progress=Progress(0, 25, stream=out, tty=False),
        report_every=10,
        report_min_s=0.0,
        build_report=lambda run_dir, final: builds.append(final),
    )
    spans = [Span("gpu compute", "f", 0.0, 0.05)]
    with observer:
        for step in range(1, 26):
            observer.on_step(Record(step), spans)
    observer._wait_for_report()
    assert builds == [False, False]  # steps 10 and 20
    observer.on_end(type("Result", (), {"io": {"bytes_stored": 4096}})())
    assert builds == [False, False, True]
    assert metrics.steps == list(range(1, 26)) and metrics.cluster == [(4096, {})]
    assert out.getvalue().count("\nstep ") == 24 and "bottleneck gpu compute 50%" in out.getvalue()


def test_observer_never_stops_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(run_dir: Path, final: bool) -> None:
        raise OSError("disk full")

    observer = RunObserver(
        tmp_path, start=0, total=2, tokens_per_step=1, progress=Progress(0, 2, tty=False), build_report=broken
    )
    with pytest.raises(ValueError, match="step failed"), observer:
        observer.on_step(Record(1), [])
        raise ValueError("step failed")  # leaving with an error still tries to write the report
    observer.on_end(None)
    assert sum("writing the run report failed" in r.message for r in caplog.records) == 2


def test_a_run_writes_its_report(tmp_path: Path) -> None:
    """End to end in one process: the driver's observer leaves a final report in the run dir."""
    from fuyou_ray.driver import train

    cfg = tiny_config(tmp_path, steps=3, runtime={"executor": "local", "device": "cpu"})
    result = train(cfg)
    html = (Path(result.run_dir) / "report" / "index.html").read_text()
    labels = re.findall(r'<text class="lane-label"[^>]*>([^<]*)</text>', svg(html, "timeline"))
    assert labels[: len(LANE_TITLES)] == LANE_TITLES  # tiny_config: no host cache, no cache lanes
    assert "committed step</th><td>3 / 3" in html and "badge done" in html
    assert len(re.findall(r'<rect class="span"', html)) > 10
