"""The probe: measure this machine into a `HardwareProfile` in under two minutes.

What it measures, each the way the pipeline will see it:
- compute: a GPT block (fuyou_ray.models.gpt.GPTBlock) forward + backward in the compute dtype (bf16 on
  CUDA, fp32 on the CPU fallback) at several widths and tokens per call, fitted to the saturating curve of
  `GPUProfile`; and a plain GEMM for reference.
- host <-> device: copies from pinned memory each way and both at once (two streams); pageable for
  reference. On the CPU fallback the "copy to the device" is a host memcpy, so that is what it measures.
- SSD: the project's own `SSDTensorStore` (O_DIRECT where the filesystem allows it, CRC-32 checksums,
  4 MiB requests from a thread pool) writing and reading a record of `ssd_file_mib`, at each queue depth
  (= io_threads), in each directory alone and striped over all of them, and reads + writes at once.
- CPU optimizer: the actors' AdamW (fuyou_ray.cpu_adam.HostAdamW, clipping scale and bf16 params out) by
  thread count, each count as a pool of updaters running at once (`cpu_adam.pool_rate`).
- host cache: the SSD actor's copies between /dev/shm cache files and ring slots (fuyou_ray/cache.py's
  HostCache, as CachedStore uses it), reads and writes at once with the actor's concurrency.
- memory: host RAM, /dev/shm, device memory.
No Ray: the probe runs where only torch is installed. Files it writes go to `fuyou-probe-<pid>/` inside each
SSD directory and are removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fuyou_ray.profile import (
    AdamRate,
    BlockRate,
    CPUProfile,
    GPUProfile,
    HardwareProfile,
    PCIeProfile,
    SSDDirProfile,
    SSDProfile,
    SSDRate,
    block_forward_gflop,
    fit_block_curve,
)

RAY_CALL_OVERHEAD_S = 0.00084  # a normal Ray actor call, measured on the GPU machine (DESIGN.md)


@dataclass(frozen=True)
class ProbeOptions:
    """What to measure and how much. The defaults finish in about a minute on the GPU machine."""

    ssd_dirs: tuple[str, ...] = ()
    ssd_file_mib: int = 256  # bytes per SSD measurement (one record); keep it above the drive's cache
    queue_depths: tuple[int, ...] = (1, 4, 16, 32)
    mixed_seconds: float = 6.0  # the steady read + write streams (the bench measures them as long)
    device: str = "auto"  # "auto", "cuda" or "cpu"
    copy_mib: int = 512  # bytes per host <-> device copy
    adam_melements: int = 16  # elements (millions) per AdamW measurement
    block_shapes: tuple[tuple[int, int], ...] = ()  # (d_model, tokens) of the GPT blocks; () = by device
    adam_threads: tuple[int, ...] = ()  # thread counts for AdamW; () = 1, 2, 4, ... up to the cores
    # MiB per host-cache copy measurement (4 records, one pass); 0 = skip. The rate depends on the record
    # size (21 GB/s at 64 MiB, ~8-14 GB/s into the cache at 1 GiB): 1 GiB, a 13B-width unit's record.
    cache_mib: int = 4096
    name: str = ""
    budget_s: float = 100.0  # optional measurements are skipped past this, with a note
    notes: list[str] = field(default_factory=list)


def run_probe(options: ProbeOptions, log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure this machine; `log` receives one line per measurement."""
    t0 = time.perf_counter()
    notes = list(options.notes)
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible")
    gpu = probe_compute(device, log, notes, t0 + options.budget_s * 0.4, options.block_shapes)
    pcie = probe_copies(device, options.copy_mib, log, notes)
    ssd = probe_ssd(options, log, notes)
    cpu = probe_cpu(options.adam_melements, log, notes, options.adam_threads)
    if options.cache_mib > 0:
        copy_bps = probe_host_cache(options.cache_mib, log, notes)
        cpu = dataclasses.replace(cpu, memcpy_gbps=_sig(copy_bps / 1e9))
    else:
        notes.append("cpu.memcpy_gbps: not measured (--cache-mib 0); plans assume the default rate")
    notes.append(
        f"call_overhead_s: not measured (no Ray here); {RAY_CALL_OVERHEAD_S * 1e3:.2f} ms from DESIGN.md"
    )
    elapsed = time.perf_counter() - t0
    name = options.name or f"{os.uname().nodename}-{gpu.name}".replace(" ", "-")
    log(f"probe finished in {elapsed:.1f} s")
    return HardwareProfile(
        name=name,
        gpu=gpu,
        pcie=pcie,
        ssd=ssd,
        cpu=cpu,
        call_overhead_s=RAY_CALL_OVERHEAD_S,
        probe_seconds=round(elapsed, 2),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------- compute


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures (readable YAML without losing small CPU-fallback rates)."""
    return float(f"{x:.{digits}g}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, iters: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_compute(
    device: str,
    log: Callable[[str], None],
    notes: list[str],
    deadline: float,
    block_shapes: Sequence[tuple[int, int]] = (),
) -> GPUProfile:
    from fuyou_ray.config import ModelConfig
    from fuyou_ray.models.gpt import GPTBlock

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, int(props.total_memory)
        n = 8192
        shapes = [(2048, 2048), (4096, 4096), (5120, 2048), (5120, 8192), (8192, 4096), (12288, 4096)]
        seq = 2048
    else:
        name, memory = "cpu-fallback", _host_memory()
        n = 1024
        shapes = [(128, 512), (256, 512), (384, 1024), (512, 1024)]
        seq = 256
    shapes = list(block_shapes) or shapes
    if block_shapes:
        n = min(n, 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    secs = _time(lambda: a @ b, device, iters=5)
    matmul = 2 * n**3 / secs / 1e12
    log(f"compute: {n}^3 {str(dtype).removeprefix('torch.')} GEMM {matmul:.2f} TFLOPS")
    points: list[BlockRate] = []
    for h, tokens in shapes:
        if time.perf_counter() > deadline:
            notes.append(f"compute: skipped block shapes from h={h} on (time budget)")
            break
        if device == "cuda" and _block_bytes(h, tokens) > 0.6 * torch.cuda.mem_get_info()[0]:
            notes.append(f"compute: skipped h={h}, {tokens} tokens (does not fit free device memory)")
            continue
        rate = _block_rate(GPTBlock, ModelConfig, h, tokens, min(seq, tokens), device, dtype)
        points.append(BlockRate(h, tokens, _sig(rate / 1e12)))
        log(f"compute: GPT block h={h} tokens={tokens} fwd+bwd {rate / 1e12:.2f} TFLOPS")
        if device == "cuda":
            torch.cuda.empty_cache()
    peak, half = fit_block_curve(points)
    return GPUProfile(
        name=name,
        device=device,
        memory_bytes=memory,
        matmul_tflops=_sig(matmul),
        block_tflops=_sig(peak),
        half_work_gflop=_sig(half),
        points=tuple(points),
    )


def _block_bytes(h: int, tokens: int) -> int:
    return 12 * h * h * 2 * 3 + 64 * tokens * h * 2  # params, grads, Adam-free; activations and transients


def _block_rate(
    block_cls: type, cfg_cls: type, h: int, tokens: int, seq: int, device: str, dtype: torch.dtype
) -> float:
    cfg = cfg_cls(n_layer=1, n_head=max(1, h // 128), d_model=h, max_seq_len=seq)
    with torch.device(device):  # initialise on the device: a 12288-wide block is 1.8 B params
        block = block_cls(cfg).to(dtype=dtype)
    x = torch.randn(tokens // seq, seq, h, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        out = block(x)
        out.backward(grad)

    secs = _time(step, device, iters=3 if device == "cuda" else 2)
    return 3 * block_forward_gflop(h, tokens, seq) * 1e9 / secs


# ---------------------------------------------------------------------------------------------- copies


def probe_copies(device: str, mib: int, log: Callable[[str], None], notes: list[str]) -> PCIeProfile:
    nbytes = mib * 2**20
    if device == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        h2d = nbytes / _time(lambda: dev.copy_(host, non_blocking=True), device, iters=5)
        d2h = nbytes / _time(lambda: host.copy_(dev, non_blocking=True), device, iters=5)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def both() -> None:
            with torch.cuda.stream(s1):
                dev.copy_(host, non_blocking=True)
            with torch.cuda.stream(s2):
                host2.copy_(dev2, non_blocking=True)

        duplex = 2 * nbytes / _time(both, device, iters=5)
        page = nbytes / _time(lambda: dev.copy_(pageable), device, iters=3)
        del host, host2, dev, dev2, pageable
        torch.cuda.empty_cache()
    else:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        src2, dst2 = torch.ones_like(src), torch.empty_like(src)
        h2d = d2h = nbytes / _time(lambda: dst.copy_(src), device, iters=3)
        dst2.copy_(src2)  # touch every page first: a first write pays page faults, not copying
        secs = min(_concurrent([lambda: dst.copy_(src), lambda: dst2.copy_(src2)]) for _ in range(2))
        duplex = 2 * nbytes / secs
        page = h2d
        notes.append(
            "pcie: no CUDA device; these are host memcpy rates (what the CPU fallback's 'copy in' costs)"
        )
        del src, dst, src2, dst2
    log(
        f"copies: h2d {h2d / 1e9:.1f} GB/s, d2h {d2h / 1e9:.1f} GB/s, both at once {duplex / 1e9:.1f} GB/s, "
        f"pageable h2d {page / 1e9:.1f} GB/s"
    )
    return PCIeProfile(
        h2d_gbps=_sig(h2d / 1e9),
        d2h_gbps=_sig(d2h / 1e9),
        duplex_gbps=_sig(duplex / 1e9),
        pageable_h2d_gbps=_sig(page / 1e9),
    )


def _concurrent(fns: Sequence[Callable[[], object]]) -> float:
    """Wall seconds of running every fn at once on its own thread (the GIL is released by the work)."""
    barrier = threading.Barrier(len(fns) + 1)
    done: list[float] = []

    def run(fn: Callable[[], object]) -> None:
        barrier.wait()
        fn()
        done.append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return max(done) - start


# ---------------------------------------------------------------------------------------------- SSD


@contextlib.contextmanager
def _probe_dirs(dirs: Sequence[str]) -> Iterator[list[Path]]:
    made = []
    try:
        for d in dirs:
            path = Path(d) / f"fuyou-probe-{os.getpid()}"
            path.mkdir(parents=True, exist_ok=True)
            made.append(path)
        yield made
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def _payload(nbytes: int) -> memoryview:
    from fuyou_ray.store import aligned_buffer

    buf = aligned_buffer(nbytes)
    # Incompressible bytes: some drives compress, and zeros would flatter them.
    torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].copy_(
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    )
    return memoryview(buf)


def _store_rates(
    paths: Sequence[Path], nbytes: int, qd: int, src: memoryview, dst: memoryview
) -> tuple[float, float, bool]:
    """(read B/s, write B/s, O_DIRECT?) of one record through a store with `qd` I/O threads."""
    from fuyou_ray.store import SSDTensorStore

    store = SSDTensorStore([str(p) for p in paths], direct_io=True, io_threads=qd, verify_checksums=True)
    try:
        name = f"u{qd:05d}.probe"
        writes, reads = [], []
        for version in range(2):
            start = time.perf_counter()
            store.write_from(name, src, dtype="uint8", numel=nbytes, version=version)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            store.read_into(name, dst)
            reads.append(time.perf_counter() - start)
        return nbytes / min(reads), nbytes / min(writes), all(store.direct)
    finally:
        store.discard_staged()
        store.close()


MIXED_INFLIGHT = 4  # records in flight per direction: the SSD actor's concurrency


def steady_ssd_rates(
    paths: Sequence[str | Path],
    nbytes: int,
    seconds: float,
    *,
    direct_io: bool = True,
    io_threads: int = 8,
    inflight: int = MIXED_INFLIGHT,
    solo: bool = True,
) -> tuple[float, float, float, float]:
    """(read, write, read while writing, write while reading) B/s through `SSDTensorStore`, each measured
    as steady streams for `seconds` with `inflight` records of `nbytes` in flight per direction - the SSD
    actor's concurrency, as the pipeline drives the disk. The probe and the bench both measure this way,
    so a profile and a bench run of one machine agree. Timing single records instead flatters the disk:
    a read timed against one write finishes first and the write then has the disk to itself, and a
    profile measured that way predicted steps ~25% too short on a single virtio disk. `solo` False
    skips the one-direction streams (returned as 0)."""
    from fuyou_ray.store import SSDTensorStore, aligned_buffer

    dirs = [tempfile.mkdtemp(prefix="fuyou-streams-", dir=p) for p in paths]
    store = SSDTensorStore(dirs, direct_io=direct_io, io_threads=io_threads)
    numel = nbytes // 4
    bufs = [aligned_buffer(nbytes) for _ in range(2 * inflight)]
    for b in bufs:  # incompressible bytes: some drives compress, and zeros would flatter them
        torch.frombuffer(b, dtype=torch.uint8)[:nbytes].copy_(
            torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        )
    version = [1]

    def write(i: int) -> None:
        store.write_from(
            f"u{i:05d}.streams", memoryview(bufs[i]), dtype="float32", numel=numel, version=version[0]
        )

    def read(i: int) -> None:
        store.read_into(f"u{i:05d}.streams", memoryview(bufs[i]))

    def stream(op: Callable[[int], None], slots: range, stop: threading.Event, moved: list[int]) -> None:
        k = 0
        while not stop.is_set():
            op(slots[k % len(slots)])
            moved[0] += nbytes
            k += 1

    def run(streams: list[tuple[Callable[[int], None], range]]) -> list[float]:
        stop, moved = threading.Event(), [[0] for _ in streams]
        with ThreadPoolExecutor(inflight * len(streams)) as pool:
            t0 = time.perf_counter()
            futures = [
                pool.submit(stream, op, range(slots.start + w, slots.stop, inflight), stop, moved[n])
                for n, (op, slots) in enumerate(streams)
                for w in range(inflight)
            ]
            time.sleep(seconds)
            stop.set()
            for f in futures:
                f.result()
            elapsed = time.perf_counter() - t0
        return [m[0] / elapsed for m in moved]

    reads, writes = range(0, inflight), range(inflight, 2 * inflight)
    try:
        for i in reads:  # the records the read streams read back
            write(i)
        store.commit(1, {})
        version[0] = 2
        write_rate = read_rate = 0.0
        if solo:
            (write_rate,) = run([(write, writes)])
            store.discard_staged()
            (read_rate,) = run([(read, reads)])
            version[0] = 3
        read_mixed, write_mixed = run([(read, reads), (write, writes)])
        store.discard_staged()
    finally:
        store.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return read_rate, write_rate, read_mixed, write_mixed


def probe_ssd(options: ProbeOptions, log: Callable[[str], None], notes: list[str]) -> SSDProfile:
    dirs = options.ssd_dirs or ("runs/probe-ssd",)
    if not options.ssd_dirs:
        notes.append("ssd: no --ssd given; measured ./runs/probe-ssd, which may not be an SSD")
    nbytes = options.ssd_file_mib * 2**20
    src, dst = _payload(nbytes), _payload(nbytes)
    per_dir: list[SSDDirProfile] = []
    with _probe_dirs(dirs) as paths:
        for d, path in zip(dirs, paths, strict=True):
            rates, direct = [], True
            for qd in options.queue_depths:
                r, w, direct = _store_rates([path], nbytes, qd, src, dst)
                rates.append(SSDRate(qd, _sig(r / 1e9), _sig(w / 1e9)))
                log(f"ssd {d}: queue depth {qd}: read {r / 1e9:.2f} GB/s, write {w / 1e9:.2f} GB/s")
            if not direct:
                notes.append(
                    f"ssd {d}: O_DIRECT refused (tmpfs/overlay?): buffered I/O, the page cache flatters it"
                )
            free = shutil.disk_usage(path).free
            per_dir.append(SSDDirProfile(str(d), direct, free, tuple(rates)))
        if len(paths) > 1:
            striped = []
            for qd in options.queue_depths:
                r, w, _ = _store_rates(paths, nbytes, qd, src, dst)
                striped.append(SSDRate(qd, _sig(r / 1e9), _sig(w / 1e9)))
                log(
                    f"ssd striped over {len(paths)}: queue depth {qd}: "
                    f"read {r / 1e9:.2f}, write {w / 1e9:.2f} GB/s"
                )
        else:
            striped = list(per_dir[0].rates)
        deepest = max(options.queue_depths)
        sr, sw, mr, mw = steady_ssd_rates(paths, nbytes, options.mixed_seconds, io_threads=deepest)
        log(
            f"ssd steady streams ({MIXED_INFLIGHT} records in flight each way, queue depth {deepest}): "
            f"read alone {sr / 1e9:.2f}, write alone {sw / 1e9:.2f}, at once read {mr / 1e9:.2f} + "
            f"write {mw / 1e9:.2f} GB/s"
        )
    return SSDProfile(
        devices=len(dirs),
        rates=tuple(striped),
        mixed_read_gbps=_sig(mr / 1e9),
        mixed_write_gbps=_sig(mw / 1e9),
        steady_read_gbps=_sig(sr / 1e9),
        steady_write_gbps=_sig(sw / 1e9),
        capacity_bytes=sum(d.free_bytes for d in per_dir),
        dirs=tuple(per_dir),
    )


# ---------------------------------------------------------------------------------------------- CPU


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def probe_cpu(
    melements: int, log: Callable[[str], None], notes: list[str], threads: Sequence[int] = ()
) -> CPUProfile:
    from fuyou_ray.cpu_adam import ACTOR_THREADS, HostAdamW, pool_rate

    cores = os.cpu_count() or 1
    n = melements * 1_000_000
    counts = sorted(set(threads) or {1, *[2**k for k in range(1, int(math.log2(cores)) + 1)], cores})
    rates = []
    probe = HostAdamW(1)
    reason = probe.reason
    probe.close()
    for t in counts:
        # As the optimizer actors run it: `t` threads in all, in updaters of up to ACTOR_THREADS threads,
        # each on its own memory, at once. (On the H100 box one updater of 16 threads measured 2.78
        # Gparam/s, the pipeline's 4 actors of 3 threads 3.4-4.0.)
        pool = max(1, t // ACTOR_THREADS)
        rate = pool_rate(n, t // pool, pool) / 1e9
        rates.append(AdamRate(t, _sig(rate)))
        log(f"cpu: AdamW ({reason}) on {t} thread(s) ({pool} updater(s) at once): {rate:.3f} Gparam/s")
    try:
        shm = shutil.disk_usage("/dev/shm").total
    except OSError:
        shm = 0
        notes.append("cpu: no /dev/shm")
    return CPUProfile(
        name=_cpu_name(), cores=cores, memory_bytes=_host_memory(), shm_bytes=shm, adam=tuple(rates)
    )


def probe_host_cache(
    mib: int,
    log: Callable[[str], None],
    notes: list[str],
    concurrency: int = 4,
    threads: int = 0,
    passes: int = 2,
) -> float:
    """Bytes/s of the host cache's copies as the SSD actor runs them (0 when /dev/shm lacks room).

    The actor serves up to `concurrency` calls at once (its max_concurrency, fuyou_ray/executor.py); its
    `HostCache` splits each record into 4 MiB chunks over `threads` threads (0: `copy_threads()`, the
    default of runtime.cache_threads).
    Half the calls read a cached record (its /dev/shm file copied into a ring slot, a shared-memory
    segment), half write one (a slot copied into a new version's file: after the first pass into the
    recycled pages of a retired version, as in a steady step) - `mib` MiB in all per pass, the best of
    `passes`. Reads alone and writes alone are logged for reference.
    """
    from fuyou_ray.cache import HostCache, cache_prefix, copy_threads

    threads = copy_threads(threads)
    from fuyou_ray.ring import Ring, RingMapping, _shm_free_bytes, make_spec
    from fuyou_ray.store import align_up

    per = align_up(max(1, mib * 2**20 // concurrency))
    spec = make_spec(per, 2 * concurrency)
    need = spec.total_bytes + 3 * concurrency * per  # the slots, the cached records, one pass's writes
    free = _shm_free_bytes()
    if free is not None and free < need:
        notes.append(
            f"cpu.memcpy_gbps: not measured (/dev/shm has {free >> 20} MiB free, needs {need >> 20} MiB); "
            "plans assume the default rate"
        )
        return 0.0
    with Ring(spec):
        mapping = RingMapping(spec)
        cache = HostCache(cache_prefix(spec), threads)
        try:
            slots = [mapping.memoryview(spec.slot(i)) for i in range(spec.num_slots)]
            for i, view in enumerate(slots):
                view[:] = bytes([i + 1]) * per  # touch every page: a first touch pays page faults
            for k in range(concurrency):
                cache.write(f"u{k:05d}.cached", 0, slots[k])
            version = 0

            def timed(reads: int, writes: int) -> float:
                nonlocal version
                best = math.inf
                for _ in range(passes):
                    version += 1
                    jobs: list[Callable[[], object]] = [
                        functools.partial(cache.read, f"u{k:05d}.cached", 0, slots[concurrency + k])
                        for k in range(reads)
                    ]
                    jobs += [
                        functools.partial(cache.write, f"u{k:05d}.new", version, slots[k])
                        for k in range(writes)
                    ]
                    best = min(best, _concurrent(jobs))
                    cache.keep_only({(f"u{k:05d}.cached", 0) for k in range(concurrency)})
                return (reads + writes) * per / best

            read = timed(concurrency, 0)
            write = timed(0, concurrency)
            mixed = timed(concurrency // 2, concurrency - concurrency // 2)
            for view in slots:
                view.release()  # before the mapping closes (an exported mmap cannot be closed)
        finally:
            cache.remove_all()
            cache.close()
            mapping.close()
    log(
        f"host cache copies ({concurrency} at once, {threads} threads): cache -> ring {read / 1e9:.2f} GB/s, "
        f"ring -> cache {write / 1e9:.2f} GB/s, both at once {mixed / 1e9:.2f} GB/s"
    )
    return mixed


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
