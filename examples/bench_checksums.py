"""What the store's CRC-32 checksums cost: SSD write and read rates with and without them.

    python examples/bench_checksums.py /mnt/nvme/scratch [--gib 8] [--record-mib 256] [--inflight 4]

Writes and reads `--gib` of records through `SSDTensorStore` as the SSD actor does (`--inflight` records
at once, `io_threads` chunk requests each), once with the store's checksums and once with the CRC
function replaced by a no-op, alternating the order over `--rounds` rounds. A step of the pipeline is
bound by the SSD on a machine whose state does not fit in memory, so the slowdown of the store is the
checksums' share of the step time. Prints one JSON object; needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuyou_ray.store as store_mod
from fuyou_ray.store import SSDTensorStore, aligned_buffer


def run(
    root: Path, gib: float, record_mib: int, inflight: int, threads: int, checksums: bool
) -> dict[str, float]:
    store_mod.zlib.crc32 = zlib.crc32 if checksums else (lambda data, value=0: 0)  # type: ignore[misc]
    d = root / ("crc" if checksums else "nocrc")
    shutil.rmtree(d, ignore_errors=True)
    store = SSDTensorStore([d], io_threads=threads, verify_checksums=checksums, background_unlink=False)
    nbytes = record_mib << 20
    count = max(inflight, int(gib * 1024 / record_mib))
    bufs = [aligned_buffer(nbytes) for _ in range(inflight)]
    for b in bufs:
        b.write(bytes(range(256)) * (nbytes // 256))
    try:
        with ThreadPoolExecutor(inflight) as pool:
            t0 = time.perf_counter()
            list(
                pool.map(
                    lambda i: store.write_from(
                        f"u{i:05d}.bench",
                        memoryview(bufs[i % inflight]),
                        dtype="uint8",
                        numel=nbytes,
                        version=1,
                    ),
                    range(count),
                )
            )
            write_s = time.perf_counter() - t0
            store.commit(1, {})
            t0 = time.perf_counter()
            list(
                pool.map(
                    lambda i: store.read_into(f"u{i:05d}.bench", memoryview(bufs[i % inflight])), range(count)
                )
            )
            read_s = time.perf_counter() - t0
    finally:
        store.close()
        shutil.rmtree(d, ignore_errors=True)
        store_mod.zlib.crc32 = zlib.crc32  # type: ignore[misc]
    total = count * nbytes
    return {"write_GBps": total / write_s / 1e9, "read_GBps": total / read_s / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--record-mib", type=int, default=256)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    buf = bytes(64 << 20)
    t0 = time.perf_counter()
    for _ in range(8):
        zlib.crc32(buf)
    crc_gbps = 8 * len(buf) / (time.perf_counter() - t0) / 1e9
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(a.rounds):
        for checksums in (True, False) if r % 2 == 0 else (False, True):
            results[checksums].append(run(a.dir, a.gib, a.record_mib, a.inflight, a.threads, checksums))
    out: dict[str, float] = {"crc32_one_core_GBps": crc_gbps}
    for key in ("write_GBps", "read_GBps"):
        with_crc = statistics.median(x[key] for x in results[True])
        without = statistics.median(x[key] for x in results[False])
        out[f"{key}_with_crc"] = with_crc
        out[f"{key}_without"] = without
        out[f"{key.split('_')[0]}_cost_pct"] = 100 * (without / with_crc - 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
