"""Planner validation on paper: predict the Fuyou paper's throughput on its testbed and compare.

    python examples/paper_testbed.py [--profile configs/profiles/rtx4090-fuyou-testbed.yaml] [--quick]

For GPT-3 13B (batch 8..128) and 175B (batch 8, 16, 32) at sequence length 1024 on one RTX 4090, 768 GB of
RAM and 12 P5510 SSDs, and the 13B SSD-count sweep (1/2/3/6/12 SSDs at batch 32 and 64), it runs the
automatic planner (fuyou_ray.plan.auto_plan) and the event simulator on the testbed's hardware profile,
and prints each prediction beside the published figure (../shared/reference/fuyou.md, arXiv 2403.06504).

Fuyou's placement, which the comparison holds the planner to: fp16 params in CPU memory, fp32 master
weights and Adam moments on SSD (the paper's premise: CPU memory is a staging buffer, not a store), no
parameters kept on the GPU across steps, and no gradient clipping (its optimizer overlaps backward). The
planner chooses the rest: micro-batch chunk, prefetch depth, ring size, and which blocks keep, recompute
or swap their activations. A second table lets the planner use the 768 GB freely (what fuyou-ray would do on
that machine), and a third checks the GPU memory of each configuration when a layer takes the whole batch
at once, as Fuyou does. docs/BENCHMARKS.md ("Planner validation") records the output and the assumptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

from fuyou_ray.config import RunConfig, config_from_dict, format_size
from fuyou_ray.costmodel import chunk_working_sets, gpu_memory
from fuyou_ray.errors import BudgetError
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import PlannerOptions, PlanResult, auto_plan, base_plan, workload_of
from fuyou_ray.profile import AdamRate, HardwareProfile, load_profile

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "configs" / "profiles" / "rtx4090-fuyou-testbed.yaml"
GPU_MEM = "23GiB"  # a 24 GiB RTX 4090 less ~1 GiB for the CUDA context, cuBLAS workspaces, allocator slack
CPU_MEM = "640GiB"  # 768 GB (715 GiB) of DDR4 less the OS, page cache and the processes' own memory

# Published throughput, TFLOPS (../shared/reference/fuyou.md). None: out of memory.
PUB_13B = {8: 42.8, 16: 84.3, 32: 143.1, 64: 155.8, 128: 153.8}
PUB_175B: dict[int, float | None] = {8: 52.6, 16: 86.9, 32: None}
PUB_SSDS = {32: [37.5, 64.3, 81.1, 121.7, 142.0], 64: [70.3, 111.7, 136.3, 151.5, 148.2]}
SSD_COUNTS = [1, 2, 3, 6, 12]

FUYOU = PlannerOptions(cache=("params",), gpu_resident=False)
MODELS = {
    "13B": {"vocab_size": 50257, "n_layer": 40, "n_head": 40, "d_model": 5120, "max_seq_len": 2048},
    "175B": {"vocab_size": 50257, "n_layer": 96, "n_head": 96, "d_model": 12288, "max_seq_len": 2048},
}


def gpt3(name: str, batch: int) -> RunConfig:
    return config_from_dict(
        {
            "model": MODELS[name],
            "batch": {"global_batch": batch, "micro_batch": batch, "seq_len": 1024},
            "optimizer": {"max_grad_norm": 0.0},
            "budgets": {"gpu_mem": GPU_MEM, "cpu_mem": CPU_MEM},
            "runtime": {"device": "cpu"},  # planning only: the device comes from the profile
        }
    )


def plan(name: str, batch: int, profile: HardwareProfile, options: PlannerOptions) -> PlanResult | str:
    cfg = gpt3(name, batch)
    try:
        return auto_plan(cfg, SPECS[name], profile, options)
    except BudgetError as exc:
        return f"does not fit: {str(exc).split(':')[0]}"


def choices(r: PlanResult) -> str:
    p, w = r.plan, r.workload
    pol = Counter(p.policy(u) for u in w.blocks())
    acts = ", ".join(f"{k} {v}" for k, v in sorted(pol.items()))
    cached = f"; state cached {len(p.cpu_cached_state)}/{w.num_units}" if p.cpu_cached_state else ""
    return f"chunk {p.micro_batch}, prefetch {p.prefetch_depth}, ring {p.num_slots}; {acts}{cached}"


def row(label: str, r: PlanResult | str, published: float | None) -> str:
    pub = "OOM" if published is None else f"{published:.1f}"
    if isinstance(r, str):
        return f"| {label} | {r} | {pub} | - | - | - |"
    pred = r.prediction
    err = "-" if published is None else f"{(pred.tflops / published - 1) * 100:+.0f}%"
    work = pred.work.as_dict()
    busy = " / ".join(f"{work[k]:.1f}" for k in ("gpu", "pcie", "ssd", "cpu"))
    return (
        f"| {label} | {pred.tflops:.1f} | {pub} | {err} | {pred.step_s:.1f} s, {pred.bottleneck}; {busy} | "
        f"{choices(r)} |"
    )


HEADER = (
    "| config | predicted TFLOPS | published | error | step; T_gpu / T_pcie / T_ssd / T_cpu (s) | plan |\n"
    "|---|---|---|---|---|---|"
)


def whole_batch_memory(name: str, batch: int, profile: HardwareProfile) -> str:
    """Device memory when a block takes the whole batch in one chunk (no prefetch, blocks recomputed; the
    head, whose fp32 logits would need vocab x tokens x 14 B, is left chunked as any implementation does)."""
    cfg = gpt3(name, batch)
    spec = SPECS[name]
    base = base_plan(cfg, spec, profile)
    w = workload_of(cfg, spec, base.device, batch)
    pol = tuple("recompute" if w.kind(u) == "block" else "keep" for u in range(w.num_units))
    plan = dataclasses.replace(base, micro_batch=batch, activation_policy=pol)
    need = gpu_memory(w, plan)
    block, _ = chunk_working_sets(w, plan)
    total = need.total - need.parts["one chunk's working set"] + block
    fits = "fits" if total <= cfg.budgets.gpu_mem else "out of memory"
    held = f"{format_size(total)} ({format_size(block)} in one block's pass)"
    return f"| GPT-3 {name} batch {batch} | {held} | {fits} |"


SPECS: dict[str, ModelSpec] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=str(PROFILE))
    parser.add_argument("--quick", action="store_true", help="only the Fuyou-placement tables")
    parser.add_argument(
        "--adam-gparams", type=float, default=0.0, help="replace the profile's AdamW rate (sensitivity)"
    )
    parser.add_argument(
        "--params-on-ssd", action="store_true", help="Fuyou's placement with the fp16 params on SSD too"
    )
    args = parser.parse_args()
    profile = load_profile(args.profile)
    if args.adam_gparams > 0:
        adam = (AdamRate(1, args.adam_gparams),)  # flat: the pool's total whatever its threads
        profile = dataclasses.replace(profile, cpu=dataclasses.replace(profile.cpu, adam=adam))
        print(f"sensitivity: AdamW at {args.adam_gparams} Gparam/s")
    if args.params_on_ssd:
        global FUYOU
        FUYOU = dataclasses.replace(FUYOU, cache=())
        print("sensitivity: params on SSD too")
    t0 = time.perf_counter()
    for name in MODELS:
        SPECS[name] = ModelSpec(gpt3(name, 8).model)
    print(f"profile: {profile.name} ({args.profile})")
    print(f"budgets: gpu_mem {GPU_MEM}, cpu_mem {CPU_MEM}; sequence length 1024; no gradient clipping\n")

    where = "params and state on SSD" if args.params_on_ssd else "params in RAM, state on SSD"
    print(f"GPT-3 13B and 175B on one RTX 4090, 12 SSDs, Fuyou's placement ({where})\n")
    print(HEADER)
    for batch, pub in PUB_13B.items():
        print(row(f"13B batch {batch}", plan("13B", batch, profile, FUYOU), pub), flush=True)
    for batch, pub175 in PUB_175B.items():
        print(row(f"175B batch {batch}", plan("175B", batch, profile, FUYOU), pub175), flush=True)

    print("\n13B, SSD count (RAID0 of P5510), Fuyou's placement\n")
    print(HEADER)
    for batch, pubs in PUB_SSDS.items():
        for n, pub in zip(SSD_COUNTS, pubs, strict=True):
            result = plan("13B", batch, profile.with_ssd_devices(n), FUYOU)
            print(row(f"13B batch {batch}, {n} SSD", result, pub), flush=True)

    print("\nGPU memory with the whole batch in one chunk per layer (Fuyou's execution), budget 23 GiB\n")
    print("| config | device memory needed | |\n|---|---|---|")
    for name, batch in (("13B", 32), ("13B", 64), ("13B", 128), ("175B", 8), ("175B", 16), ("175B", 32)):
        print(whole_batch_memory(name, batch, profile))

    if not args.quick:
        print("\nThe same machine, fuyou-ray's own plan (CPU memory may cache optimizer state too)\n")
        print(HEADER)
        free = PlannerOptions()
        for batch, pub in PUB_13B.items():
            print(row(f"13B batch {batch}", plan("13B", batch, profile, free), pub), flush=True)
        for batch, pub175 in PUB_175B.items():
            print(row(f"175B batch {batch}", plan("175B", batch, profile, free), pub175), flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
