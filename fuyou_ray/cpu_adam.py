"""Host AdamW: one pass per element instead of torch's three, bit-identical to the torch path.

The CPU optimizer actors spend the clipped step's serial optimizer phase on host memory bandwidth. The torch
path (`fuyou_ray.optim.adamw_update_`) scales the gradient in place, runs torch._fused_adamw_, then casts the
new master weights into the bf16 params slot: about 42 bytes of traffic per parameter. The kernel in
cuda/cpu_adamw.c does the three in one pass (30 bytes) and leaves the gradient untouched.

`HostAdamW` compiles it with the system C compiler on first use (`-march=native`, so the binary is cached
per source, compiler and CPU model, under ~/.cache/fuyou-ray/kernels or $FUYOU_RAY_KERNEL_CACHE) and loads
it with ctypes, whose calls release the GIL: the actor's threads each update a piece of the range. Before
using it, it runs the kernel and the torch path on the same random data and keeps the kernel only if every
weight, moment and param is bit-identical (it picks the variant that rounds as this machine's torch
build does: see the C source). Without a compiler, or if no variant matches, it uses the torch path and
says why (`HostAdamW.reason`): slower, never different.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fuyou_ray.optim import AdamWStep, adamw_update_, shard_ranges

log = logging.getLogger(__name__)

SOURCE_NAME = "cpu_adamw.c"
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
# Variants (cuda/cpu_adamw.c): first moment m (5 forms) | second moment v (6) << 3 | weights w (2) << 6;
# tried in this order (today's torch first), the first that reproduces torch is kept.
VARIANTS = tuple(m | v << 3 | w << 6 for m in range(5) for v in range(6) for w in range(2))
PIECE_ALIGN = 64  # elements: pieces given to threads start on a cache line (and on every vector width)

KernelMode = Literal["auto", "torch"]
# Threads per updater when the probe measures a thread count as a pool (the optimizer actors make_plan
# starts have 3-4 threads each on a 16-core machine).
ACTOR_THREADS = 4
PARAM_KINDS = {torch.bfloat16: 1, torch.float32: 2}  # the kernel's params-out dtypes
KernelFn = Callable[..., int]  # fy_adamw through ctypes (0, or -1 for an unknown variant)


class _HP(ctypes.Structure):
    _fields_ = [
        ("grad_scale", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("lerp_weight", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("c2", ctypes.c_float),
        ("bc2_sqrt", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("neg_step_size", ctypes.c_float),
    ]


def _hp(hp: AdamWStep, weight_decay: float, grad_scale: float) -> _HP:
    """The kernel's fp32 constants, derived in double precision as torch's fused kernel derives them."""
    step = float(hp.step)
    bias_correction1 = 1 - hp.beta1**step
    bias_correction2 = 1 - hp.beta2**step
    return _HP(
        grad_scale,
        1 - hp.lr * weight_decay,
        1 - hp.beta1,
        hp.beta1,
        hp.beta2,
        1 - hp.beta2,
        math.sqrt(bias_correction2),
        hp.eps,
        -(hp.lr / bias_correction1),
    )


def torch_vector_width() -> int:
    """fp32 lanes of torch's CPU kernels here: its fused AdamW runs a scalar remainder loop, with other
    roundings, on the last numel % width elements of each call (the loader leaves those to torch)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def source_path() -> Path:
    """cuda/cpu_adamw.c in a checkout; the package data `fuyou_ray.kernels_src` in an installed wheel."""
    here = Path(__file__).resolve().parent.parent / "cuda" / SOURCE_NAME
    if here.is_file():
        return here
    from importlib import resources

    return Path(str(resources.files("fuyou_ray.kernels_src").joinpath(SOURCE_NAME)))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("FUYOU_RAY_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fuyou-ray" / "kernels"


class KernelUnavailable(RuntimeError):
    """The host kernel cannot be built or does not reproduce torch here; the torch path is used."""


def build(source: Path, compiler: str | None = None) -> Path:
    """Compile `source` into a shared library (cached; built into a temporary name and renamed, so
    processes building at once never load a half-written file)."""
    cc = compiler or os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelUnavailable(f"no C compiler ({cc!r} is not on PATH; set CC to one)")
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([text, cc.encode(), " ".join(CFLAGS).encode(), _cpu_model().encode()])
    ).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "fuyou-ray-kernels"):
        lib = directory / f"cpu_adamw-{platform.machine()}-{key}.so"
        if lib.is_file():
            return lib
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = os.open(directory / f"{lib.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue  # not writable: try the next place
        try:
            # One process compiles (the optimizer actors start together); the others wait and load it.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if lib.is_file():
                return lib
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
            os.close(fd)
            try:
                done = subprocess.run(
                    [cc, *CFLAGS, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=300
                )
                if done.returncode != 0:
                    raise KernelUnavailable(f"{cc} failed on {source}: {done.stderr.strip()[-400:]}")
                os.replace(tmp, lib)
                return lib
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        finally:
            os.close(lock)  # (releases the lock)
    raise KernelUnavailable("no writable directory for the compiled kernel (set FUYOU_RAY_KERNEL_CACHE)")


@dataclass(frozen=True)
class _Kernel:
    fn: KernelFn
    variant: int
    width: int


_loaded: _Kernel | None = None
_load_error: str | None = None
_load_lock = threading.Lock()


def load_kernel() -> _Kernel:
    """The verified kernel of this process (built and checked once); KernelUnavailable says why not."""
    global _loaded, _load_error
    with _load_lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise KernelUnavailable(_load_error)
        try:
            lib = ctypes.CDLL(str(build(source_path())))
            fn = lib.fy_adamw
            fn.restype = ctypes.c_int
            fn.argtypes = [
                *(ctypes.c_void_p,) * 8,
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.POINTER(_HP),
                ctypes.c_int,
            ]
            _loaded = _verified(fn, torch_vector_width())
            return _loaded
        except (KernelUnavailable, OSError) as exc:
            _load_error = str(exc)
            raise KernelUnavailable(_load_error) from exc


def _run(
    fn: KernelFn,
    variant: int,
    width: int,
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor | None,
    hp: AdamWStep,
    decay_end: int,
    grad_scale: float,
    lo: int,
    hi: int,
    source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Elements [lo, hi) of the update, in the two segments torch's path makes (decay, no decay); in place,
    or from the old state `source` (w, m, v) into w, m, v. The last numel % width elements of a segment are
    torch's scalar remainder: torch itself updates them (a call on just those elements runs the same scalar
    loop on them), from a copy of their gradient."""
    old = [t.data_ptr() for t in source] if source is not None else [None, None, None]
    for seg_lo, seg_hi, wd in ((0, decay_end, hp.weight_decay), (decay_end, w.numel(), 0.0)):
        a, b = max(lo, seg_lo), min(hi, seg_hi)
        if b <= a:
            continue
        tail = max(a, min(b, seg_hi - (seg_hi - seg_lo) % width))
        if tail > a:
            c = _hp(hp, wd, grad_scale)
            kind = PARAM_KINDS[p.dtype] if p is not None else 0
            out = p.data_ptr() if p is not None else None
            if fn(
                w.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                v.data_ptr(),
                *old,
                out,
                kind,
                a,
                tail,
                ctypes.byref(c),
                variant,
            ):
                raise KernelUnavailable(f"the host kernel has no variant {variant}")
        if b > tail:
            if source is not None:
                for new, before in zip((w, m, v), source, strict=True):
                    new[tail:b].copy_(before[tail:b])
            adamw_update_(
                w[tail:b],
                g[tail:b].clone(),
                m[tail:b],
                v[tail:b],
                hp,
                decay_end=(b - tail) if wd else 0,
                grad_scale=grad_scale,
                params_out=p[tail:b] if p is not None else None,
            )


def _verified(fn: KernelFn, width: int) -> _Kernel:
    """The variant that reproduces the torch path bit for bit on random data, or KernelUnavailable."""
    gen = torch.Generator().manual_seed(1234)

    def case(n: int, step: int, scale: float) -> tuple[list[torch.Tensor], AdamWStep, int, float]:
        w = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-6, 2, generator=gen)
        m = torch.randn(n, generator=gen) * 1e-2
        v = torch.rand(n, generator=gen) * 1e-3
        hp = AdamWStep(
            lr=3e-4 * (1 + step),
            beta1=0.9,
            beta2=0.95 + 0.01 * (step % 4),
            eps=1e-8,
            weight_decay=0.1,
            step=step,
        )
        return [w, g, m, v], hp, n // 3, scale

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)

    def agrees(variant: int, cases: list[tuple[list[torch.Tensor], AdamWStep, int, float]]) -> bool:
        """In place and out of place (into buffers of NaN), against the torch path."""
        for state, hp, decay_end, scale in cases:
            n = state[0].numel()
            tw, tg, tm, tv = (t.clone() for t in state)
            tp = torch.empty(n, dtype=torch.bfloat16)
            adamw_update_(tw, tg, tm, tv, hp, decay_end=decay_end, grad_scale=scale, params_out=tp)
            for out_of_place in (False, True):
                w, g, m, v = (t.clone() for t in state)
                source = None
                if out_of_place:
                    source = (w, m, v)
                    w, m, v = (torch.full((n,), float("nan")) for _ in range(3))
                p = torch.empty(n, dtype=torch.bfloat16)
                _run(fn, variant, width, w, g, m, v, p, hp, decay_end, scale, 0, n, source)
                if not all(torch.equal(bits(a), bits(b)) for a, b in ((w, tw), (m, tm), (v, tv), (p, tp))):
                    return False
        return True

    # Sizes with and without remainders; the first variant that agrees on a small case is confirmed on all.
    quick = [case(64 * width, 2, 0.37)]
    cases = [
        *(case(3 * 4096 * width, s, c) for s, c in ((1, 1.0), (2, 0.37), (9, 1.0))),
        *(case(width * (3 + k % 5) + 1 + k % (width - 1), 1 + k, 0.5 if k % 2 else 1.0) for k in range(8)),
    ]
    for variant in VARIANTS:
        if agrees(variant, quick) and agrees(variant, cases):
            return _Kernel(fn, variant, width)
    raise KernelUnavailable(
        "the compiled kernel does not reproduce torch's fused AdamW bit for bit on this machine"
    )


class HostAdamW:
    """AdamW of one optimizer actor: the verified host kernel on `threads` threads, or the torch path.

    Lifecycle: one per optimizer actor, built with it (the first builds the kernel, the others find it in
    the cache); `update_` per element range; `close` stops the threads."""

    def __init__(self, threads: int, mode: KernelMode = "auto") -> None:
        self.threads = max(1, threads)
        self.kernel: _Kernel | None = None
        self.reason = "runtime.adam_kernel: torch"
        if mode == "auto":
            try:
                self.kernel = load_kernel()
                self.reason = f"host kernel (variant {self.kernel.variant})"
            except KernelUnavailable as exc:
                self.reason = f"torch path: {exc}"
                log.warning("AdamW: %s", self.reason)
        self._pool = ThreadPoolExecutor(self.threads, "adamw") if self.kernel and self.threads > 1 else None

    @property
    def native(self) -> bool:
        return self.kernel is not None

    def update_(
        self,
        master: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        hp: AdamWStep,
        *,
        decay_end: int,
        grad_scale: float = 1.0,
        params_out: torch.Tensor | None = None,
        source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """As `fuyou_ray.optim.adamw_update_` (same results, bit for bit), except that `grad` is left as
        it was when the host kernel runs. With `source` (master, exp_avg, exp_avg_sq of the step's old
        state, other buffers of the same size) the update reads the old state there and writes the new one
        into `master`, `exp_avg`, `exp_avg_sq`, whatever they held: one pass with the kernel, a copy and
        the in-place update on the torch path."""
        k = self.kernel
        tensors = (master, grad, exp_avg, exp_avg_sq, *(source or ()))
        if source is not None and any(t.shape != master.shape for t in source):
            raise ValueError("update_: the old state must have the new state's shape")
        usable = (
            k is not None
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and (params_out is None or (params_out.dtype in PARAM_KINDS and params_out.is_contiguous()))
        )
        if not usable or k is None:
            if source is not None:
                for new, old in zip((master, exp_avg, exp_avg_sq), source, strict=True):
                    new.copy_(old)
            adamw_update_(
                master,
                grad,
                exp_avg,
                exp_avg_sq,
                hp,
                decay_end=decay_end,
                grad_scale=grad_scale,
                params_out=params_out,
            )
            return
        n = master.numel()
        decay_end = max(0, min(decay_end, n))
        pieces = shard_ranges(n, self.threads, PIECE_ALIGN)

        def run(lo: int, hi: int) -> None:
            _run(
                k.fn,
                k.variant,
                k.width,
                master,
                grad,
                exp_avg,
                exp_avg_sq,
                params_out,
                hp,
                decay_end,
                grad_scale,
                lo,
                hi,
                source,
            )

        if self._pool is None or len(pieces) == 1:
            for lo, hi in pieces:
                run(lo, hi)
            return
        futures = [self._pool.submit(run, lo, hi) for lo, hi in pieces]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # (Ctrl-C in an in-process run): pieces still running write into the caller's buffers, which
            # its shutdown may unmap next; let them finish first
            for future in futures:
                future.cancel()
            wait(futures)
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def pool_rate(
    numel: int, threads: int, pool: int = 1, param_dtype: str = "bfloat16", kernel: KernelMode = "auto"
) -> float:
    """AdamW params/s of an optimizer pool: `pool` updaters (HostAdamW on `threads` threads each, clipping
    scale on and params out, as the actors run it), each on its own `numel` elements, all at once. The
    update is bound by host memory bandwidth, so a pool's rate is measured, not one updater's rate times
    the pool size (on the H100 box that product said 5.95 Gparam/s; inside a step the pool updated about
    3). The bench and the probe both measure with it."""
    dtype = torch.bfloat16 if param_dtype == "bfloat16" else torch.float32
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    updaters = [HostAdamW(threads, kernel) for _ in range(max(1, pool))]
    try:
        data = []
        for _ in updaters:
            w, g, m, v = (torch.randn(numel) for _ in range(4))
            v.abs_()
            data.append((w, g, m, v, torch.empty(numel, dtype=dtype)))
        hp = AdamWStep(1, 1e-4, 0.9, 0.95, 1e-8, 0.1)

        def update(k: int) -> None:
            w, g, m, v, p = data[k]
            updaters[k].update_(w, g, m, v, hp, decay_end=numel // 2, grad_scale=0.5, params_out=p)

        with ThreadPoolExecutor(max_workers=len(updaters)) as callers:  # the kernel releases the GIL

            def everyone() -> None:
                list(callers.map(update, range(len(updaters))))

            everyone()  # warm-up: pages touched, kernel loaded
            t0 = time.perf_counter()
            for _ in range(3):
                everyone()
            seconds = (time.perf_counter() - t0) / 3
    finally:
        for adamw in updaters:
            adamw.close()
        torch.set_num_threads(previous)
    return len(updaters) * numel / seconds
