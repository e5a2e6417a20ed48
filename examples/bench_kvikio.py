"""KvikIO against the store's POSIX O_DIRECT path, on the same directory, record size and concurrency.

    python examples/bench_kvikio.py /mnt/nvme/scratch [--gib 4] [--record-mib 256] [--inflight 4]

The SSD actor moves records between pinned host ring slots and the SSD. This times that traffic two ways,
alternating over `--rounds`: (a) `SSDTensorStore` (O_DIRECT, `--threads` chunk requests per record, as the
pipeline runs it, checksums included) and (b) KvikIO's `CuFile.pread/pwrite` from the same kind of pinned
host buffer (its thread pool, `KVIKIO_NTHREADS` = `--threads`; GPUDirect Storage where the machine has it,
else KvikIO's POSIX compatibility mode), plus (c) KvikIO reading straight into device memory, the path
that would skip the host bounce if GDS were available. Prints one JSON object with every rate and which
mode KvikIO ran in; the store keeps its POSIX path unless (b) beats (a).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fuyou_ray.store import SSDTensorStore


def store_rates(
    root: Path, nbytes: int, count: int, bufs: list[torch.Tensor], threads: int
) -> dict[str, float]:
    d = root / "store"
    shutil.rmtree(d, ignore_errors=True)
    store = SSDTensorStore([d], io_threads=threads, background_unlink=False)
    inflight = len(bufs)

    def view(i: int) -> memoryview:
        return memoryview(bufs[i % inflight].numpy()).cast("B")

    try:
        with ThreadPoolExecutor(inflight) as pool:
            t0 = time.perf_counter()
            list(
                pool.map(
                    lambda i: store.write_from(
                        f"u{i:05d}.b", view(i), dtype="uint8", numel=nbytes, version=1
                    ),
                    range(count),
                )
            )
            write_s = time.perf_counter() - t0
            store.commit(1, {})
            t0 = time.perf_counter()
            list(pool.map(lambda i: store.read_into(f"u{i:05d}.b", view(i)), range(count)))
            read_s = time.perf_counter() - t0
    finally:
        store.close()
        shutil.rmtree(d, ignore_errors=True)
    return {"write_GBps": count * nbytes / write_s / 1e9, "read_GBps": count * nbytes / read_s / 1e9}


def kvikio_rates(root: Path, nbytes: int, count: int, bufs: list[Any]) -> dict[str, float]:
    import kvikio

    d = root / "kvikio"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    inflight = len(bufs)

    def write(i: int) -> None:
        with kvikio.CuFile(d / f"u{i:05d}.b", "w") as f:
            f.pwrite(bufs[i % inflight]).get()

    def read(i: int) -> None:
        with kvikio.CuFile(d / f"u{i:05d}.b", "r") as f:
            f.pread(bufs[i % inflight]).get()

    try:
        with ThreadPoolExecutor(inflight) as pool:
            t0 = time.perf_counter()
            list(pool.map(write, range(count)))
            os.sync()
            write_s = time.perf_counter() - t0
            for i in range(count):  # drop what the page cache holds of them (compat mode is buffered)
                fd = os.open(d / f"u{i:05d}.b", os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            t0 = time.perf_counter()
            list(pool.map(read, range(count)))
            read_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"write_GBps": count * nbytes / write_s / 1e9, "read_GBps": count * nbytes / read_s / 1e9}


def _setting(name: str) -> str:
    """A KvikIO setting, through whichever accessor this KvikIO version has."""
    import kvikio.defaults

    getter = getattr(kvikio.defaults, "get", None)
    try:
        return str(getter(name) if getter else getattr(kvikio.defaults, name)())
    except Exception as e:  # the setting's name differs between versions: say so instead of failing the run
        return f"unknown ({type(e).__name__})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--record-mib", type=int, default=256)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("KVIKIO_NTHREADS", str(a.threads))
    import kvikio
    import kvikio.defaults

    nbytes = a.record_mib << 20
    count = max(a.inflight, int(a.gib * 1024 / a.record_mib))
    host = [torch.empty(nbytes, dtype=torch.uint8).pin_memory().random_(0, 255) for _ in range(a.inflight)]
    out: dict[str, Any] = {
        "kvikio_version": kvikio.__version__,
        "kvikio_compat_mode": _setting("compat_mode"),
        "kvikio_threads": _setting("num_threads"),
        "record_MiB": a.record_mib,
        "GiB": count * nbytes / 2**30,
    }
    results: dict[str, list[dict[str, float]]] = {"store": [], "kvikio_host": [], "kvikio_device": []}
    device = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(a.inflight)]
    for r in range(a.rounds):
        order = (
            ("store", "kvikio_host", "kvikio_device")
            if r % 2 == 0
            else ("kvikio_device", "kvikio_host", "store")
        )
        for name in order:
            if name == "store":
                results[name].append(store_rates(a.dir, nbytes, count, host, a.threads))
            elif name == "kvikio_host":
                results[name].append(kvikio_rates(a.dir, nbytes, count, [h.numpy() for h in host]))
            else:
                import cupy

                results[name].append(kvikio_rates(a.dir, nbytes, count, [cupy.asarray(t) for t in device]))
    for name, runs in results.items():
        for key in ("write_GBps", "read_GBps"):
            out[f"{name}_{key}"] = statistics.median(x[key] for x in runs)
    out["kvikio_host_vs_store_read"] = out["kvikio_host_read_GBps"] / out["store_read_GBps"]
    out["kvikio_host_vs_store_write"] = out["kvikio_host_write_GBps"] / out["store_write_GBps"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
