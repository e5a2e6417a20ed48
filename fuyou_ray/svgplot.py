"""Charts as inline SVG text, with no plotting package: line charts and a per-lane timeline.

The run report embeds these in its HTML, so the report exists (and reads the same) whether or not the
optional matplotlib is installed. Everything is escaped text: labels come from the run's files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# One colour per timeline lane, also used for the same lane in line charts.
LANE_COLORS = {
    "gpu compute": "#2e7d32",
    "h2d": "#1565c0",
    "d2h": "#6a1b9a",
    "ssd read": "#ef6c00",
    "ssd write": "#c62828",
    "cache read": "#f9a825",
    "cache write": "#ad1457",
    "cpu adam": "#00838f",
    "driver": "#757575",
}
PALETTE = ("#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#757575")
MAX_POINTS = 1500  # per series: longer series are reduced to the min and max of equal buckets


@dataclass(frozen=True)
class Series:
    """One line of a chart: x and y values of equal length (non-finite points are left out)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = ""


@dataclass(frozen=True)
class Bar:
    """One busy interval of a timeline lane, in seconds from the step's start."""

    lane: str
    start: float
    end: float
    label: str = ""
    nbytes: int = 0


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def fmt(v: float) -> str:
    """A compact tick label: 12, 0.5, 1.2k, 3.4M, 2e-05."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def reduce_points(
    xs: Sequence[float], ys: Sequence[float], limit: int = MAX_POINTS
) -> list[tuple[float, float]]:
    """Finite points, at most about `limit` of them: the min and max of each bucket keep spikes visible."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pts) <= limit:
        return pts
    size = math.ceil(len(pts) / (limit // 2))
    out: list[tuple[float, float]] = []
    for i in range(0, len(pts), size):
        bucket = pts[i : i + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    if out[-1] != pts[-1]:
        out.append(pts[-1])
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    element_id: str,
    width: int = 760,
    height: int = 280,
    right_axis: tuple[str, float] | None = None,
    y_min: float | None = None,
) -> str:
    """An SVG line chart. `right_axis` = (label, factor) draws a second y axis showing y * factor."""
    left, right, top, bottom = 70, 70 if right_axis else 20, 34, 46
    pw, ph = width - left - right, height - top - bottom
    reduced = [(s, reduce_points(s.xs, s.ys)) for s in series]
    xs = [x for _, pts in reduced for x, _ in pts]
    ys = [y for _, pts in reduced for _, y in pts]
    out = [
        f'<svg id="{escape(element_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text class="title" x="{left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if not xs:
        out.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no data yet</text></svg>'
        )
        return "".join(out)
    xt = nice_ticks(min(xs), max(xs))
    lo_y = min(ys) if y_min is None else min(y_min, min(ys))
    yt = nice_ticks(lo_y, max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>')
    for t in yt:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e3e3e3"/>'
            f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11">{fmt(t)}</text>'
        )
    if right_axis:
        # Round numbers in the right axis's own unit, placed where they fall on the left axis.
        factor = right_axis[1]
        for r in nice_ticks(y0 * factor, y1 * factor):
            if y0 - 1e-12 <= r / factor <= y1 + 1e-12:
                out.append(
                    f'<text x="{left + pw + 6}" y="{py(r / factor) + 4:.1f}" font-size="11">{fmt(r)}</text>'
                )
    for t in xt:
        out.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 17}" text-anchor="middle" font-size="11">{fmt(t)}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="12">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{escape(y_label)}</text>"
    )
    if right_axis:
        out.append(
            f'<text transform="translate({width - 12} {top + ph / 2}) rotate(90)" text-anchor="middle" '
            f'font-size="12">{escape(right_axis[0])}</text>'
        )
    legend: list[tuple[str, str]] = []
    for i, (s, pts) in enumerate(reduced):
        color = s.color or PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            ((x, y),) = pts
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        elif pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(
                f'<polyline class="series" data-label="{escape(s.label)}" fill="none" stroke="{color}" '
                f'stroke-width="1.6" points="{path}"/>'
            )
        legend.append((s.label, color))
    # The legend sits right-aligned in the title row, clear of the data.
    widths = [22 + 6.5 * len(label) for label, _ in legend]
    lx = max(left + 7.5 * len(title) + 24, left + pw - sum(widths))
    for (label, color), w in zip(legend, widths, strict=True):
        out.append(
            f'<rect x="{lx:.1f}" y="{14}" width="12" height="3" fill="{color}"/>'
            f'<text class="legend" x="{lx + 16:.1f}" y="{19}" font-size="11">{escape(label)}</text>'
        )
        lx += w
    out.append("</svg>")
    return "".join(out)


