"""One peer training run on the same model, batch, precision and budgets as `fuyou-ray bench CONFIG`.

    python examples/baselines/peer.py CONFIG --mode zero-nvme --nvme /mnt/nvme/ds --out r.json [--steps 2]
    python examples/baselines/peer.py CONFIG --mode zero-cpu --out r.json
    python examples/baselines/peer.py CONFIG --mode torch --out r.json [--no-gpu-cap]

Modes (the peers of issue 9):
  zero-nvme  DeepSpeed ZeRO-3 with params and optimizer state offloaded to NVMe (ZeRO-Infinity), DeepSpeed's
             CPU Adam; its async I/O (block size, queue depth, intra-op parallelism) taken from a short
             sweep of DeepNVMe handles on the same directory first (`--aio-tune`: the knobs that
             ds_nvme_tune sweeps), pinned swap buffers.
  zero-cpu   DeepSpeed ZeRO-3 with params and optimizer state offloaded to pinned CPU memory (ZeRO-Offload).
  torch      plain in-GPU PyTorch: fp32 weights and fused AdamW on the GPU, bf16 autocast.
All of them: the model of the config (fuyou_ray's own GPT units assembled into one module), bf16 compute,
the config's global batch and micro-batch (gradient accumulation over micro-batches), activation
checkpointing of every block (fuyou-ray recomputes each block's forward in backward too), the config's
AdamW hyper-parameters and gradient clipping, random tokens (step time does not depend on their values),
the module's default weight init. `budgets.gpu_mem` is enforced with torch's per-process memory fraction
(`--no-gpu-cap` lifts it, to time the plain model where it only fits uncapped); `budgets.cpu_mem` cannot
be enforced on DeepSpeed, so the peak RSS is measured and compared with it.

Writes one JSON object (also printed): status ("ok", "oom" = does not fit the budgets, "error"), step times,
model TFLOPS (the same formula as fuyou-ray's bench), peak GPU memory, peak RSS, the DeepSpeed config used.
DeepSpeed itself is not part of this repository: see examples/baselines/README.md for how it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fuyou_ray.config import RunConfig, load_config
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.gpt import lm_loss

GIB = 1024**3


class PlainGPT(nn.Module):
    """fuyou-ray's units of the config as one resident module that returns the mean LM loss."""

    def __init__(self, spec: ModelSpec, recompute: bool) -> None:
        super().__init__()
        self.units = nn.ModuleList(spec.build_unit(i, "cpu") for i in range(spec.num_units))
        self.recompute = recompute

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.units[0](tokens)
        for block in self.units[1:-1]:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return lm_loss(self.units[-1](x), targets)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def aio_sweep(nvme: Path, mib: int = 512) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Time DeepNVMe read and write at the block sizes / queue depths / intra-op parallelism that
    ds_nvme_tune sweeps by default, on `nvme`; return the best setting (by the slower of read and write)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load()
    nbytes = mib << 20
    buf = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    buf.random_(0, 255)
    path = str(nvme / "aio-sweep.bin")
    results = []
    for block in (1 << 20, 8 << 20):
        for depth in (32, 128):
            for parallel in (1, 4, 8):
                handle = aio.aio_handle(block, depth, False, True, parallel)
                t0 = time.perf_counter()
                handle.sync_pwrite(buf, path)
                os.sync()
                write = nbytes / (time.perf_counter() - t0)
                os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                handle.sync_pread(buf, path)
                read = nbytes / (time.perf_counter() - t0)
                results.append(
                    {
                        "block_size": block,
                        "queue_depth": depth,
                        "intra_op_parallelism": parallel,
                        "read_GBps": read / 1e9,
                        "write_GBps": write / 1e9,
                    }
                )
    os.unlink(path)
    best = max(results, key=lambda r: min(r["read_GBps"], r["write_GBps"]))
    return best, results


