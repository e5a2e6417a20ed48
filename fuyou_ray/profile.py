"""Hardware profiles: what one machine can do, as the cost model needs it, saved as YAML.

A `HardwareProfile` holds the rates the planner predicts with - GPU FLOP/s for a GPT block of a given
width and tokens per call, PCIe bandwidth each way and both at once, SSD read/write bandwidth at each queue
depth (striped over the run's SSD directories, and per directory), CPU fused-AdamW parameters per second by
thread count, the host cache's copy rate - plus memory sizes. `fuyou-ray probe` measures one
(fuyou_ray/probe.py); configs/profiles/ holds hand-written ones for machines we cannot probe (the paper's
testbed), each saying where its figures come from. A field added after a profile was written takes its
documented default when the file lacks it (`cpu.memcpy_gbps`, the host cache's copy rate, was added
later). Units are the readable ones: TFLOPS, GB/s (1e9 B/s), Gparam/s, bytes for sizes.

Profiles are immutable; `with_ssd_devices(n)` and `with_cpu_memory(b)` make the variants `--what-if` asks
about. `load_profile` rejects unknown keys and impossible values with a `ProfileError` naming the key.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml


class ProfileError(ValueError):
    """A profile file is unreadable or holds an unknown key or an impossible value."""


# ---------------------------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class BlockRate:
    """One measured GPT block: forward + backward FLOPs over wall time, at a width and tokens per call."""

    d_model: int
    tokens: int  # tokens per call: micro-batch x sequence length
    tflops: float


@dataclass(frozen=True)
class GPUProfile:
    """The compute device (a GPU, or the CPU fallback that runs the same code).

    A GPT block's rate follows a saturating curve in the work of one call:
        rate(W) = block_tflops * W / (W + half_work_gflop)      W = forward FLOPs of the block call (GFLOP)
    fitted to `points` by the probe (1/rate is linear in 1/W). Small calls pay launch and tail effects;
    big ones approach `block_tflops`, which sits below `matmul_tflops` (norms, GELU, attention softmax).
    """

    name: str = "unknown"
    device: str = "cuda"  # "cuda" or "cpu" (the CPU fallback)
    memory_bytes: int = 0
    matmul_tflops: float = 0.0  # dense bf16 GEMM with fp32 accumulate (fp32 GEMM on the CPU fallback)
    block_tflops: float = 0.0  # asymptotic rate of a GPT block forward + backward
    half_work_gflop: float = 0.0  # forward work per call at which a block reaches half of block_tflops
    points: tuple[BlockRate, ...] = ()

    def block_rate(self, forward_flops_per_call: float) -> float:
        """FLOP/s of a GPT block (or head) call whose forward does `forward_flops_per_call` FLOPs."""
        work = max(forward_flops_per_call, 1.0) / 1e9
        return self.block_tflops * 1e12 * work / (work + self.half_work_gflop)


def fit_block_curve(points: Sequence[BlockRate]) -> tuple[float, float]:
    """Least-squares fit of (block_tflops, half_work_gflop) to measured points, on 1/rate = a + b/W."""
    points = [p for p in points if p.tflops > 0]
    if not points:
        raise ProfileError("fit_block_curve: no measured points")
    xs = [1.0 / block_forward_gflop(p.d_model, p.tokens) for p in points]
    ys = [1.0 / p.tflops for p in points]
    if len(points) == 1 or max(xs) - min(xs) < 1e-12:
        # One shape: assume it is saturated (half work small against it).
        return float(points[0].tflops), 0.0
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = max(0.0, sxy / sxx)
    a = my - b * mx
    if a <= 0:  # the points do not saturate within the range: take the best one as the asymptote
        best = max(points, key=lambda p: p.tflops)
        return float(best.tflops), 0.0
    return 1.0 / a, b / a


def block_forward_gflop(d_model: int, tokens: int, seq_len: int | None = None) -> float:
    """Forward GFLOPs of one GPT block call on `tokens` tokens: 24 T h^2 (GEMMs) + 4 T s h (attention)."""
    s = seq_len if seq_len is not None else min(tokens, 2048)
    return (24.0 * tokens * d_model**2 + 4.0 * tokens * s * d_model) / 1e9


# ---------------------------------------------------------------------------------------------- PCIe


@dataclass(frozen=True)
class PCIeProfile:
    """Host <-> device copies from pinned memory (on the CPU fallback: host memcpy, same fields)."""

    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    duplex_gbps: float = 0.0  # both directions at once, total; 0 = the sum of the two
    pageable_h2d_gbps: float = 0.0  # for reference: what an unpinned copy gets

    def rates(self, h2d_active: bool, d2h_active: bool) -> tuple[float, float]:
        """Bytes/s each direction gets (in total) when the given directions are busy."""
        h, d = self.h2d_gbps * 1e9, self.d2h_gbps * 1e9
        if h2d_active and d2h_active and self.duplex_gbps > 0:
            scale = min(1.0, self.duplex_gbps * 1e9 / (h + d))
            return h * scale, d * scale
        return h, d


# ---------------------------------------------------------------------------------------------- SSD


@dataclass(frozen=True)
class SSDRate:
    """Bandwidth with `queue_depth` requests of the store's chunk size in flight (O_DIRECT, checksummed)."""

    queue_depth: int
    read_gbps: float
    write_gbps: float


