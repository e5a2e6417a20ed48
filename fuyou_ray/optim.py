"""Optimizer math: the learning-rate schedule, global-norm clipping and the AdamW update on flat ranges.

The update is torch's own fused AdamW kernel applied to element ranges of a unit's flat buffers, so any
split of the range over the optimizer pool gives the same bits as one call, and the result matches
`torch.optim.AdamW` on the same data. The compute-dtype params for the next forward are produced in the
same pass (a cast of the updated master range), so they never need a separate read of the master weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fuyou_ray.config import OptimizerConfig


@dataclass(frozen=True)
class AdamWStep:
    """Everything one optimizer step of one unit needs besides the tensors. Small: travels through Ray."""

    step: int  # 1-based Adam step count (bias correction)
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """LR for 0-based `step`: linear warmup over warmup_steps, then cosine to min_lr_ratio * lr (or flat)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter L2 norms, computed as torch.nn.utils.clip_grad_norm_ computes them (fp32, foreach)."""
    return list(torch._foreach_norm([g.contiguous() for g in grads], 2.0))


def total_grad_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    """The global norm from per-parameter norms, in the model's parameter order (as clip_grad_norm_)."""
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> float:
    """clip_grad_norm_'s coefficient, with its fp32 arithmetic (1.0 = no-op; 0 disables clipping).

    Computing the norm and the coefficient exactly as torch does keeps clipped runs bit-identical to
    the in-memory reference instead of 1 ulp apart (Adam's early steps amplify such differences).
    """
    if max_norm <= 0:
        return 1.0
    coef = max_norm / (total_norm.float().cpu() + 1e-6)
    return float(torch.clamp(coef, max=1.0))


def adamw_update_(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hp: AdamWStep,
    *,
    decay_end: int,
    grad_scale: float = 1.0,
    params_out: torch.Tensor | None = None,
) -> None:
    """AdamW on a flat range in place; elements [0, decay_end) take weight decay, the rest do not.

    All tensors are 1-D views of the same element range. `grad` is first scaled in place by
    `grad_scale` (the clipping coefficient; 1.0 = none).
    `params_out` (any float dtype) receives the updated master weights, cast.
    """
    if grad_scale != 1.0:
        grad.mul_(grad_scale)
    step_t = torch.tensor(float(hp.step), dtype=torch.float32)
    decay_end = max(0, min(decay_end, master.numel()))
    for lo, hi, wd in ((0, decay_end, hp.weight_decay), (decay_end, master.numel(), 0.0)):
        if hi <= lo:
            continue
        torch._fused_adamw_(
            [master[lo:hi]],
            [grad[lo:hi]],
            [exp_avg[lo:hi]],
            [exp_avg_sq[lo:hi]],
            [],
            [step_t],
            lr=hp.lr,
            beta1=hp.beta1,
            beta2=hp.beta2,
            weight_decay=wd,
            eps=hp.eps,
            amsgrad=False,
            maximize=False,
        )
    if params_out is not None:
        params_out.copy_(master)


def shard_ranges(numel: int, parts: int, align: int = 1024) -> list[tuple[int, int]]:
    """Split [0, numel) into at most `parts` contiguous ranges, boundaries aligned to `align` elements."""
    parts = max(1, parts)
    per = -(-numel // parts)
    per = -(-per // align) * align
    ranges, lo = [], 0
    while lo < numel:
        hi = min(numel, lo + per)
        ranges.append((lo, hi))
        lo = hi
    return ranges or [(0, 0)]
