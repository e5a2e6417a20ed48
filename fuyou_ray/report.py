"""The run report: RUN_DIR/report/index.html (self-contained) plus PNGs of the same charts.

Built from the run dir's files alone (metrics.jsonl, timeline.json, config.yaml, plan.json, summary.json),
so `fuyou-ray report RUN_DIR` rebuilds it at any time, and the driver refreshes it while training. The
HTML has no scripts and no external references: charts are inline SVG drawn by fuyou_ray.svgplot, so it
exists whether or not matplotlib (the optional `report` extra) is installed; with matplotlib the same
charts are also written as PNGs next to it.

Charts: training (and eval, when recorded) loss per step; throughput over training time (tokens/s, with
TFLOPS on the right axis); busy % of each pipeline lane per step; and the pipeline timeline of the most
recent step, one row per resource (GPU compute, H2D, D2H, SSD read, SSD write, CPU Adam).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml

from fuyou_ray.config import format_size
from fuyou_ray.errors import RunStateError
from fuyou_ray.metrics import LANE_TITLES, RESOURCE_LANES, StepStats, step_stats
from fuyou_ray.svgplot import LANE_COLORS, Bar, Series, line_chart, timeline_chart
from fuyou_ray.timeline import Span

log = logging.getLogger("fuyou")

REPORT_DIR = "report"
RECENT = 20  # steps the summary's "recent" figures average over


@dataclass
class RunData:
    """What a run dir holds, read leniently (a run in progress may have written only part of it)."""

    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows with a training loss
    evals: list[dict[str, Any]] = field(default_factory=list)  # rows with an eval_loss
    timeline: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def target_steps(self) -> int | None:
        return int(self.config["steps"]) if self.config and "steps" in self.config else None

    @property
    def last_step(self) -> int:
        return int(self.records[-1]["step"]) if self.records else 0


@dataclass(frozen=True)
class ReportFiles:
    """What `build_report` wrote."""

    html: Path
    pngs: tuple[Path, ...] = ()
    png_note: str = ""  # why there are no PNGs, when there are none


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run dir; raises RunStateError when it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunStateError(f"{path}: no such run dir (give the run_dir of a fuyou-ray run)")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.exists() and not (path / "config.yaml").exists():
        raise RunStateError(f"{path} is not a fuyou-ray run dir (no metrics.jsonl or config.yaml)")
    data = RunData(path)
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if not isinstance(row, dict) or "step" not in row:
                continue
            if "loss" in row:
                data.records.append(row)
            if "eval_loss" in row:
                data.evals.append(row)
    data.timeline = _read_json(path / "timeline.json")
    data.plan = _read_json(path / "plan.json")
    data.summary = _read_json(path / "summary.json")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
        data.config = config if isinstance(config, dict) else None
    except (OSError, yaml.YAMLError):
        data.config = None
    return data


# ------------------------------------------------------------------------------------------ series


def _elapsed(records: Sequence[dict[str, Any]]) -> tuple[list[float], str, float]:
    """Cumulative training time at the end of each step, in a readable unit: (values, unit, divisor)."""
    total, out = 0.0, []
    for r in records:
        total += float(r.get("seconds", 0.0))
        out.append(total)
    unit, div = ("h", 3600.0) if total >= 3 * 3600 else ("min", 60.0) if total >= 180 else ("s", 1.0)
    return [t / div for t in out], unit, div


def _tflops_per_token_rate(records: Sequence[dict[str, Any]]) -> float | None:
    for r in reversed(records):
        if r.get("tokens_per_s") and r.get("tflops") is not None:
            return float(r["tflops"]) / float(r["tokens_per_s"])
    return None


def recent_spans(data: RunData) -> list[Span]:
    spans = (data.timeline or {}).get("spans", [])
    out = []
    for s in spans:
        try:
            out.append(
                Span(
                    str(s["lane"]),
                    str(s.get("label", "")),
                    float(s["start"]),
                    float(s["end"]),
                    int(s.get("nbytes", 0)),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def recent_stats(data: RunData) -> StepStats | None:
    """Stats of the step in timeline.json (its metrics row gives wall time and throughput)."""
    if not data.records:
        return None
    step = (data.timeline or {}).get("step")
    row = next((r for r in reversed(data.records) if r.get("step") == step), None)
    spans = recent_spans(data) if row is not None else []
    ring = (data.plan or {}).get("num_slots")
    return step_stats(row if row is not None else data.records[-1], spans, ring)


def loss_chart(data: RunData) -> str:
    series = [
        Series("train loss", [r["step"] for r in data.records], [_num(r["loss"]) for r in data.records])
    ]
    if data.evals:
        series.append(
            Series("eval loss", [r["step"] for r in data.evals], [_num(r["eval_loss"]) for r in data.evals])
        )
    return line_chart(series, title="Loss", x_label="step", y_label="loss", element_id="chart-loss")


def throughput_chart(data: RunData) -> str:
    xs, unit, _ = _elapsed(data.records)
    ratio = _tflops_per_token_rate(data.records)
    return line_chart(
        [Series("tokens/s", xs, [_num(r.get("tokens_per_s")) for r in data.records], "#1565c0")],
        title="Throughput over training time",
        x_label=f"training time ({unit})",
        y_label="tokens/s",
        element_id="chart-throughput",
        right_axis=("model TFLOPS", ratio) if ratio else None,
        y_min=0.0,
    )


def utilisation_chart(data: RunData) -> str:
    steps = [r["step"] for r in data.records]
    series = []
    for lane in RESOURCE_LANES:
        if any(lane in (r.get("busy") or {}) for r in data.records):
            ys = [
                100.0 * (r.get("busy") or {}).get(lane, 0.0) / (r.get("seconds") or math.inf)
                for r in data.records
            ]
            series.append(Series(LANE_TITLES[lane], steps, ys, LANE_COLORS[lane]))
    return line_chart(
        series,
        title="Busy % of each resource",
        x_label="step",
        y_label="% of step time",
        element_id="chart-utilisation",
        y_min=0.0,
    )


def drawn_lanes(spans: Sequence[Span]) -> list[str]:
    """The resource lanes a timeline shows: all of them, but the host cache's only when it was used."""
    used = {s.lane for s in spans}
    return [lane for lane in RESOURCE_LANES if not lane.startswith("cache ") or lane in used]