@dataclass(frozen=True)
class SSDDirProfile:
    """One SSD directory measured alone."""

    path: str
    direct_io: bool = True
    free_bytes: int = 0
    rates: tuple[SSDRate, ...] = ()


@dataclass(frozen=True)
class SSDProfile:
    """The SSD directories of a run, striped as the store stripes records.

    `rates` are for the striped set. Reads and writes at once share the devices: when both are busy, reads
    get `mixed_read_gbps` and writes `mixed_write_gbps` in total (measured together); when those are 0 the
    devices are time-shared (a read byte costs 1/read, a write byte 1/write of device time).
    `devices` is the number of physical drives behind the set; `with_devices(n)` scales the rates by n/devices
    (RAID0-like scaling), up to `max_gbps` per direction where the host caps it (0 = no cap).
    `steady_read_gbps` / `steady_write_gbps`: one direction alone as steady streams with the SSD actor's
    records in flight (`probe.steady_ssd_rates`; 0 = not measured). They cap the rates at every queue depth:
    `rates` time single records, which a disk with a write-back cache in front (the H100 box's virtio disk)
    serves faster than the sustained streams of a step (2.36 against 1.49 GB/s of writes there).
    """

    devices: int = 1
    rates: tuple[SSDRate, ...] = ()
    mixed_read_gbps: float = 0.0
    mixed_write_gbps: float = 0.0
    steady_read_gbps: float = 0.0
    steady_write_gbps: float = 0.0
    max_gbps: float = 0.0
    capacity_bytes: int = 0  # free bytes over the directories (0 = unknown)
    dirs: tuple[SSDDirProfile, ...] = ()

    def _at(self, queue_depth: int) -> SSDRate:
        rate = self._measured_at(queue_depth)
        read, write = rate.read_gbps, rate.write_gbps
        if self.steady_read_gbps > 0:
            read = min(read, self.steady_read_gbps)
        if self.steady_write_gbps > 0:
            write = min(write, self.steady_write_gbps)
        return SSDRate(rate.queue_depth, read, write)

    def _measured_at(self, queue_depth: int) -> SSDRate:
        if not self.rates:
            raise ProfileError("ssd.rates is empty: the profile has no SSD measurement")
        ordered = sorted(self.rates, key=lambda r: r.queue_depth)
        depths = [r.queue_depth for r in ordered]
        i = bisect.bisect_left(depths, queue_depth)
        if i < len(ordered) and depths[i] == queue_depth:
            return ordered[i]
        if i == 0:
            return ordered[0]
        if i == len(ordered):
            return ordered[-1]
        lo, hi = ordered[i - 1], ordered[i]
        # Interpolate in log(queue depth): bandwidth grows roughly with the log of requests in flight.
        f = math.log(queue_depth / lo.queue_depth) / math.log(hi.queue_depth / lo.queue_depth)
        return SSDRate(
            queue_depth,
            lo.read_gbps + f * (hi.read_gbps - lo.read_gbps),
            lo.write_gbps + f * (hi.write_gbps - lo.write_gbps),
        )

    def read_bps(self, queue_depth: int) -> float:
        return self._at(queue_depth).read_gbps * 1e9

    def write_bps(self, queue_depth: int) -> float:
        return self._at(queue_depth).write_gbps * 1e9

    def shared_bps(self, queue_depth: int, reads: int, writes: int) -> tuple[float, float]:
        """(read, write) bytes/s in total while `reads` read and `writes` write requests are in flight.

        One direction alone gets its full rate. Both at once time-share the devices in proportion to the
        requests of each (a 1:1 mix gives each direction half of its rate), corrected by what the probe
        measured for a 1:1 mix (`mixed_*_gbps`), never above the direction's rate alone.
        """
        read, write = self.read_bps(queue_depth), self.write_bps(queue_depth)
        if writes == 0:
            return read, 0.0
        if reads == 0:
            return 0.0, write
        share = reads / (reads + writes)
        gain_r = gain_w = 1.0
        if self.mixed_read_gbps > 0 and self.mixed_write_gbps > 0:
            deepest = self._at(max(x.queue_depth for x in self.rates))
            gain_r = self.mixed_read_gbps / (deepest.read_gbps / 2)
            gain_w = self.mixed_write_gbps / (deepest.write_gbps / 2)
        return min(read, read * share * gain_r), min(write, write * (1 - share) * gain_w)

    def with_devices(self, n: int) -> SSDProfile:
        """The same drives, `n` of them striped: rates scale by n/devices, capped at max_gbps."""
        if n < 1:
            raise ProfileError(f"ssd devices must be >= 1, got {n}")
        f = n / self.devices

        def cap(x: float) -> float:
            return min(x * f, self.max_gbps) if self.max_gbps > 0 else x * f

        rates = tuple(
            replace(r, read_gbps=cap(r.read_gbps), write_gbps=cap(r.write_gbps)) for r in self.rates
        )
        return replace(
            self,
            devices=n,
            rates=rates,
            mixed_read_gbps=cap(self.mixed_read_gbps),
            mixed_write_gbps=cap(self.mixed_write_gbps),
            steady_read_gbps=cap(self.steady_read_gbps),
            steady_write_gbps=cap(self.steady_write_gbps),
            capacity_bytes=int(self.capacity_bytes * f),
            dirs=(),
        )


