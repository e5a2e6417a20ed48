"""Time the LM head on the GPU as the compute actor runs it: one visit of 8 micro-batches of 8 x 1024 tokens
(forward, fp32 loss, backward into the flat fp32 gradient, via functional_call on the unit's flat bf16
params), at vocabulary 50257 through a plain nn.Linear, through LMHead (the padded GEMM), and at 50304.

    python examples/bench_lm_head.py [--d-model 5120]

Prints ms per visit and the GEMM-equivalent TFLOPS (6 x tokens x h x vocab / time), then checks that the
padded head's loss and weight gradient match the plain one's on the same weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.func import functional_call

from fuyou_ray.config import ModelConfig
from fuyou_ray.models import ModelSpec, lm_loss
from fuyou_ray.models.gpt import GPTHead


def time_head(
    h: int, vocab: int, plain: bool, micro_batches: int = 8, rows: int = 8, seq: int = 1024
) -> float:
    cfg = ModelConfig(arch="gpt", vocab_size=vocab, n_layer=1, n_head=h // 128, d_model=h, max_seq_len=seq)
    spec = ModelSpec(cfg)
    head_unit = spec.units[-1]
    unit = GPTHead(cfg).to("cuda", torch.bfloat16)
    if plain:
        unit.lm_head = nn.Linear(h, vocab, bias=False).to("cuda", torch.bfloat16)
    flat = torch.randn(head_unit.numel, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_(True)
    named = head_unit.layout.unflatten(flat)
    xs = [torch.randn(rows, seq, h, device="cuda", dtype=torch.bfloat16) for _ in range(micro_batches)]
    ys = [torch.randint(0, vocab, (rows, seq), device="cuda") for _ in range(micro_batches)]
    grad = torch.zeros(flat.numel(), device="cuda")

    def visit() -> None:
        for x, y in zip(xs, ys, strict=True):
            x = x.detach().requires_grad_(True)
            loss = lm_loss(functional_call(unit, named, (x,)), y) / micro_batches
            g_flat, _ = torch.autograd.grad(loss, [flat, x])
            grad.add_(g_flat)

    visit()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        visit()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    tflops = 6 * micro_batches * rows * seq * h * vocab / best / 1e12
    kind = "nn.Linear" if plain else "LMHead"
    print(f"head vocab {vocab} {kind}: {best * 1e3:.1f} ms per visit ({tflops:.0f} TFLOPS GEMM-equivalent)")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=5120)
    h = parser.parse_args().d_model
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: the padding is for cuBLAS (on CPU, LMHead runs nn.Linear)")
    for vocab, plain in ((50257, True), (50257, False), (50304, True)):
        time_head(h, vocab, plain)
    cfg = ModelConfig(arch="gpt", vocab_size=50257, n_layer=1, n_head=h // 128, d_model=h, max_seq_len=1024)
    padded, plain = GPTHead(cfg).to("cuda", torch.bfloat16), GPTHead(cfg).to("cuda", torch.bfloat16)
    plain.lm_head = nn.Linear(h, 50257, bias=False).to("cuda", torch.bfloat16)
    plain.load_state_dict(padded.state_dict())
    x = torch.randn(2, 1024, h, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 50257, (2, 1024), device="cuda")
    losses = [lm_loss(m(x), y) for m in (padded, plain)]
    for loss in losses:
        loss.backward()
    assert padded.lm_head.weight.grad is not None and plain.lm_head.weight.grad is not None
    diff = (padded.lm_head.weight.grad.float() - plain.lm_head.weight.grad.float()).abs().max().item()
    print(f"loss padded {losses[0].item():.6f}, plain {losses[1].item():.6f}; gradients differ by {diff:.2e}")


if __name__ == "__main__":
    main()
