"""The peer runner's pieces that run without a GPU or DeepSpeed: the model it trains, the DeepSpeed config it
writes, the host-memory yardstick and the comparison table (examples/baselines/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from fuyou_ray.config import load_config
from fuyou_ray.models import ModelSpec, ReferenceModel
from fuyou_ray.models.gpt import lm_loss

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "baselines" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_plain_model_is_the_reference_model_with_recompute() -> None:
    peer = _load("peer")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.n_layer=2"])
    spec = ModelSpec(cfg.model)
    ref = ReferenceModel(spec, seed=3)
    plain = peer.PlainGPT(spec, recompute=True)
    plain.units.load_state_dict(ref.units.state_dict())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ours = plain(x, y)
    theirs = lm_loss(ref(x), y)
    assert torch.equal(ours, theirs)
    ours.backward()
    theirs.backward()
    for a, b in zip(plain.parameters(), ref.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6)


def test_deepspeed_config_matches_the_run_config() -> None:
    peer = _load("peer")
    cfg = load_config(ROOT / "configs" / "bench" / "gpt3-13b-width.yaml")
    spec = ModelSpec(cfg.model)
    aio = {"block_size": 1 << 20, "queue_depth": 32, "intra_op_parallelism": 4}
    ds = peer.deepspeed_config(cfg, spec, "zero-nvme", Path("/nvme/ds"), aio)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == cfg.batch.global_batch
    assert ds["gradient_clipping"] == cfg.optimizer.max_grad_norm
    assert ds["optimizer"]["params"]["lr"] == cfg.optimizer.lr
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "nvme"
    # the swap buffer must hold the largest parameter (the 50257 x 5120 embedding)
    assert zero["offload_param"]["buffer_size"] >= 50257 * 5120
    assert ds["aio"]["queue_depth"] == 32
    cpu = peer.deepspeed_config(cfg, spec, "zero-cpu", None, None)
    assert cpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "aio" not in cpu


def test_host_memory_sampler_sees_an_allocation() -> None:
    compare = _load("compare")
    with compare.HostMemorySampler() as host:
        block = np.ones(256 << 20, dtype=np.uint8)  # touched: 256 MiB resident
        import time

        time.sleep(0.6)
        del block
    assert host.peak_above_start >= 128 << 20


def test_table_gives_ratios_and_failures() -> None:
    compare = _load("compare")
    gib = 1024**3
    rows = [
        {
            "mode": "fuyou",
            "status": "ok",
            "step_s": 10.0,
            "model_tflops": 50.0,
            "peak_gpu_bytes": 9 * gib,
            "host_mem_peak_above_start_bytes": 15 * gib,
            "within_cpu_mem": True,
        },
        {
            "mode": "zero-nvme",
            "status": "ok",
            "step_s": 35.0,
            "model_tflops": 14.3,
            "peak_gpu_bytes": 14 * gib,
            "host_mem_peak_above_start_bytes": 38 * gib,
            "within_cpu_mem": False,
        },
        {"mode": "torch", "status": "oom", "error": "CUDA out of memory", "peak_gpu_bytes": 23 * gib},
    ]
    text = compare.table(rows)
    assert "3.50" in text  # zero-nvme's step / fuyou's
    assert "CUDA out of memory" in text
    fuyou_line = next(line for line in text.splitlines() if line.startswith("fuyou "))
    assert fuyou_line.split()[-1] == "yes"
