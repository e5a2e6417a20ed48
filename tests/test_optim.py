"""Optimizer math: flat-range AdamW against torch.optim.AdamW, sharding, clipping, the LR schedule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from fuyou_ray.config import OptimizerConfig
from fuyou_ray.optim import (
    AdamWStep,
    adamw_update_,
    clip_coefficient,
    learning_rate,
    parameter_norms,
    shard_ranges,
    total_grad_norm,
)

# A unit-like set of tensors: matrices take weight decay, vectors do not (decay first when flat).
DECAY_SHAPES: list[tuple[int, ...]] = [(24, 16), (16, 40), (7, 3)]
NO_DECAY_SHAPES: list[tuple[int, ...]] = [(16,), (40,), (1,)]
BETAS = (0.9, 0.95)
EPS = 1e-8
WD = 0.1


def make_params(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    decay = [torch.randn(s, generator=gen) * 0.5 for s in DECAY_SHAPES]
    no_decay = [torch.randn(s, generator=gen) * 0.5 for s in NO_DECAY_SHAPES]
    return decay, no_decay


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def grads_for(step: int, shapes: list[tuple[int, ...]], scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


DECAY_NUMEL = sum(math.prod(s) for s in DECAY_SHAPES)
ALL_SHAPES = DECAY_SHAPES + NO_DECAY_SHAPES
LRS = [1e-2, 3e-3, 5e-3, 1e-3, 2e-2, 7e-4]


def hp(step: int, lr: float) -> AdamWStep:
    return AdamWStep(step=step, lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD)


class FlatAdamW:
    """The fuyou-ray side of the comparison: one flat master/grad/moment buffer per unit."""

    def __init__(self, master: torch.Tensor) -> None:
        self.master = master.clone()
        self.exp_avg = torch.zeros_like(master)
        self.exp_avg_sq = torch.zeros_like(master)

    def step(
        self, step: int, lr: float, grad: torch.Tensor, shards: int = 1, grad_scale: float = 1.0
    ) -> None:
        grad = grad.clone()
        for lo, hi in shard_ranges(self.master.numel(), shards, align=64):
            adamw_update_(
                self.master[lo:hi],
                grad[lo:hi],
                self.exp_avg[lo:hi],
                self.exp_avg_sq[lo:hi],
                hp(step, lr),
                decay_end=DECAY_NUMEL - lo,
                grad_scale=grad_scale,
            )


def torch_adamw(fused: bool | None = None) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    decay, no_decay = make_params()
    params = [torch.nn.Parameter(t.clone()) for t in decay + no_decay]
    opt = torch.optim.AdamW(
        [
            {"params": params[: len(decay)], "weight_decay": WD},
            {"params": params[len(decay) :], "weight_decay": 0.0},
        ],
        lr=LRS[0],
        betas=BETAS,
        eps=EPS,
        fused=fused,
    )
    return params, opt


def run_torch(steps: int, fused: bool | None = None, max_norm: float = 0.0) -> torch.Tensor:
    params, opt = torch_adamw(fused)
    for k in range(steps):
        for p, g in zip(params, grads_for(k, ALL_SHAPES), strict=True):
            p.grad = g.clone()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        opt.step()
    return flat([p.detach() for p in params])


def run_flat(steps: int, shards: int = 1, max_norm: float = 0.0) -> FlatAdamW:
    decay, no_decay = make_params()
    opt = FlatAdamW(flat(decay + no_decay))
    for k in range(steps):
        grads = grads_for(k, ALL_SHAPES)
        scale = clip_coefficient(max_norm, total_grad_norm(parameter_norms(grads)))
        opt.step(k + 1, LRS[k], flat(grads), shards=shards, grad_scale=scale)
    return opt


# ---------------------------------------------------------------------------------------------- AdamW


def test_matches_torch_adamw_over_several_steps() -> None:
    steps = len(LRS)
    expected = run_torch(steps)
    got = run_flat(steps).master
    assert float((got - expected).abs().max()) <= 1e-6
    # The update actually moved the weights (the comparison is not vacuous) ...
    decay, no_decay = make_params()
    assert float((got - flat(decay + no_decay)).abs().max()) > 1e-3


def test_matches_fused_torch_adamw_bit_for_bit() -> None:
    steps = len(LRS)
    expected = run_torch(steps, fused=True)
    assert torch.equal(run_flat(steps).master, expected)


def test_weight_decay_only_applies_before_decay_end() -> None:
    # With a zero gradient, Adam's step is zero and only decoupled weight decay moves the weights.
    decay, no_decay = make_params()
    master = flat(decay + no_decay)
    before = master.clone()
    zeros = torch.zeros_like(master)
    adamw_update_(master, zeros.clone(), zeros.clone(), zeros.clone(), hp(1, 0.5), decay_end=DECAY_NUMEL)
    torch.testing.assert_close(master[:DECAY_NUMEL], before[:DECAY_NUMEL] * (1 - 0.5 * WD), rtol=0, atol=1e-7)
    assert torch.equal(master[DECAY_NUMEL:], before[DECAY_NUMEL:])


@pytest.mark.parametrize("decay_end", [-5, 0, 10**9])
def test_decay_end_is_clamped(decay_end: int) -> None:
    master = torch.ones(100)
    zeros = torch.zeros(100)
    adamw_update_(master, zeros.clone(), zeros.clone(), zeros.clone(), hp(1, 1.0), decay_end=decay_end)
    expected = torch.full((100,), 1 - WD) if decay_end > 0 else torch.ones(100)
    torch.testing.assert_close(master, expected, rtol=0, atol=1e-7)


def test_moments_match_torch_state() -> None:
    steps = 3
    params, opt = torch_adamw()
    for k in range(steps):
        for p, g in zip(params, grads_for(k, ALL_SHAPES), strict=True):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        opt.step()
    ours = run_flat(steps)
    exp_avg = flat([opt.state[p]["exp_avg"] for p in params])
    exp_avg_sq = flat([opt.state[p]["exp_avg_sq"] for p in params])
    torch.testing.assert_close(ours.exp_avg, exp_avg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.exp_avg_sq, exp_avg_sq, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shards", [2, 3, 5, 16])
def test_sharded_update_is_bit_identical(shards: int) -> None:
    one = run_flat(4, shards=1, max_norm=1.0)
    many = run_flat(4, shards=shards, max_norm=1.0)
    assert len(shard_ranges(one.master.numel(), shards, align=64)) > 1
    assert torch.equal(one.master, many.master)
    assert torch.equal(one.exp_avg, many.exp_avg)
    assert torch.equal(one.exp_avg_sq, many.exp_avg_sq)


def test_shard_boundary_inside_the_no_decay_part() -> None:
    # A shard that starts after decay_end gets a negative local decay_end: no decay at all.
    master = torch.ones(3000)
    zeros = torch.zeros(3000)
    for lo, hi in shard_ranges(3000, 3, align=1024):
        adamw_update_(
            master[lo:hi], zeros[lo:hi].clone(), zeros[lo:hi].clone(), zeros[lo:hi].clone(),
            hp(1, 1.0), decay_end=1500 - lo,
        )  # fmt: skip
    torch.testing.assert_close(master[:1500], torch.full((1500,), 1 - WD), rtol=0, atol=1e-7)
    assert torch.equal(master[1500:], torch.ones(1500))


# ---------------------------------------------------------------------------------------------- clipping


def clipped_by_torch(grads: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, clipped flat gradient) as torch.nn.utils.clip_grad_norm_ computes them."""
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return total, flat([p.grad for p in params])  # type: ignore[misc]


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_grad_scale_equals_clip_grad_norm(max_norm: float) -> None:
    grads = grads_for(0, ALL_SHAPES, scale=3.0)
    total, clipped = clipped_by_torch(grads, max_norm)
    norms = parameter_norms(grads)
    assert len(norms) == len(grads)
    for n, g in zip(norms, grads, strict=True):
        assert float(n) == pytest.approx(float(g.norm()), rel=1e-6)
    ours = total_grad_norm(norms)
    assert torch.equal(ours, total)  # same reduction order as torch: the same bits
    coef = clip_coefficient(max_norm, ours)
    assert coef == float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    # Scaling the flat gradient by the coefficient (as adamw_update_ does) gives torch's clipped grads.
    g = flat(grads)
    adamw_update_(torch.zeros_like(g), g, torch.zeros_like(g), torch.zeros_like(g), hp(1, 1e-3),
                  decay_end=DECAY_NUMEL, grad_scale=coef)  # fmt: skip
    assert torch.equal(g, clipped)
    if max_norm == 1e6:
        assert coef == 1.0
    else:
        assert coef < 1.0