def pipeline_chart(data: RunData, stats: StepStats | None) -> str:
    spans = recent_spans(data)
    t0 = min((s.start for s in spans), default=0.0)
    bars = [Bar(s.lane, s.start - t0, s.end - t0, s.label, s.nbytes) for s in spans]
    lanes = drawn_lanes(spans) + (["driver"] if any(s.lane == "driver" for s in spans) else [])
    step = (data.timeline or {}).get("step", "?")
    return timeline_chart(
        bars,
        lanes,
        LANE_TITLES,
        title=f"Pipeline timeline of step {step}",
        busy_percent=stats.busy_percent if stats else None,
    )


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#212121;max-width:1040px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.sub{color:#616161;margin-bottom:16px} table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top} th{color:#616161;font-weight:normal}
figure{margin:0 0 8px} figcaption{color:#616161;font-size:12px;max-width:960px}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;background:#e3f2fd}
.done{background:#e8f5e9} svg{max-width:100%;height:auto}
"""


def _summary_rows(data: RunData, stats: StepStats | None, final: bool) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    cfg, plan, summary = data.config or {}, data.plan or {}, data.summary or {}
    model = cfg.get("model") or {}
    if model:
        rows.append(
            (
                "model",
                f"{model.get('arch', '?')}: {model.get('n_layer', '?')} layers, "
                f"d_model {model.get('d_model', '?')}, vocab {model.get('vocab_size', '?')}",
            )
        )
    target = data.target_steps
    rows.append(("committed step", f"{data.last_step}" + (f" / {target}" if target else "")))
    rows.append(("status", "finished" if final else "running (this page refreshes itself)"))
    recent = data.records[-RECENT:]
    if recent:
        losses = [_num(r["loss"]) for r in data.records if math.isfinite(_num(r["loss"]))]
        rows.append(
            ("loss (last / best)", f"{_num(recent[-1]['loss']):.4f} / {min(losses):.4f}" if losses else "-")
        )
        tok = [_num(r.get("tokens_per_s")) for r in recent]
        tfl = [_num(r.get("tflops")) for r in recent]
        sec = [_num(r.get("seconds")) for r in recent]
        rows.append(
            (
                f"throughput (median of last {len(recent)} steps)",
                f"{statistics.median(tok):,.0f} tokens/s, {statistics.median(tfl):.4g} TFLOPS, "
                f"{statistics.median(sec):.3g} s/step",
            )
        )
        rows.append(("training time", f"{sum(_num(r.get('seconds')) for r in data.records) / 3600:.3f} h"))
    if stats and stats.bottleneck:
        rows.append(
            (
                f"bottleneck (step {stats.step})",
                f"{LANE_TITLES[stats.bottleneck]}, busy {stats.bottleneck_percent:.0f}% of the step",
            )
        )
        rows.append(
            (
                f"rates (step {stats.step})",
                f"PCIe H2D {stats.pcie_gb_per_s['h2d']:.3g} / D2H {stats.pcie_gb_per_s['d2h']:.3g} GB/s; "
                f"SSD read {stats.ssd_gb_per_s['read']:.3g} / write {stats.ssd_gb_per_s['write']:.3g} GB/s; "
                f"CPU Adam {stats.adam_gparams_per_s:.3g} Gparam/s; "
                f"ring slots in use {stats.ring_slots_in_use}"
                + (f" of {plan['num_slots']}" if "num_slots" in plan else ""),
            )
        )
    if plan:
        rows.append(
            (
                "plan",
                f"device {plan.get('device')}, params {plan.get('param_dtype')}, "
                f"ring {plan.get('num_slots')} x {format_size(plan.get('slot_bytes', 0))}, "
                f"{plan.get('optimizer_actors')} optimizer actor(s) x "
                f"{plan.get('optimizer_threads')} threads",
            )
        )
    io = summary.get("io") or {}
    if io:
        rows.append(
            (
                "SSD",
                f"{format_size(io.get('bytes_stored', 0))} stored; read "
                f"{format_size(io.get('bytes_read', 0))}, written {format_size(io.get('bytes_written', 0))}",
            )
        )
    for m in summary.get("memory") or []:
        if "peak_above_baseline" in m:
            rows.append(
                (
                    f"memory {m.get('role', m.get('name', '?'))}",
                    f"peak {format_size(m['peak_above_baseline'])} above baseline",
                )
            )
    return rows


TIMELINE_CAPTION = (
    "Each row is one resource of the pipeline; each bar is one thing it did (hover for the tensor, "
    "duration and bytes). Overlap between rows is the pipeline working; the busiest row bounds the step."
)
THROUGHPUT_CAPTION = (
    "Tokens per second of each step against cumulative training time; the right axis is the same in "
    "model TFLOPS."
)
UTILISATION_CAPTION = "Share of each step's wall time each resource was busy."


def render_html(data: RunData, *, final: bool, pngs: Sequence[Path] = (), png_note: str = "") -> str:
    """The report page as one self-contained HTML string."""
    stats = recent_stats(data)
    rows = "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in _summary_rows(data, stats, final)
    )
    refresh = "" if final else '<meta http-equiv="refresh" content="60">'
    badge = '<span class="badge done">finished</span>' if final else '<span class="badge">running</span>'
    png_links = " ".join(f'<a href="{escape(p.name)}">{escape(p.name)}</a>' for p in pngs)
    png_line = f"PNG copies: {png_links}" if pngs else escape(png_note)
    loss_caption = "Training and eval loss." if data.evals else "Training loss (no eval loss recorded)."
    written = time.strftime("%Y-%m-%d %H:%M:%S")
    sections = "".join(
        f"<h2>{escape(heading)}</h2><figure>{chart}<figcaption>{escape(caption)}</figcaption></figure>\n"
        for heading, chart, caption in (
            ("Pipeline timeline", pipeline_chart(data, stats), TIMELINE_CAPTION),
            ("Loss", loss_chart(data), loss_caption),
            ("Throughput", throughput_chart(data), THROUGHPUT_CAPTION),
            ("Resource utilisation", utilisation_chart(data), UTILISATION_CAPTION),
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>fuyou-ray run {escape(data.name)}</title><style>{_CSS}</style></head>
<body>
<h1>fuyou-ray run <code>{escape(data.name)}</code> {badge}</h1>
<div class="sub">{escape(str(data.run_dir))} &middot; report written {escape(written)}</div>
<table id="summary">{rows}</table>
{sections}<p class="sub">{png_line}</p>
</body></html>
"""


# ------------------------------------------------------------------------------------------ PNG


def render_pngs(data: RunData, out_dir: Path) -> tuple[list[Path], str]:
    """The report's charts as PNGs via matplotlib; ([], why) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return [], "No PNG copies: matplotlib is not installed (pip install 'fuyou-ray[report]')."

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
        written.append(path)

    steps = [r["step"] for r in data.records]
    fig = Figure(figsize=(7.6, 3.0))
    ax = fig.add_subplot()
    ax.plot(steps, [_num(r["loss"]) for r in data.records], label="train loss", color="#1565c0")
    if data.evals:
        ax.plot(
            [r["step"] for r in data.evals],
            [_num(r["eval_loss"]) for r in data.evals],
            label="eval loss",
            color="#c62828",
        )
    ax.set(title="Loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    save(fig, "loss.png")

    xs, unit, _ = _elapsed(data.records)
    fig = Figure(figsize=(7.6, 3.0))
    ax = fig.add_subplot()
    ax.plot(xs, [_num(r.get("tokens_per_s")) for r in data.records], color="#1565c0")
    ax.set(title="Throughput over training time", xlabel=f"training time ({unit})", ylabel="tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ratio = _tflops_per_token_rate(data.records)
    if ratio:
        r = ratio

        def to_tflops(y: Any) -> Any:
            return y * r

        def to_tokens(t: Any) -> Any:
            return t / r

        ax.secondary_yaxis("right", functions=(to_tflops, to_tokens)).set_ylabel("model TFLOPS")
    save(fig, "throughput.png")

    fig = Figure(figsize=(7.6, 3.0))
    ax = fig.add_subplot()
    for lane in RESOURCE_LANES:
        if any(lane in (r.get("busy") or {}) for r in data.records):
            ys = [
                100.0 * (r.get("busy") or {}).get(lane, 0.0) / (r.get("seconds") or math.inf)
                for r in data.records
            ]
            ax.plot(steps, ys, label=LANE_TITLES[lane], color=LANE_COLORS[lane])
    ax.set(title="Busy % of each resource", xlabel="step", ylabel="% of step time")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8, ncol=3)
    save(fig, "utilisation.png")

    spans = recent_spans(data)
    t0 = min((s.start for s in spans), default=0.0)
    lanes = drawn_lanes(spans)
    fig = Figure(figsize=(9.8, 3.4))
    ax = fig.add_subplot()
    for i, lane in enumerate(lanes):
        mine = [(s.start - t0, s.end - s.start) for s in spans if s.lane == lane]
        if mine:
            ax.broken_barh(mine, (i - 0.38, 0.76), color=LANE_COLORS[lane])
    ax.set_yticks(range(len(lanes)), [LANE_TITLES[lane] for lane in lanes])
    ax.invert_yaxis()
    ax.set(
        title=f"Pipeline timeline of step {(data.timeline or {}).get('step', '?')}",
        xlabel="seconds since the step's first span",
    )
    ax.grid(axis="x", alpha=0.3)
    save(fig, "timeline.png")
    return written, ""


# ------------------------------------------------------------------------------------------ build


def build_report(run_dir: str | os.PathLike[str], *, png: bool = True, final: bool = True) -> ReportFiles:
    """Write RUN_DIR/report/index.html (and PNGs unless `png` is False); returns what was written.

    `final` marks a finished run (a running one's page reloads itself every minute).
    """
    data = load_run(run_dir)
    out_dir = data.run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    pngs: list[Path] = []
    note = "PNG copies not requested."
    if png:
        pngs, note = render_pngs(data, out_dir)
    html = out_dir / "index.html"
    tmp = html.with_name(".index.html.tmp")
    tmp.write_text(render_html(data, final=final, pngs=pngs, png_note=note))
    os.replace(tmp, html)
    return ReportFiles(html, tuple(pngs), "" if pngs else note)
