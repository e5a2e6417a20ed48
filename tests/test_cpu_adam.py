"""The host AdamW kernel (fuyou_ray/cpu_adam.py, cuda/cpu_adamw.c) against the torch path it replaces.

Bit for bit: weights, moments and params out, across range sizes with and without torch's scalar remainder,
weight-decay splits, clipping scales, params dtypes and thread counts. Also: it leaves the gradient
untouched, it is refused where it does not reproduce torch, and without a compiler the torch path runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuyou_ray import cpu_adam
from fuyou_ray.cpu_adam import HostAdamW, KernelUnavailable, build, load_kernel, source_path
from fuyou_ray.optim import AdamWStep, adamw_update_

REPO = Path(__file__).resolve().parent.parent


def _state(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    # gradients over eight decades, so that roundings differ wherever the two paths would differ
    g = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-5, 3, generator=gen)
    m = torch.randn(n, generator=gen) * 1e-2
    v = torch.rand(n, generator=gen) * 1e-2
    return [w, g, m, v]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.fixture(scope="module")
def kernel() -> HostAdamW:
    adamw = HostAdamW(3)
    if not adamw.native:
        pytest.fail(f"the host kernel is unavailable on this machine: {adamw.reason}")
    return adamw


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4096 + 5, 100_003])
@pytest.mark.parametrize("scale", [1.0, 0.3125, 0.0173])
def test_kernel_is_bit_identical_to_the_torch_path(kernel: HostAdamW, n: int, scale: float) -> None:
    for step, (decay_end, dtype) in enumerate(
        [(n, torch.bfloat16), (n // 3, torch.bfloat16), (0, torch.float32), (n // 2, None)], start=1
    ):
        hp = AdamWStep(step=step, lr=1e-3 * step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        ours = _state(n, seed=n + step)
        theirs = [t.clone() for t in ours]
        grad_before = ours[1].clone()
        p_ours = torch.empty(n, dtype=dtype) if dtype else None
        p_theirs = torch.empty(n, dtype=dtype) if dtype else None
        kernel.update_(*ours, hp, decay_end=decay_end, grad_scale=scale, params_out=p_ours)
        adamw_update_(*theirs, hp, decay_end=decay_end, grad_scale=scale, params_out=p_theirs)
        for name, i in (("weights", 0), ("exp_avg", 2), ("exp_avg_sq", 3)):
            a, b = ours[i], theirs[i]
            assert torch.equal(_bits(a), _bits(b)), f"{name} differ (n={n}, step {step}, scale {scale})"
        if p_ours is not None and p_theirs is not None:
            assert torch.equal(_bits(p_ours), _bits(p_theirs)), f"params differ (n={n}, step {step})"
        assert torch.equal(ours[1], grad_before), "the kernel must leave the gradient as it was"


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_out_of_place_update_writes_what_the_in_place_one_computes(mode: str) -> None:
    """The host cache lends the version read and a file for the new version: the optimizer reads the old
    state in one and writes the new state into the other, whatever it held (here NaN), and the old state
    is left as it was."""
    adamw = HostAdamW(2, mode)  # type: ignore[arg-type]
    try:
        n = 3 * 4096 + 11
        old = _state(n, seed=21)
        kept = [t.clone() for t in old]
        theirs = [t.clone() for t in old]
        hp = AdamWStep(step=4, lr=5e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        new = [torch.full((n,), float("nan")) for _ in range(3)]
        p_ours, p_theirs = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        adamw.update_(
            new[0],
            old[1],
            new[1],
            new[2],
            hp,
            decay_end=n // 2,
            grad_scale=0.25,
            params_out=p_ours,
            source=(old[0], old[2], old[3]),
        )
        adamw_update_(*theirs, hp, decay_end=n // 2, grad_scale=0.25, params_out=p_theirs)
        for a, b in zip([*new, p_ours], [theirs[0], theirs[2], theirs[3], p_theirs], strict=True):
            assert torch.equal(_bits(a), _bits(b))
        for i in (0, 2, 3):
            assert torch.equal(old[i], kept[i]), "the old state must be left as it was"
    finally:
        adamw.close()


def test_kernel_on_views_of_a_larger_buffer(kernel: HostAdamW) -> None:
    """The actors pass views of ring slots and cache files: element ranges that do not start at 0."""
    n, lo, hi = 50_000, 1_237, 41_011
    ours = _state(n, seed=5)
    theirs = [t.clone() for t in ours]
    p_ours = torch.zeros(n, dtype=torch.bfloat16)
    p_theirs = torch.zeros(n, dtype=torch.bfloat16)
    hp = AdamWStep(step=3, lr=2e-4, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
    kernel.update_(*(t[lo:hi] for t in ours), hp, decay_end=9_000, grad_scale=0.7, params_out=p_ours[lo:hi])
    adamw_update_(
        *(t[lo:hi] for t in theirs), hp, decay_end=9_000, grad_scale=0.7, params_out=p_theirs[lo:hi]
    )
    for a, b in zip([*ours[:1], *ours[2:], p_ours], [*theirs[:1], *theirs[2:], p_theirs], strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_non_finite_values_propagate_as_in_torch(kernel: HostAdamW) -> None:
    n = 256
    ours = _state(n, seed=9)
    ours[1][3] = float("nan")
    ours[1][100] = float("inf")
    theirs = [t.clone() for t in ours]
    p_ours, p_theirs = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    hp = AdamWStep(step=1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    kernel.update_(*ours, hp, decay_end=n, params_out=p_ours)
    adamw_update_(*theirs, hp, decay_end=n, params_out=p_theirs)
    assert torch.equal(ours[0].isnan(), theirs[0].isnan()) and bool(ours[0].isnan().any())
    # NaN is NaN in both; only its bit pattern in bf16 may differ (a non-finite gradient is refused before
    # any update in a run, so this is about not hiding one, not about its payload)
    assert torch.equal(p_ours.isnan(), theirs[0].isnan())
    finite = ~p_ours.isnan()
    assert torch.equal(_bits(p_ours[finite]), _bits(p_theirs[finite]))


def test_a_kernel_that_does_not_reproduce_torch_is_refused(kernel: HostAdamW) -> None:
    assert kernel.kernel is not None
    real = kernel.kernel.fn

    def twice(*args: object) -> int:  # a kernel whose every element is off
        real(*args)
        return real(*args)

    for wrong in (twice, lambda *args: 0):
        with pytest.raises(KernelUnavailable, match="bit for bit"):
            cpu_adam._verified(wrong, cpu_adam.torch_vector_width())


def test_build_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUYOU_RAY_KERNEL_CACHE", str(tmp_path / "kernels"))
    lib = build(source_path())
    mtime = lib.stat().st_mtime_ns
    assert build(source_path()) == lib and lib.stat().st_mtime_ns == mtime, "a second build recompiled"
    left = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert left == [lib.name, f"{lib.name}.lock"], "temporary files left behind"


def test_without_a_compiler_the_torch_path_runs_and_says_why(tmp_path: Path) -> None:
    """A fresh process (the kernel is loaded once per process), no compiler, an empty kernel cache."""
    code = (
        "import torch\n"
        "from fuyou_ray.cpu_adam import HostAdamW\n"
        "from fuyou_ray.optim import AdamWStep, adamw_update_\n"
        "a = HostAdamW(2)\n"
        "assert not a.native, a.reason\n"
        "hp = AdamWStep(1, 1e-3, 0.9, 0.95, 1e-8, 0.1)\n"
        "ours, theirs = ([torch.linspace(0.1, 1, 10) for _ in range(4)] for _ in range(2))\n"
        "a.update_(*ours, hp, decay_end=5, grad_scale=0.5)\n"
        "adamw_update_(*theirs, hp, decay_end=5, grad_scale=0.5)\n"
        "assert all(torch.equal(x, y) for x, y in zip(ours, theirs))\n"
        "print(a.reason)\n"
    )
    env = {
        **os.environ,
        "CC": "no-such-compiler",
        "FUYOU_RAY_KERNEL_CACHE": str(tmp_path / "empty"),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch path: no C compiler" in done.stdout and "set CC" in done.stdout


def test_torch_mode_never_loads_the_kernel() -> None:
    adamw = HostAdamW(2, "torch")
    assert not adamw.native and "torch" in adamw.reason


def test_load_kernel_is_verified_once_per_process() -> None:
    first, second = load_kernel(), load_kernel()
    assert first is second and first.width in (8, 16)