def deepspeed_config(
    cfg: RunConfig, spec: ModelSpec, mode: str, nvme: Path | None, aio: dict[str, Any] | None
) -> dict[str, Any]:
    o, b = cfg.optimizer, cfg.batch
    largest = max(p.numel() for i in range(spec.num_units) for p in spec.build_unit(i).parameters())
    device = "nvme" if mode == "zero-nvme" else "cpu"
    param: dict[str, Any] = {"device": device, "pin_memory": True}
    optimizer: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        # buffer_size must hold the largest parameter (the embedding / LM head); 5 buffers as in DeepSpeed's
        # ZeRO-Infinity tutorial; max_in_cpu is DeepSpeed's default (1e9 elements, within cpu_mem here).
        param |= {
            "nvme_path": str(nvme),
            "buffer_count": 5,
            "buffer_size": max(int(1e8), largest),
            "max_in_cpu": int(1e9),
        }
        optimizer |= {"nvme_path": str(nvme), "buffer_count": 4, "fast_init": False}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.global_batch // b.micro_batch,
        "gradient_clipping": o.max_grad_norm if o.max_grad_norm > 0 else 0.0,
        "bf16": {"enabled": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        },
        "zero_optimization": {
            "stage": 3,
            "offload_param": param,
            "offload_optimizer": optimizer,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": int(1e9),
            "stage3_prefetch_bucket_size": int(5e8),
            "stage3_param_persistence_threshold": int(1e6),
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if aio is not None:
        ds["aio"] = {
            "block_size": aio["block_size"],
            "queue_depth": aio["queue_depth"],
            "intra_op_parallelism": aio["intra_op_parallelism"],
            "single_submit": False,
            "overlap_events": True,
            "use_gds": False,
        }
    return ds


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.set)
    spec = ModelSpec(cfg.model)
    b = cfg.batch
    tokens = b.global_batch * b.seq_len
    result: dict[str, Any] = {
        "mode": args.mode,
        "params": spec.numel,
        "tokens_per_step": tokens,
        "batch": f"{b.global_batch}x{b.seq_len} (micro {b.micro_batch})",
        "gpu_mem_budget": cfg.budgets.gpu_mem,
        "cpu_mem_budget": cfg.budgets.cpu_mem,
        "gpu_cap": not args.no_gpu_cap,
        "status": "error",
    }
    rss0 = rss_bytes()
    torch.cuda.init()
    if not args.no_gpu_cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.budgets.gpu_mem / total))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    accum = b.global_batch // b.micro_batch
    micro = [
        torch.randint(0, cfg.model.vocab_size, (b.micro_batch, b.seq_len + 1), generator=gen)
        for _ in range(accum)
    ]
    o = cfg.optimizer
    t_init = time.perf_counter()
    try:
        if args.mode == "torch":
            model = PlainGPT(spec, recompute=True).cuda()
            opt = torch.optim.AdamW(
                model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True
            )

            def step() -> float:
                total_loss = 0.0
                for m in micro:
                    x, y = m[:, :-1].cuda(non_blocking=True), m[:, 1:].cuda(non_blocking=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(x, y) / accum
                    loss.backward()
                    total_loss += float(loss.detach())
                if o.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return total_loss
        else:
            import deepspeed

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            deepspeed.init_distributed(dist_backend="nccl")
            nvme = Path(args.nvme) if args.nvme else None
            aio = None
            if args.mode == "zero-nvme":
                if nvme is None:
                    raise SystemExit("--mode zero-nvme needs --nvme DIR")
                nvme.mkdir(parents=True, exist_ok=True)
                if args.aio_tune:
                    aio, sweep = aio_sweep(nvme)
                    result["aio_sweep"] = sweep
                else:
                    aio = {"block_size": 1 << 20, "queue_depth": 32, "intra_op_parallelism": 8}
            ds = deepspeed_config(cfg, spec, args.mode, nvme, aio)
            result["deepspeed_config"] = ds
            result["deepspeed_version"] = deepspeed.__version__
            with deepspeed.zero.Init(
                config_dict_or_path=ds,
                remote_device=ds["zero_optimization"]["offload_param"]["device"],
                pin_memory=True,
                dtype=torch.bfloat16,
            ):
                model = PlainGPT(spec, recompute=True)
            params = model.parameters()
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)

            def step() -> float:
                total_loss = 0.0
                for m in micro:
                    x, y = m[:, :-1].cuda(non_blocking=True), m[:, 1:].cuda(non_blocking=True)
                    loss = engine(x, y)
                    engine.backward(loss)
                    engine.step()
                    total_loss += float(loss.detach()) / accum
                return total_loss

        result["init_s"] = time.perf_counter() - t_init
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(
                f"{args.mode} step {i + 1}/{args.warmup + args.steps} {dt:.2f} s loss {losses[-1]:.4f}",
                flush=True,
            )
            if i >= args.warmup:
                times.append(dt)
        step_s = statistics.median(times)
        result |= {
            "status": "ok",
            "steps_s": times,
            "step_s": step_s,
            "losses": losses,
            "model_tflops": spec.flops_per_token(b.seq_len) * tokens / step_s / 1e12,
        }
    except torch.OutOfMemoryError as e:
        result |= {"status": "oom", "error": str(e).splitlines()[0]}
    except Exception as e:  # a peer's failure is a result to record, with its traceback
        oom = "out of memory" in str(e).lower()
        result |= {
            "status": "oom" if oom else "error",
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    result["peak_gpu_bytes"] = torch.cuda.max_memory_reserved()
    result["peak_rss_bytes"] = rss_bytes()
    result["peak_rss_above_start_bytes"] = rss_bytes() - rss0
    result["within_cpu_mem"] = result["peak_rss_above_start_bytes"] <= cfg.budgets.cpu_mem + 2 * GIB
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--mode", choices=("zero-nvme", "zero-cpu", "torch"), required=True)
    p.add_argument("--nvme", help="directory for ZeRO-Infinity's swap files (the same disk as ssd.paths)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--aio-tune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-gpu-cap", action="store_true", help="do not cap GPU memory at budgets.gpu_mem")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    Path(args.out).write_text(text)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k not in ("deepspeed_config", "aio_sweep", "traceback")},
            default=str,
        )
    )
    if result["status"] == "error":
        print(result.get("traceback", ""), file=sys.stderr)


if __name__ == "__main__":
    main()
