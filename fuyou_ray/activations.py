"""Block inputs parked in host memory between a step's forward and its backward.

The compute actor keeps each unit's input (the activation at the unit boundary) from the forward to the
backward, which recomputes the unit's forward from it. At the paper's batch (64 x 1024 tokens) a 13B-width
boundary is 0.67 GB in bf16, so 40 blocks need 27 GB of device memory for them alone. The plan's
"recompute" activation policy (fuyou_ray/plan.py) parks the inputs of the blocks it names in page-locked
host memory instead: the forward copies each one out on the D2H stream while the next block computes, and
the backward of block u+1 starts copying block u's input back on the H2D stream, so it is on the device
when block u's backward begins. Both copies overlap compute; the device holds at most two parked inputs
at once (one leaving in the forward, one arriving in the backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from fuyou_ray.errors import FuyouError

if TYPE_CHECKING:
    from actors.gpu_compute import DeviceLanes

ALIGN = 4096  # each parked tensor starts on a page boundary of the arena


class ActivationParkingError(FuyouError):
    """A parked block input is missing or does not match the arena (a bug in the step's call order)."""


class HostActivations:
    """Owns the host arena that holds the parked inputs of `units` (one region per unit, reused every
    step) and the copies in and out of it, on the compute device's lanes.

    Lifecycle: one per compute actor. `park(u, xs)` right after the forward that produced unit u's input
    (the device copies stay until unit u's own forward has used them); `prefetch(u)` during the backward of
    the unit after u; `take(u)` in unit u's backward returns the inputs on the device. `reset()` at each
    step's start forgets what the previous step parked; `close()` unpins the arena. The arena is allocated
    at the first `park` (the batch shape is known then) and page-locked with cudaHostRegister on CUDA, so
    the copies are DMA transfers; on the CPU fallback it is plain memory and the copies are synchronous.
    """

    def __init__(self, units: Iterable[int], lanes: DeviceLanes) -> None:
        self.units = tuple(sorted(set(units)))
        self.lanes = lanes
        self._arena: torch.Tensor | None = None
        self._registered = 0  # data_ptr of the arena while page-locked
        self._layout: tuple[tuple[tuple[int, ...], ...], torch.dtype] | None = None
        self._offsets: list[int] = []  # byte offset of each micro-batch's tensor within a unit's region
        self._sizes: list[int] = []  # its bytes
        self._unit_bytes = 0
        self._parked: dict[int, torch.cuda.Event | None] = {}  # unit -> its D2H copy's completion
        self._fetched: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.bytes_out = 0
        self.bytes_in = 0

    def __contains__(self, unit: int) -> bool:
        """Whether unit `unit`'s input is parked for this step (its backward must `take` it)."""
        return unit in self._parked

    @property
    def arena_bytes(self) -> int:
        return 0 if self._arena is None else self._arena.numel()

    def parks(self, unit: int) -> bool:
        """Whether the plan parks unit `unit`'s input in host memory."""
        return unit in self.units

    def reset(self) -> None:
        """Forget the previous step's parked inputs (their bytes are overwritten by the next `park`)."""
        for _, ready in self._fetched.values():
            if ready is not None:
                ready.synchronize()  # an unused prefetch must finish reading the arena first
        self._parked.clear()
        self._fetched.clear()

    def park(self, unit: int, xs: list[torch.Tensor]) -> None:
        """Copy unit `unit`'s input micro-batches, just computed on the compute lane, into the arena.
        The caller keeps `xs` for unit `unit`'s forward and drops them after it."""
        if not self.parks(unit):
            raise ActivationParkingError(f"unit {unit} is not one whose input the plan parks ({self.units})")
        views = self._views(unit, xs)
        nbytes = sum(x.numel() * x.element_size() for x in xs)
        d2h = self.lanes.d2h
        if d2h is not None:
            d2h.wait_stream(self.lanes.compute)  # type: ignore[arg-type]  # the forward that made xs
        with self.lanes.on("d2h", f"u{unit:05d}.input", nbytes) as stream:
            for view, x in zip(views, xs, strict=True):
                if stream is not None:
                    x.record_stream(stream)  # the allocator must not reuse x before the copy ran
                view.copy_(x, non_blocking=True)
        done = None
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
        self._parked[unit] = done
        self.bytes_out += nbytes

    def prefetch(self, unit: int) -> None:
        """Start copying unit `unit`'s parked input back to the device (no-op if it is not parked or
        already on its way)."""
        if unit not in self._parked or unit in self._fetched:
            return
        views = self._views(unit)
        parked = self._parked[unit]
        h2d = self.lanes.h2d
        if h2d is not None and parked is not None:
            h2d.wait_event(parked)
        nbytes = sum(v.numel() * v.element_size() for v in views)
        with self.lanes.on("h2d", f"u{unit:05d}.input", nbytes) as stream:
            # allocated on the copy stream: no block the compute stream may still be reading
            xs = [torch.empty(v.shape, dtype=v.dtype, device=self.lanes.device) for v in views]
            for x, v in zip(xs, views, strict=True):
                x.copy_(v, non_blocking=True)
        ready = None
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(stream)
        self._fetched[unit] = (xs, ready)
        self.bytes_in += nbytes

    def take(self, unit: int) -> list[torch.Tensor]:
        """Unit `unit`'s input on the device for its backward: the compute lane waits for the copy (started
        now if no prefetch did). The unit is no longer parked afterwards."""
        if unit not in self._parked:
            raise ActivationParkingError(
                f"unit {unit}'s input is not parked: its forward did not run in this step"
            )
        self.prefetch(unit)
        xs, ready = self._fetched.pop(unit)
        del self._parked[unit]
        compute = self.lanes.compute
        if compute is not None and ready is not None:
            compute.wait_event(ready)
            for x in xs:
                x.record_stream(compute)
        return xs

    def close(self) -> None:
        self.reset()
        self._unregister()
        self._arena = None
        self._layout = None

    # ------------------------------------------------------------------------------------------ arena

    def _views(self, unit: int, like: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Unit `unit`'s region of the arena as tensors shaped as its micro-batches (`like` sets the shape
        at a `park`; the arena is made or remade for a new shape when nothing is parked)."""
        if like is not None:
            layout = (tuple(tuple(x.shape) for x in like), like[0].dtype)
            if layout != self._layout:
                if self._parked:
                    raise ActivationParkingError(
                        f"unit {unit}'s input has shape {layout[0][0]} x {len(like)}, not that of the "
                        "inputs parked in this step"
                    )
                self._allocate(layout)
        if self._arena is None or self._layout is None:
            raise ActivationParkingError(f"unit {unit}: nothing was parked in this step")
        shapes, dtype = self._layout
        base = self.units.index(unit) * self._unit_bytes
        return [
            self._arena[base + off : base + off + n].view(dtype).view(shape)
            for off, n, shape in zip(self._offsets, self._sizes, shapes, strict=True)
        ]

    def _allocate(self, layout: tuple[tuple[tuple[int, ...], ...], torch.dtype]) -> None:
        self.close()
        shapes, dtype = layout
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._sizes = [itemsize * math.prod(shape) for shape in shapes]
        aligned = [-(-n // ALIGN) * ALIGN for n in self._sizes]
        self._offsets = [sum(aligned[:i]) for i in range(len(aligned))]
        total = self._unit_bytes = sum(aligned)
        arena = torch.empty(len(self.units) * total, dtype=torch.uint8)
        if self.lanes.cuda:
            err = int(torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0))
            if err != 0:
                raise ActivationParkingError(
                    f"cudaHostRegister of the {arena.numel() / 2**30:.2f} GiB activation arena failed "
                    f"(CUDA error {err}): host memory is short; raise budgets.cpu_mem headroom or lower "
                    "the batch"
                )
            self._registered = arena.data_ptr()
        self._arena, self._layout = arena, layout

    def _unregister(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = 0
