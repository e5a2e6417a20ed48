"""What a step did, as numbers a person can watch: derived per-step stats and their Ray metrics.

`step_stats(record, spans)` turns one committed step (its `StepRecord` and the merged timeline spans of
every actor) into `StepStats`: busy % of each lane, PCIe and SSD GB/s, CPU Adam Gparam/s, the ring slots
that held data at once, and the bottleneck (the busiest lane: a step can't be shorter than it). Progress
lines, the HTML report and the metrics all read these numbers, so they always agree.

`RunMetrics` exports them through `ray.util.metrics` (the Ray metrics agent serves them to Prometheus;
configs/grafana/fuyou-ray.json charts them). Every series carries `run` (the run dir's name), `job` (the
Ray job id of the driver, as the state API shows it) and `role` (the actor it describes: driver,
gpu-compute, ssd-io, cpu-opt; per-actor series use the actor's own role, e.g. cpu-opt-1). `METRICS` is
the single list of names; Ray exports each as `ray_<name>`, counters as `ray_<name>_total`.

Rates are averages over the step's wall time (what the pipeline achieved, not the device's peak); busy %
is the union of a lane's spans over the step's wall time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fuyou_ray.timeline import LANES, Span, busy_seconds

log = logging.getLogger("fuyou")

# Which actor role does each lane's work (the `role` tag of per-lane series).
LANE_ROLES = {
    "gpu compute": "gpu-compute",
    "h2d": "gpu-compute",
    "d2h": "gpu-compute",
    "ssd read": "ssd-io",
    "ssd write": "ssd-io",
    "cache read": "ssd-io",
    "cache write": "ssd-io",
    "cpu adam": "cpu-opt",
    "driver": "driver",
}
# How people write the lanes (reports, progress lines).
LANE_TITLES = {
    "gpu compute": "GPU compute",
    "h2d": "H2D",
    "d2h": "D2H",
    "ssd read": "SSD read",
    "ssd write": "SSD write",
    "cache read": "cache read",
    "cache write": "cache write",
    "cpu adam": "CPU Adam",
    "driver": "driver",
}
# The lanes of the pipeline's resources; "driver" is bookkeeping, never the bottleneck.
RESOURCE_LANES = tuple(lane for lane in LANES if lane != "driver")
# Lanes whose spans touch a ring slot (labelled with the tensor it holds), and those that fill one.
_RING_LANES = ("ssd read", "ssd write", "cache read", "cache write", "h2d", "d2h", "cpu adam")
_PRODUCERS = ("ssd read", "cache read", "d2h")

# A CPU Adam span's nbytes is 4 bytes per updated element (actors/cpu_optimizer.py).
ADAM_BYTES_PER_PARAM = 4


def lane_tag(lane: str) -> str:
    """The lane as a Prometheus label value: 'gpu compute' -> 'gpu_compute'."""
    return lane.replace(" ", "_")


@dataclass(frozen=True)
class StepStats:
    """Numbers derived from one committed step; see the module docstring for their definitions."""

    step: int
    seconds: float
    loss: float
    tokens_per_s: float
    tflops: float
    busy_percent: dict[str, float] = field(default_factory=dict)  # lane -> % of the step's wall time
    lane_bytes: dict[str, int] = field(default_factory=dict)  # lane -> bytes moved during the step
    pcie_gb_per_s: dict[str, float] = field(default_factory=dict)  # "h2d" / "d2h"
    ssd_gb_per_s: dict[str, float] = field(default_factory=dict)  # "read" / "write"
    adam_gparams_per_s: float = 0.0
    ring_slots_in_use: int = 0
    bottleneck: str = ""  # the busiest resource lane ("" when no span was recorded)

    @property
    def bottleneck_percent(self) -> float:
        return self.busy_percent.get(self.bottleneck, 0.0)

    @property
    def gpu_busy_percent(self) -> float:
        return self.busy_percent.get("gpu compute", 0.0)


def _field(record: Any, name: str, default: Any = 0.0) -> Any:
    """Read a StepRecord field from the dataclass or from its metrics.jsonl dict."""
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def step_stats(record: Any, spans: Sequence[Span] = (), ring_slots: int | None = None) -> StepStats:
    """Derive a step's stats from its record (a StepRecord or a metrics.jsonl row) and its spans.

    Without spans (e.g. a metrics.jsonl row alone) busy % comes from the record's `busy` seconds and the
    byte rates are zero. `ring_slots` (the plan's) caps the slot occupancy estimate.
    """
    seconds = float(_field(record, "seconds", 0.0)) or 0.0
    busy_s: dict[str, float] = dict(_field(record, "busy", {}) or {})
    if spans:
        busy_s = {lane: busy_seconds(spans, lane) for lane in LANES if any(s.lane == lane for s in spans)}
    busy_pct = {lane: (100.0 * b / seconds if seconds > 0 else 0.0) for lane, b in busy_s.items()}
    nbytes: dict[str, int] = {}
    for s in spans:
        nbytes[s.lane] = nbytes.get(s.lane, 0) + int(s.nbytes)

    def rate(lane: str, unit: float = 1e9, per: int = 1) -> float:
        return nbytes.get(lane, 0) / per / seconds / unit if seconds > 0 else 0.0

    resources = {lane: busy_pct[lane] for lane in RESOURCE_LANES if lane in busy_pct}
    return StepStats(
        step=int(_field(record, "step", 0)),
        seconds=seconds,
        loss=float(_field(record, "loss", float("nan"))),
        tokens_per_s=float(_field(record, "tokens_per_s", 0.0)),
        tflops=float(_field(record, "tflops", 0.0)),
        busy_percent=busy_pct,
        lane_bytes=nbytes,
        pcie_gb_per_s={"h2d": rate("h2d"), "d2h": rate("d2h")},
        ssd_gb_per_s={"read": rate("ssd read"), "write": rate("ssd write")},
        adam_gparams_per_s=rate("cpu adam", per=ADAM_BYTES_PER_PARAM),
        ring_slots_in_use=ring_slots_in_use(spans, ring_slots),
        bottleneck=max(resources, key=lambda lane: resources[lane]) if resources else "",
    )


def ring_slots_in_use(spans: Sequence[Span], capacity: int | None = None) -> int:
    """Peak number of ring slots holding data at once during a step, estimated from its spans.

    Spans name the tensor they move (their label). A slot is taken when a producer (SSD read, D2H) starts
    filling it with a tensor and is free once the last span touching that tensor before its next
    producer has ended. It is an estimate (a slot filled by CPU Adam is only seen from its SSD write),
    capped at `capacity` when given.
    """
    by_label: dict[str, list[Span]] = {}
    for s in spans:
        if s.lane in _RING_LANES and s.label:
            by_label.setdefault(s.label, []).append(s)
    events: list[tuple[float, int]] = []
    for group in by_label.values():
        group.sort(key=lambda s: s.start)
        start, end = group[0].start, group[0].end
        for s in group[1:]:
            if s.lane in _PRODUCERS and s.start >= end:
                events += [(start, 1), (end, -1)]
                start, end = s.start, s.end
            else:
                end = max(end, s.end)
        events += [(start, 1), (end, -1)]
    peak = live = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before takes at the same instant
        live += delta
        peak = max(peak, live)
    return min(peak, capacity) if capacity is not None else peak


# ------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: its name (without Ray's `ray_` prefix), kind, unit and tag keys."""

    name: str
    kind: str  # "gauge" or "counter"
    description: str
    tags: tuple[str, ...] = ("run", "job", "role")

    @property
    def exported(self) -> str:
        """The name Prometheus sees."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


METRICS: tuple[MetricDef, ...] = (
    MetricDef("fuyou_step", "gauge", "last committed step"),
    MetricDef("fuyou_target_steps", "gauge", "steps of the whole run"),
    MetricDef("fuyou_steps", "counter", "steps committed by this driver"),
    MetricDef("fuyou_tokens", "counter", "tokens trained on by this driver"),
    MetricDef("fuyou_tokens_per_second", "gauge", "training throughput of the last step, tokens/s"),
    MetricDef("fuyou_model_tflops", "gauge", "model FLOPs of the last step / its wall time, TFLOPS"),
    MetricDef("fuyou_step_seconds", "gauge", "wall time of the last step, seconds"),
    MetricDef("fuyou_eta_seconds", "gauge", "estimated seconds until the run's last step"),
    MetricDef("fuyou_loss", "gauge", "training loss of the last step"),
    MetricDef("fuyou_grad_norm", "gauge", "global gradient norm of the last step (before clipping)"),
    MetricDef("fuyou_learning_rate", "gauge", "learning rate of the last step"),
    MetricDef(
        "fuyou_busy_percent",
        "gauge",
        "% of the last step's wall time a lane was busy",
        ("run", "job", "role", "lane"),
    ),
    MetricDef(
        "fuyou_bottleneck",
        "gauge",
        "1 for the busiest lane of the last step, else 0",
        ("run", "job", "role", "lane"),
    ),
    MetricDef("fuyou_gpu_busy_percent", "gauge", "% of the last step the GPU computed"),
    MetricDef(
        "fuyou_pcie_gb_per_s",
        "gauge",
        "PCIe bytes of the last step / its wall time, GB/s (direction h2d or d2h)",
        ("run", "job", "role", "direction"),
    ),
    MetricDef(
        "fuyou_ssd_gb_per_s",
        "gauge",
        "SSD bytes of the last step / its wall time, GB/s (direction read or write)",
        ("run", "job", "role", "direction"),
    ),
    MetricDef("fuyou_cpu_adam_gparams_per_s", "gauge", "parameters updated by CPU Adam per second, G/s"),
    MetricDef("fuyou_ring_slots_in_use", "gauge", "peak ring slots holding data during the last step"),
    MetricDef("fuyou_ring_slots", "gauge", "ring slots of the run's plan"),
    MetricDef("fuyou_ssd_bytes", "gauge", "bytes the run holds on SSD (store files and durable snapshots)"),
    MetricDef("fuyou_actor_restarts", "gauge", "times the actor was restarted in this run"),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}


class MetricSink(Protocol):
    """What RunMetrics needs of a metric object (ray.util.metrics Gauge/Counter have both)."""

    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


def ray_metric(definition: MetricDef) -> Any:
    """The ray.util.metrics object of a definition (needs a connected Ray worker or driver)."""
    from ray.util import metrics

    cls = metrics.Gauge if definition.kind == "gauge" else metrics.Counter
    return cls(definition.name, description=definition.description, tag_keys=definition.tags)


class RunMetrics:
    """The run's metrics, created once per driver; `record_step` after each committed step.

    `factory` builds each metric object (Ray's by default; tests pass fakes). Series are only set, never
    read back; a failure to record is logged once and recording stops (metrics never stop training).
    """

    def __init__(
        self, run: str, target_steps: int, *, job: str = "", factory: Callable[[MetricDef], Any] = ray_metric
    ) -> None:
        self.run = run
        self.job = job
        self.target_steps = target_steps
        self.metrics: dict[str, Any] = {m.name: factory(m) for m in METRICS}
        self.enabled = True

    def _tags(self, role: str, **extra: str) -> dict[str, str]:
        return {"run": self.run, "job": self.job, "role": role, **extra}

    def _set(self, name: str, value: float, role: str = "driver", **extra: str) -> None:
        self.metrics[name].set(float(value), tags=self._tags(role, **extra))

    def _guard(self, fn: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            fn()
        except Exception as exc:  # a metric must never stop training
            log.warning("recording Ray metrics failed, metrics are off for this run: %s", exc)
            self.enabled = False

    def record_step(
        self, stats: StepStats, tokens: int, *, grad_norm: float, lr: float, eta_s: float
    ) -> None:
        self._guard(lambda: self._record_step(stats, tokens, grad_norm, lr, eta_s))

    def _record_step(self, st: StepStats, tokens: int, grad_norm: float, lr: float, eta_s: float) -> None:
        self._set("fuyou_step", st.step)
        self._set("fuyou_target_steps", self.target_steps)
        self.metrics["fuyou_steps"].inc(1.0, tags=self._tags("driver"))
        if tokens > 0:
            self.metrics["fuyou_tokens"].inc(float(tokens), tags=self._tags("driver"))
        self._set("fuyou_tokens_per_second", st.tokens_per_s)
        self._set("fuyou_model_tflops", st.tflops)
        self._set("fuyou_step_seconds", st.seconds)
        self._set("fuyou_eta_seconds", eta_s)
        if _finite(st.loss):
            self._set("fuyou_loss", st.loss)
        if _finite(grad_norm):
            self._set("fuyou_grad_norm", grad_norm)
        self._set("fuyou_learning_rate", lr)
        for lane in RESOURCE_LANES:
            role, tag = LANE_ROLES[lane], lane_tag(lane)
            self._set("fuyou_busy_percent", st.busy_percent.get(lane, 0.0), role, lane=tag)
            self._set("fuyou_bottleneck", 1.0 if lane == st.bottleneck else 0.0, role, lane=tag)
        self._set("fuyou_gpu_busy_percent", st.gpu_busy_percent, "gpu-compute")
        for direction, value in st.pcie_gb_per_s.items():
            self._set("fuyou_pcie_gb_per_s", value, "gpu-compute", direction=direction)
        for direction, value in st.ssd_gb_per_s.items():
            self._set("fuyou_ssd_gb_per_s", value, "ssd-io", direction=direction)
        self._set("fuyou_cpu_adam_gparams_per_s", st.adam_gparams_per_s, "cpu-opt")
        self._set("fuyou_ring_slots_in_use", st.ring_slots_in_use)

    def record_plan(self, ring_slots: int) -> None:
        self._guard(lambda: self._set("fuyou_ring_slots", ring_slots))

    def record_cluster(self, ssd_bytes: int | None, restarts: Mapping[str, int]) -> None:
        def record() -> None:
            if ssd_bytes is not None:
                self._set("fuyou_ssd_bytes", ssd_bytes, "ssd-io")
            for role, n in restarts.items():
                self._set("fuyou_actor_restarts", n, role)

        self._guard(record)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def exported_names(defs: Iterable[MetricDef] = METRICS) -> list[str]:
    return [d.exported for d in defs]