def _time_unit(span_s: float) -> tuple[str, float]:
    return ("s", 1.0) if span_s >= 0.5 else ("ms", 1e3)


def timeline_chart(
    bars: Sequence[Bar],
    lanes: Sequence[str],
    titles: dict[str, str],
    *,
    title: str,
    element_id: str = "timeline",
    busy_percent: dict[str, float] | None = None,
    width: int = 980,
    max_bars: int = 20_000,
) -> str:
    """A Gantt chart: one row per lane, one rectangle per busy interval (hover shows what it was)."""
    label_w, right, top, row, bottom = 120, 64, 34, 28, 40
    height = top + row * len(lanes) + bottom
    pw = width - label_w - right
    end = max((b.end for b in bars), default=0.0) or 1.0
    unit, scale = _time_unit(end)
    ticks = nice_ticks(0.0, end * scale)
    t_max = ticks[-1] / scale

    def px(t: float) -> float:
        return label_w + t / t_max * pw

    out = [
        f'<svg id="{escape(element_id)}" class="timeline" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text class="title" x="{label_w}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, lane in enumerate(lanes):
        y = top + i * row
        fill = "#f5f5f5" if i % 2 == 0 else "#ffffff"
        out.append(
            f'<rect x="{label_w}" y="{y}" width="{pw}" height="{row}" fill="{fill}"/>'
            f'<text class="lane-label" data-lane="{escape(lane)}" x="{label_w - 8}" y="{y + row / 2 + 4}" '
            f'text-anchor="end" font-size="12">{escape(titles.get(lane, lane))}</text>'
        )
        if busy_percent is not None:
            out.append(
                f'<text class="lane-busy" x="{label_w + pw + 6}" y="{y + row / 2 + 4}" font-size="11">'
                f"{busy_percent.get(lane, 0.0):.0f}%</text>"
            )
    rows = {lane: i for i, lane in enumerate(lanes)}
    for b in sorted(bars, key=lambda b: b.end - b.start, reverse=True)[:max_bars]:
        if b.lane not in rows:
            continue
        y = top + rows[b.lane] * row + 4
        w = max(0.6, px(b.end) - px(b.start))
        what = f"{titles.get(b.lane, b.lane)}: {b.label} {(b.end - b.start) * 1e3:.2f} ms"
        if b.nbytes:
            what += f", {b.nbytes / 2**20:.2f} MiB"
        out.append(
            f'<rect class="span" data-lane="{escape(b.lane)}" x="{px(b.start):.2f}" y="{y}" width="{w:.2f}" '
            f'height="{row - 8}" fill="{LANE_COLORS.get(b.lane, "#455a64")}" fill-opacity="0.85">'
            f"<title>{escape(what)}</title></rect>"
        )
    axis_y = top + row * len(lanes)
    out.append(f'<line x1="{label_w}" x2="{label_w + pw}" y1="{axis_y}" y2="{axis_y}" stroke="#888"/>')
    for t in ticks:
        x = px(t / scale)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{axis_y + 4}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{axis_y + 17}" text-anchor="middle" font-size="11">{fmt(t)}</text>'
        )
    out.append(
        f'<text x="{label_w + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">'
        f"time since the step's first span ({unit})</text></svg>"
    )
    return "".join(out)
