"""fuyou-ray against its peers on the same machine, model, batch and budgets, back to back, with ratios.

    python examples/baselines/compare.py CONFIG --dir /mnt/nvme/cmp [--steps 2] [--only fuyou,zero-nvme,...]
    python examples/baselines/compare.py --table DIR/compare-*.json      # print the table of earlier runs

Runs, each in its own process (so every peak RSS and GPU figure is its own), in this order:
  fuyou      `python -m fuyou_ray bench CONFIG` (its run dir and store under DIR/fuyou)
  zero-nvme  DeepSpeed ZeRO-3, params + optimizer state on NVMe (ZeRO-Infinity), swap files under DIR/ds
  zero-cpu   DeepSpeed ZeRO-3, params + optimizer state in pinned CPU memory (ZeRO-Offload)
  torch      plain in-GPU PyTorch under the gpu_mem cap, and `torch-uncapped` without it
(see examples/baselines/peer.py for what each peer runs). Each result is written to
DIR/compare-<name>.json as it finishes, so a run split over several sessions (`--only`) is combined by
`--table`. The table gives step time, model TFLOPS, fuyou-ray's speed-up over each peer, peak GPU memory
and peak RSS against the budgets, and whether the peer fits at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("fuyou", "zero-nvme", "zero-cpu", "torch", "torch-uncapped")
GIB = 1024**3


class HostMemorySampler:
    """Peak host memory in use (MemTotal - MemAvailable, so /dev/shm and pinned buffers count, the
    reclaimable page cache does not) above its value at start, sampled every 0.2 s while a system runs.
    The same yardstick for every system: per-process RSS double-counts fuyou-ray's shared ring (every
    actor that maps a slot counts its pages) and misses nothing DeepSpeed allocates."""

    def __init__(self) -> None:
        self.baseline = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used() -> int:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> HostMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_above_start(self) -> int:
        return max(0, self.peak - self.baseline)


def run_fuyou(config: str, out_dir: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    run_dir, ssd = out_dir / "fuyou" / "run", out_dir / "fuyou" / "ssd"
    cmd = [
        sys.executable,
        "-m",
        "fuyou_ray",
        "bench",
        config,
        "--steps",
        str(steps),
        "--set",
        f"run_dir={run_dir}",
        "--set",
        f"ssd.paths=[{ssd}]",
    ]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    sys.stdout.write(proc.stdout[-6000:])
    bench = run_dir / "bench.json"
    if proc.returncode != 0 or not bench.exists():
        wall = time.perf_counter() - t0
        return {"mode": "fuyou", "status": "error", "error": proc.stderr[-2000:], "wall_s": wall}
    r = json.loads(bench.read_text())
    # keep the bench's own record and picture: the run dir is removed to free the disk for the next system
    shutil.copy(bench, out_dir / "fuyou-bench.json")
    if (run_dir / "timeline.png").exists():
        shutil.copy(run_dir / "timeline.png", out_dir / "fuyou-timeline.png")
    # one MemoryReport per process (driver and each actor): peak RSS above that process's baseline
    per_process = [m.get("peak_above_baseline", 0) for m in r.get("memory", [])]
    rss, total_rss = max(per_process, default=0), sum(per_process)
    cpu_budget = r["config"]["budgets"]["cpu_mem"]
    return {
        "mode": "fuyou",
        "status": "ok",
        "params": r["params"],
        "tokens_per_step": r["tokens_per_step"],
        "step_s": r["step_s"],
        "steps_s": r["steps_s"],
        "model_tflops": r["model_tflops"],
        "efficiency": r["efficiency"],
        "bottleneck": r["bottleneck"],
        "peak_gpu_bytes": r["peak_gpu_bytes"],
        "peak_rss_above_start_bytes": total_rss,
        "largest_actor_rss_bytes": rss,
        "within_cpu_mem": total_rss <= cpu_budget + 2 * GIB,
        "wall_s": time.perf_counter() - t0,
    }


def run_peer(mode: str, config: str, out_dir: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    out = out_dir / f"peer-{mode}.json"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "baselines" / "peer.py"),
        config,
        "--steps",
        str(steps),
        "--out",
        str(out),
    ]
    if mode == "torch-uncapped":
        cmd += ["--mode", "torch", "--no-gpu-cap"]
    else:
        cmd += ["--mode", mode]
    if mode == "zero-nvme":
        cmd += ["--nvme", str(out_dir / "ds")]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    sys.stdout.write(proc.stdout[-3000:])
    if not out.exists():
        wall = time.perf_counter() - t0
        return {"mode": mode, "status": "error", "error": proc.stderr[-2000:], "wall_s": wall}
    r: dict[str, Any] = json.loads(out.read_text())
    r["mode"] = mode
    r["wall_s"] = time.perf_counter() - t0
    if r["status"] != "ok":
        r.setdefault("stderr_tail", proc.stderr[-2000:])
    return r


def table(results: list[dict[str, Any]]) -> str:
    by = {r["mode"]: r for r in results}
    fuyou = by.get("fuyou")
    lines = [
        f"{'system':<16}{'status':<8}{'step s':>9}{'TFLOPS':>9}{'fuyou x':>9}{'GPU GiB':>9}{'host GiB':>10}"
        f"{'cpu_mem ok':>11}"
    ]
    for mode in PEERS:
        r = by.get(mode)
        if r is None:
            continue
        ok = r["status"] == "ok"
        step = f"{r['step_s']:.2f}" if ok else "-"
        tflops = f"{r['model_tflops']:.1f}" if ok else "-"
        speedup = ""
        if ok and fuyou and fuyou["status"] == "ok" and mode != "fuyou":
            speedup = f"{r['step_s'] / fuyou['step_s']:.2f}"
        host = r.get("host_mem_peak_above_start_bytes")
        # results recorded before the host-wide sampler existed carry per-process RSS only (marked *)
        host_text = (
            f"{host / GIB:.1f}"
            if host is not None
            else f"{r.get('peak_rss_above_start_bytes', 0) / GIB:.1f}*"
        )
        lines.append(
            f"{mode:<16}{r['status']:<8}{step:>9}{tflops:>9}{speedup:>9}"
            f"{r.get('peak_gpu_bytes', 0) / GIB:>9.1f}{host_text:>10}"
            f"{('yes' if r.get('within_cpu_mem') else 'no'):>11}"
        )
        if not ok:
            lines.append(f"    {r.get('error', '')[:300]}")
    lines.append(
        "fuyou x = the peer's step time / fuyou-ray's (higher: fuyou-ray faster). host GiB: peak host memory "
        "in use above its value before the system started (MemTotal - MemAvailable: /dev/shm and pinned "
        "buffers count; * = per-process RSS, summed over fuyou-ray's processes). cpu_mem ok: host GiB <= "
        "cpu_mem + 2 GiB."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--dir", help="scratch directory on the SSD: stores, swap files, results")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all)")
    p.add_argument("--table", nargs="*", metavar="JSON", help="print the table of earlier results and exit")
    args = p.parse_args()
    if args.table is not None:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return
    if not args.config or not args.dir:
        p.error("CONFIG and --dir are needed (or --table FILES)")
    out_dir = Path(args.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from fuyou_ray.config import load_config

    cpu_budget = load_config(args.config, args.set).budgets.cpu_mem
    results = []
    for mode in args.only.split(","):
        if mode not in PEERS:
            p.error(f"--only: {mode!r} is not one of {PEERS}")
        print(f"=== {mode}", flush=True)
        with HostMemorySampler() as host:
            if mode == "fuyou":
                r = run_fuyou(args.config, out_dir, args.steps, args.set)
            else:
                r = run_peer(mode, args.config, out_dir, args.steps, args.set)
        r["host_mem_peak_above_start_bytes"] = host.peak_above_start
        r["cpu_mem_budget"] = cpu_budget
        r["within_cpu_mem"] = host.peak_above_start <= cpu_budget + 2 * GIB
        r["config_file"] = args.config
        r["overrides"] = args.set
        (out_dir / f"compare-{mode}.json").write_text(json.dumps(r, indent=2, default=str))
        results.append(r)
        # free the disk for the next system (stores and swap files are tens of GB)
        for sub in ("fuyou", "ds"):
            subprocess.run(["rm", "-rf", str(out_dir / sub)], check=False)
        os.sync()
    print(table(results))


if __name__ == "__main__":
    main()