# ---------------------------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class AdamRate:
    """The optimizer actors' AdamW (fuyou_ray.cpu_adam.HostAdamW) on `threads` threads in all: updaters of
    up to cpu_adam.ACTOR_THREADS threads, each on its own memory, at once (`cpu_adam.pool_rate`). Profiles
    probed before 2026-11-25 (session 8) measured one updater of `threads` threads."""

    threads: int
    gparams_per_s: float


# Host-cache copy rate assumed where a profile has none (profiles written before the probe measured it): an
# assumption, not a measurement. The copies are the SSD actor's, between /dev/shm cache files and ring
# slots (pread/pwrite in 4 MiB chunks on the store's I/O threads, up to 4 records at once, writes into
# freshly allocated tmpfs pages); taken low for a server's memory system so an unmeasured cache is not
# flattered. `fuyou-ray probe` measures it.
DEFAULT_MEMCPY_GBPS = 6.0


@dataclass(frozen=True)
class CPUProfile:
    """Host cores, memory, the optimizer's rate by thread count, and the host cache's copy rate.

    `memcpy_gbps` is the total rate of the SSD actor's host-cache copies (fuyou_ray/cache.py: a cached
    record's read copies its /dev/shm file into a ring slot, its write copies the slot into a new file),
    measured by the probe as reads and writes at once with the actor's concurrency; copies running together
    share it. 0 = not measured: `memcpy_bps` then assumes DEFAULT_MEMCPY_GBPS.
    """

    name: str = "unknown"
    cores: int = 1
    memory_bytes: int = 0
    shm_bytes: int = 0  # /dev/shm size: the ring lives there
    adam: tuple[AdamRate, ...] = ()
    memcpy_gbps: float = 0.0

    def memcpy_bps(self) -> float:
        """Bytes/s of host-cache copies in total (the measured rate, else DEFAULT_MEMCPY_GBPS)."""
        return (self.memcpy_gbps if self.memcpy_gbps > 0 else DEFAULT_MEMCPY_GBPS) * 1e9

    def adam_rate(self, threads: int) -> float:
        """Params/s of fused AdamW on `threads` threads (interpolated; flat beyond the largest measured)."""
        if not self.adam:
            raise ProfileError("cpu.adam is empty: the profile has no optimizer measurement")
        ordered = sorted(self.adam, key=lambda a: a.threads)
        threads = max(1, threads)
        if threads <= ordered[0].threads:
            return ordered[0].gparams_per_s * 1e9 * threads / ordered[0].threads
        for lo, hi in itertools.pairwise(ordered):
            if threads <= hi.threads:
                f = (threads - lo.threads) / (hi.threads - lo.threads)
                return (lo.gparams_per_s + f * (hi.gparams_per_s - lo.gparams_per_s)) * 1e9
        return ordered[-1].gparams_per_s * 1e9