def test_total_norm_of_unit_norms_equals_the_global_norm() -> None:
    # The GPU actor computes norms unit by unit; the concatenated list gives torch's global norm.
    grads = grads_for(1, ALL_SHAPES)
    total, _ = clipped_by_torch(grads, 1.0)
    per_unit = parameter_norms(grads[:2]) + parameter_norms(grads[2:])
    assert torch.equal(total_grad_norm(per_unit), total)
    assert float(total_grad_norm([])) == 0.0


@pytest.mark.parametrize("max_norm", [0.05, 0.5])
def test_clipped_training_matches_torch(max_norm: float) -> None:
    steps = 4
    got = run_flat(steps, max_norm=max_norm).master
    assert float((got - run_torch(steps, max_norm=max_norm)).abs().max()) <= 1e-6
    assert torch.equal(got, run_torch(steps, fused=True, max_norm=max_norm))
    # Clipping had an effect: the unclipped run ends elsewhere.
    assert float((run_flat(steps).master - got).abs().max()) > 1e-5


def test_clip_coefficient_special_cases() -> None:
    assert clip_coefficient(0.0, torch.tensor(100.0)) == 1.0  # disabled
    assert clip_coefficient(-1.0, torch.tensor(100.0)) == 1.0
    assert clip_coefficient(1.0, torch.tensor(0.0)) == 1.0  # zero gradient
    assert clip_coefficient(1.0, torch.tensor(0.5)) == 1.0  # below the limit
    assert clip_coefficient(1.0, torch.tensor(4.0)) == pytest.approx(0.25, rel=1e-6)
    assert clip_coefficient(1.0, torch.tensor(4.0, dtype=torch.float64)) == float(
        torch.tensor(1.0) / (torch.tensor(4.0) + 1e-6)
    )  # fp32 arithmetic, as torch's
    assert math.isnan(clip_coefficient(1.0, torch.tensor(float("nan"))))  # NaN propagates: the step is caught


