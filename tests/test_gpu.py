"""On a CUDA GPU: the GPU actor computes in bf16 from pinned ring slots, and still agrees with a plain
in-GPU mixed-precision reference. Run on the device machine: `pytest -m gpu tests/test_gpu.py`.

Tolerance. Both sides keep fp32 master weights and use fused AdamW; they differ only in where AdamW runs
(CPU kernel here, CUDA kernel there: different FMA contraction, so master weights differ by an fp32 ulp
now and then) and therefore, after rounding to bf16, in an occasional param ulp (2^-8 relative). We require
max |dW| of the fp32 masters <= 5% of the largest single update (lr), far below what one step changes, and
losses within 1e-3 relative. Measured figures are printed and recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.reference import train_reference_mixed
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def gpu_config(tmp: Path, **sections: object):  # type: ignore[no-untyped-def]
    base = {
        "model": {"vocab_size": 256, "n_layer": 4, "n_head": 4, "d_model": 256, "max_seq_len": 128},
        "batch": {"global_batch": 16, "micro_batch": 8, "seq_len": 128},
        "budgets": {"gpu_mem": "8GiB", "cpu_mem": "256MiB"},
        "runtime": {"device": "cuda", "optimizer_actors": 2, "optimizer_threads": 4},
        "optimizer": {"lr": 1e-3, "warmup_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.1},
        "steps": 5,
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value  # type: ignore[dict-item]
    return tiny_config(tmp, **base)


@pytest.mark.parametrize(
    ("executor", "ranges", "parked"),
    [("local", False, 0), ("ray", False, 0), ("local", True, 0), ("ray", False, 3)],
    ids=["local", "ray", "ranges", "parked"],
)
def test_bf16_gpu_matches_mixed_precision_reference(
    tmp_path: Path, executor: str, ranges: bool, parked: int, request: pytest.FixtureRequest
) -> None:
    """Against plain mixed-precision training; `ranges`: blocks of 2.4 M params updated in optimizer ranges
    of 1 Mi elements (the gradient leaves the device range by range); `parked`: the inputs of 3 of the 4
    blocks wait for the backward in host memory (fuyou_ray/activations.py)."""
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    extra: dict[str, object] = {"runtime": {"park_block_inputs": parked}}
    if ranges:
        extra = {"model": {"d_model": 448}, "runtime": {"optimizer_range": 1}}
    cfg = gpu_config(tmp_path, **extra)
    result = train(cfg, executor=executor)
    assert result.plan.param_dtype == "bfloat16" and result.plan.device == "cuda"
    assert (result.plan.optimizer_range > 0) == ranges
    assert result.plan.parked_inputs == tuple(range(1, parked + 1))
    ref = train_reference_mixed(cfg, cfg.steps)
    ours = [s.loss for s in result.steps]
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref.losses, strict=True))
    masters = torch.cat(load_unit_tensors(cfg))
    theirs = torch.cat([w.cpu() for w in ref.unit_weights()])
    spec = ModelSpec(cfg.model)
    initial = torch.cat([spec.init_unit(u, cfg.seed) for u in range(spec.num_units)])
    dw = (masters - theirs).abs().max().item()
    rel = ((masters - theirs).norm() / (theirs - initial).norm()).item()
    print(f"[{executor}] losses ours {ours}\n  reference {ref.losses}")
    print(f"  max rel loss diff {loss_rel:.2e}, ||dW||/||W-W0|| {rel:.2e}, max |dW| {dw:.2e}")
    assert loss_rel <= 1e-3
    assert rel <= 1e-2
    assert dw <= 2 * cfg.optimizer.lr * cfg.steps
    assert ours[-1] < ours[0]


def test_lm_head_on_cuda_pads_an_odd_vocabulary_and_matches_the_plain_projection() -> None:
    """LMHead's aligned GEMM on the GPU gives nn.Linear's logits and gradients (bf16 rounding apart)."""
    from fuyou_ray.models.lm_head import LMHead

    torch.manual_seed(0)
    head = LMHead(256, 1001).to("cuda", torch.bfloat16)  # 1001: 23 padding rows
    plain = torch.nn.Linear(256, 1001, bias=False).to("cuda", torch.bfloat16)
    plain.load_state_dict(head.state_dict())
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    out = [module(x) for module in (head, plain)]
    assert out[0].shape == out[1].shape == (4, 64, 1001)
    torch.testing.assert_close(out[0].float(), out[1].float(), rtol=2e-2, atol=2e-2)
    for o in out:
        o.float().square().mean().backward()
    assert head.weight.grad is not None and plain.weight.grad is not None
    torch.testing.assert_close(head.weight.grad.float(), plain.weight.grad.float(), rtol=2e-2, atol=1e-4)


def test_parked_inputs_leave_the_device_and_come_back_on_the_copy_streams() -> None:
    from actors.gpu_compute import DeviceLanes
    from fuyou_ray.activations import HostActivations
    from fuyou_ray.timeline import Timeline

    device = torch.device("cuda", torch.cuda.current_device())
    lanes = DeviceLanes(device, Timeline())
    lanes.anchor()
    parked = HostActivations([1, 2], lanes)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    xs = {
        u: [torch.randn(4, 512, 1024, device=device, dtype=torch.bfloat16) for _ in range(3)] for u in (1, 2)
    }
    expected = {u: [x.cpu() for x in xs[u]] for u in xs}
    for u in (1, 2):
        parked.park(u, xs[u])
    del xs  # as the forward does once the unit has used them: the device lets go after the copies
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) == before
    parked.prefetch(2)
    back2 = parked.take(2)
    parked.prefetch(1)
    back1 = parked.take(1)
    torch.cuda.synchronize()
    for ours, theirs in zip(back1 + back2, expected[1] + expected[2], strict=True):
        assert ours.device == device and torch.equal(ours.cpu(), theirs)
    lanes.flush()
    spans = lanes.timeline.drain()
    assert sorted({s.lane for s in spans}) == ["d2h", "h2d"]
    gbps = [s.nbytes / (s.end - s.start) / 1e9 for s in spans if s.end > s.start]
    print(f"parked-input copies: {min(gbps):.1f}-{max(gbps):.1f} GB/s (pinned arena)")
    parked.close()