# ---------------------------------------------------------------------------------------------- whole


@dataclass(frozen=True)
class HardwareProfile:
    """Everything the cost model knows about one machine. Immutable; saved and loaded as YAML.

    `call_overhead_s` is what one actor call costs on top of its work (Ray's normal calls: ~0.5-1 ms);
    `commit_s` the fixed cost of publishing a step (manifest fsync + rename). `notes` say where each figure
    comes from (measured by the probe, transcribed from a datasheet, assumed).
    """

    name: str = "unknown"
    gpu: GPUProfile = field(default_factory=GPUProfile)
    pcie: PCIeProfile = field(default_factory=PCIeProfile)
    ssd: SSDProfile = field(default_factory=SSDProfile)
    cpu: CPUProfile = field(default_factory=CPUProfile)
    call_overhead_s: float = 0.0008
    commit_s: float = 0.01
    probe_seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def with_ssd_devices(self, n: int) -> HardwareProfile:
        return replace(self, name=f"{self.name} ({n} SSDs)", ssd=self.ssd.with_devices(n))

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=110)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- loading


def profile_from_dict(data: Mapping[str, Any], where: str = "profile") -> HardwareProfile:
    """Build a profile from a mapping (as read from YAML); unknown keys and bad values raise ProfileError."""
    prof: HardwareProfile = _build(HardwareProfile, data, where)
    _validate(prof, where)
    return prof


def load_profile(path: str | Path) -> HardwareProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(
            f"{path}: profile not found (run `fuyou-ray probe --out {path}` or see configs/profiles/)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ProfileError(f"{path}: the top level must be a mapping (gpu:, pcie:, ssd:, cpu:)")
    return profile_from_dict(data, str(path))


def _build(cls: Any, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ProfileError(f"{where}: unknown key '{key}'; valid keys: {', '.join(names)}")
    return cls(**{k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ProfileError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProfileError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    raise ProfileError(f"{where}: unsupported field type {tp!r}")


def _validate(p: HardwareProfile, where: str) -> None:
    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ProfileError(f"{where}: {key}: {message}")

    require(p.gpu.device in ("cuda", "cpu"), "gpu.device", f"must be 'cuda' or 'cpu', got {p.gpu.device!r}")
    require(p.gpu.block_tflops > 0, "gpu.block_tflops", "must be > 0 (a GPT block's fwd+bwd rate)")
    require(p.gpu.half_work_gflop >= 0, "gpu.half_work_gflop", "must be >= 0")
    require(p.pcie.h2d_gbps > 0 and p.pcie.d2h_gbps > 0, "pcie", "h2d_gbps and d2h_gbps must be > 0")
    require(p.pcie.duplex_gbps >= 0, "pcie.duplex_gbps", "must be >= 0 (0 = the sum of both directions)")
    require(p.ssd.devices >= 1, "ssd.devices", "must be >= 1")
    require(len(p.ssd.rates) >= 1, "ssd.rates", "give at least one queue depth with read_gbps and write_gbps")
    for i, r in enumerate(p.ssd.rates):
        require(r.queue_depth >= 1, f"ssd.rates[{i}].queue_depth", "must be >= 1")
        require(
            r.read_gbps > 0 and r.write_gbps > 0, f"ssd.rates[{i}]", "read_gbps and write_gbps must be > 0"
        )
    require(p.cpu.cores >= 1, "cpu.cores", "must be >= 1")
    require(len(p.cpu.adam) >= 1, "cpu.adam", "give at least one thread count with gparams_per_s")
    for i, a in enumerate(p.cpu.adam):
        require(
            a.threads >= 1 and a.gparams_per_s > 0, f"cpu.adam[{i}]", "threads >= 1 and gparams_per_s > 0"
        )
    require(
        p.cpu.memcpy_gbps >= 0,
        "cpu.memcpy_gbps",
        f"must be >= 0 (0 = not measured: {DEFAULT_MEMCPY_GBPS} GB/s assumed)",
    )
    require(p.call_overhead_s >= 0 and p.commit_s >= 0, "call_overhead_s/commit_s", "must be >= 0")