def test_grad_scale_scales_the_gradient_in_place_and_one_is_a_no_op() -> None:
    master = torch.zeros(10)
    grad = torch.arange(10, dtype=torch.float32)
    adamw_update_(master, grad, torch.zeros(10), torch.zeros(10), hp(1, 1e-3), decay_end=5, grad_scale=0.5)
    assert torch.equal(grad, torch.arange(10, dtype=torch.float32) * 0.5)
    grad = torch.arange(10, dtype=torch.float32)
    adamw_update_(torch.zeros(10), grad, torch.zeros(10), torch.zeros(10), hp(1, 1e-3), decay_end=5)
    assert torch.equal(grad, torch.arange(10, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- params_out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_params_out_receives_the_cast_update(dtype: torch.dtype) -> None:
    decay, no_decay = make_params()
    master = flat(decay + no_decay)
    grad = flat(grads_for(0, ALL_SHAPES))
    out = torch.full_like(master, float("nan"), dtype=dtype)
    adamw_update_(
        master, grad, torch.zeros_like(master), torch.zeros_like(master), hp(1, 1e-2),
        decay_end=DECAY_NUMEL, params_out=out,
    )  # fmt: skip
    assert out.dtype == dtype
    assert torch.equal(out, master.to(dtype))


def test_params_out_per_shard_equals_whole() -> None:
    decay, no_decay = make_params()
    master = flat(decay + no_decay)
    grad = flat(grads_for(0, ALL_SHAPES))
    whole_master = master.clone()
    whole = torch.empty_like(master, dtype=torch.bfloat16)
    adamw_update_(
        whole_master, grad.clone(), torch.zeros_like(master), torch.zeros_like(master), hp(1, 1e-2),
        decay_end=DECAY_NUMEL, params_out=whole,
    )  # fmt: skip
    parts = torch.empty_like(master, dtype=torch.bfloat16)
    m, g = master.clone(), grad.clone()
    ea, eas = torch.zeros_like(master), torch.zeros_like(master)
    for lo, hi in shard_ranges(master.numel(), 4, align=128):
        adamw_update_(
            m[lo:hi], g[lo:hi], ea[lo:hi], eas[lo:hi], hp(1, 1e-2),
            decay_end=DECAY_NUMEL - lo, params_out=parts[lo:hi],
        )  # fmt: skip
    assert torch.equal(parts, whole)
    assert torch.equal(m, whole_master)


# ---------------------------------------------------------------------------------------------- shard_ranges


@pytest.mark.parametrize(
    ("numel", "parts", "align"), [(10_000, 4, 1024), (10_000, 3, 1), (5, 8, 1024), (1, 1, 1), (4096, 4, 1024)]
)
def test_shard_ranges_cover_the_range(numel: int, parts: int, align: int) -> None:
    ranges = shard_ranges(numel, parts, align)
    assert 1 <= len(ranges) <= parts
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo
    for lo, hi in ranges:
        assert lo < hi
        assert lo % align == 0
    if numel == 4096:
        assert ranges == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]


def test_shard_ranges_edge_cases() -> None:
    assert shard_ranges(0, 4) == [(0, 0)]
    assert shard_ranges(100, 0) == [(0, 100)]
    assert shard_ranges(100, -3) == [(0, 100)]


# ---------------------------------------------------------------------------------------------- schedule


def cfg(**kw: object) -> OptimizerConfig:
    return dataclasses.replace(OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), **kw)  # type: ignore[arg-type]


def test_warmup_is_linear_and_reaches_the_peak() -> None:
    c = cfg()
    assert [learning_rate(c, s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decays_to_the_floor() -> None:
    c = cfg()
    total = 20
    assert learning_rate(c, 4, total) == 1.0  # first step after warmup: the peak
    assert learning_rate(c, 12, total) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert learning_rate(c, total, total) == pytest.approx(0.1)  # end of the schedule: the floor
    assert learning_rate(c, total + 50, total) == pytest.approx(0.1)  # past the end: stays at the floor
    after = [learning_rate(c, s, total) for s in range(4, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert all(0.1 - 1e-12 <= x <= 1.0 for x in after)


def test_constant_schedule() -> None:
    c = cfg(schedule="constant")
    assert learning_rate(c, 0, 10) == 0.25
    assert all(learning_rate(c, s, 10) == 1.0 for s in range(3, 30))


def test_no_warmup_starts_at_the_peak() -> None:
    c = cfg(warmup_steps=0)
    assert learning_rate(c, 0, 10) == 1.0
    assert learning_rate(c, 10, 10) == pytest.approx(0.1)


def test_warmup_longer_than_the_run_never_divides_by_zero() -> None:
    c = cfg(warmup_steps=10)
    assert learning_rate(c, 9, 5) == 1.0
    assert learning_rate(c, 10, 5) == 1.0  # progress clamps at 0 .. 1 via max(1, ...)
    assert learning_rate(cfg(min_lr_ratio=0.0), 20, 20) == pytest.approx(0.0, abs=1e-12)


def test_adamw_step_is_small_and_frozen() -> None:
    h = hp(3, 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.lr = 1.0  # type: ignore[misc]
