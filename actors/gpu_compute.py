"""The GPU compute actor: runs the model unit by unit on weights streamed through the ring."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from torch.func import functional_call

from fuyou_ray.activations import HostActivations
from fuyou_ray.config import ModelConfig
from fuyou_ray.errors import ForwardLostError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec, lm_loss
from fuyou_ray.models.gpt import IGNORE_INDEX
from fuyou_ray.optim import clip_coefficient, parameter_norms, total_grad_norm
from fuyou_ray.ring import DTYPES, RingMapping, RingSpec, SlotHandle
from fuyou_ray.timeline import Span, Timeline


class DeviceLanes:
    """The compute device's three lanes - compute, H2D copies, D2H copies - and their timing.

    On CUDA each lane is a stream: copies of unit i+1's params run while unit i computes, and the D2H of
    unit i's gradient while unit i-1 computes. Busy intervals are timed with CUDA events, converted to
    wall-clock time against an anchor taken at the start of each step, so they line up with the other
    actors' spans. On the CPU fallback the lanes are one synchronous lane, timed on the host.
    """

    def __init__(self, device: torch.device, timeline: Timeline) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.timeline = timeline
        self.compute = torch.cuda.current_stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self._pending: list[tuple[str, str, int, torch.cuda.Event, torch.cuda.Event]] = []
        self._anchor: tuple[float, torch.cuda.Event] | None = None

    def anchor(self) -> None:
        """Tie CUDA event times to wall-clock time (one synchronize per step)."""
        if self.cuda:
            self.flush()
            torch.cuda.synchronize(self.device)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.compute)
            event.synchronize()
            self._anchor = (time.time(), event)

    @contextlib.contextmanager
    def on(self, lane: str, label: str, nbytes: int = 0) -> Iterator[torch.cuda.Stream | None]:
        """Run the body's CUDA work on `lane`'s stream and time it there (host-timed on CPU)."""
        if not self.cuda:
            with self.timeline.span(lane, label, nbytes):
                yield None
            return
        stream = {"gpu compute": self.compute, "h2d": self.h2d, "d2h": self.d2h}[lane]
        assert stream is not None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            yield stream
            end.record(stream)
        self._pending.append((lane, label, nbytes, start, end))

    def flush(self, wait: bool = True) -> None:
        """Turn recorded CUDA events into spans: all of them (synchronizing on the events), or with
        `wait=False` those already complete (a drain between steps must not wait for compute that the
        next step's forward, run ahead, still has queued)."""
        if not self.cuda or self._anchor is None:
            self._pending.clear()
            return
        wall, ref = self._anchor
        left = []
        for pending in self._pending:
            lane, label, nbytes, start, end = pending
            if not wait and not end.query():
                left.append(pending)
                continue
            end.synchronize()
            t0 = wall + ref.elapsed_time(start) / 1e3
            t1 = wall + ref.elapsed_time(end) / 1e3
            self.timeline.add(Span(lane, label, t0, t1, nbytes))
        self._pending = left


class GPUComputeActor:
    """Owns the compute device, a weightless copy of every unit, and the step's activations.

    Lifecycle: created once per run (name `fuyou:gpu-compute`, `num_gpus=1` when CUDA is used); pins the
    ring on CUDA. Per step: `start_step` receives the batch; `forward(u)` runs unit u on the WHOLE batch
    (micro-batch by micro-batch) with params read from a ring slot, keeping each unit's input; `head` runs
    the last unit forward and backward at once (its params are loaded once per step); `backward(u)` reloads
    unit u's params, recomputes its forward from the kept input and backpropagates, accumulating the unit's
    gradient over micro-batches in fp32 on the device. The inputs of the blocks in `park` (the plan's
    "recompute" activation policy) wait for the backward in host memory, not on the device
    (fuyou_ray/activations.py: copied out during the forward, back during the backward of the unit after).
    `emit_grad(u)` copies the gradient into a ring slot. Calls that read a ring slot return once the slot's
    bytes are on the device (the slot is free); `emit_grad` returns once the slot is filled; compute itself
    runs on asynchronously, so the schedule overlaps it with the next unit's copies. With exact clipping the
    next step's `start_step`, forward and head calls may come at the end of a step (after `step_summary`),
    fed from the optimizer's new-params slots; that step then opens with `check_forward`. A restarted actor
    has lost the step's activations: the driver replays the step from `start_step`.
    """

    def __init__(
        self, model: ModelConfig, ring: RingSpec, device: str, compute_dtype: str, park: Sequence[int] = ()
    ) -> None:
        self.log = setup_logging("gpu-compute")
        self.memory = MemoryMeter("gpu-compute")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Ray exposes the actor's GPU as the only visible device.
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = DTYPES[compute_dtype]
        self.spec = ModelSpec(model)
        self.units = [self.spec.build_unit(u.index, "meta") for u in self.spec.units]
        # Parameter names of each unit in module order: the order clip_grad_norm_ stacks norms in.
        self.param_order = [[n for n, _ in m.named_parameters()] for m in self.units]
        self.ring = RingMapping(ring)
        if self.device.type == "cuda":
            self.ring.pin()
        self.timeline = Timeline()
        self.lanes = DeviceLanes(self.device, self.timeline)
        self.parked = HostActivations(park, self.lanes)
        self.step = -1  # the 0-based step whose batch this actor holds
        self.inputs: list[list[torch.Tensor]] = []
        self.grad_out: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.accum = 1
        self.loss = torch.zeros(())
        # fp32 gradients computed but not yet emitted, with the event that marks them complete on CUDA
        self.grads: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.grad_left: dict[int, int] = {}  # elements of a gradient emitted range by range still to go
        self.norms: dict[int, list[torch.Tensor]] = {}
        self.log.info(
            "compute on %s in %s, %d units, inputs of units %s parked in host memory",
            self.device,
            compute_dtype,
            len(self.units),
            list(self.parked.units) or "none",
        )

    # ---------------------------------------------------------------------------------------- the step

    def start_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int, step: int = -1, *after: object
    ) -> int:
        """Take 0-based step `step`'s batch (global_batch, seq_len); forget the previous step's state.

        Called either at the start of the step or, ahead, at the end of the previous one (its optimizer
        then runs this step's forward: `check_forward` opens the step instead)."""
        self.lanes.anchor()
        self.parked.reset()
        self.step = step
        n = self.spec.num_units
        self.inputs = [[] for _ in range(n)]
        self.inputs[0] = [t.to(self.device) for t in inputs.split(micro_batch)]
        self.targets = [t.to(self.device) for t in targets.split(micro_batch)]
        self.accum = len(self.targets)
        self.grad_out = []
        self.loss = torch.zeros((), device=self.device)
        self.grads = {}
        self.grad_left = {}
        self.norms = {}
        return self.accum

    def check_forward(self, step: int, *after: object) -> int:
        """Open step `step` whose forward and head already ran (ahead, during the previous step's
        optimizer): ForwardLostError unless this actor holds what they left - every unit's input but the
        head's, the head's gradient and the gradient it passes back (a restart loses them)."""
        last = self.spec.num_units - 1
        held = [u for u in range(last) if len(self.inputs[u]) == self.accum or u in self.parked]
        head = last in self.grads and len(self.grad_out) == self.accum
        if self.step != step or len(held) != last or not head:
            raise ForwardLostError(
                f"the GPU actor holds step {self.step + 1}'s forward of units {held} (head: {head}), not "
                f"step {step + 1}'s: it was restarted between the steps. The driver runs the step again."
            )
        return self.accum

    def forward(self, unit: int, params: SlotHandle, *after: object) -> int:
        """Run unit `unit` forward on every micro-batch; keep its outputs as the next unit's inputs."""
        flat = self._load(params, requires_grad=False)
        named = self.spec.units[unit].layout.unflatten(flat)
        with torch.no_grad(), self.lanes.on("gpu compute", f"forward {unit}"):
            self.inputs[unit + 1] = [
                functional_call(self.units[unit], named, (x,)) for x in self.inputs[unit]
            ]
        if self.parked.parks(unit + 1):
            self.parked.park(unit + 1, self.inputs[unit + 1])
        if self.parked.parks(unit):
            self.inputs[unit] = []  # parked in host memory since the forward before: the device lets go
        return unit

    def head(self, unit: int, params: SlotHandle, *after: object) -> int:
        """Last unit: forward + loss + backward in one visit (its params are loaded once per step)."""
        flat = self._load(params, requires_grad=False)
        named = self._leaves(unit, flat)
        grad_acc = torch.zeros(flat.numel(), dtype=torch.float32, device=self.device)
        self.grad_out = []
        with self.lanes.on("gpu compute", f"head {unit}"):
            for x, y in zip(self.inputs[unit], self.targets, strict=True):
                x = x.detach().requires_grad_(True)
                loss = lm_loss(functional_call(self.units[unit], named, (x,)), y) / self.accum
                *g_params, g_x = torch.autograd.grad(loss, [*named.values(), x], allow_unused=True)
                self._accumulate(unit, grad_acc, g_params)
                self.grad_out.append(g_x)
                self.loss += loss.detach()
            self._keep_grad(unit, grad_acc)
        self.inputs[unit] = []
        self.parked.prefetch(unit - 1)  # the next backward's input, while this unit computes
        return unit

    def eval_head(self, unit: int, params: SlotHandle, *after: object) -> tuple[float, int]:
        """Last unit without backward: (summed next-token loss, number of scored targets) of the batch."""
        flat = self._load(params, requires_grad=False)
        named = self.spec.units[unit].layout.unflatten(flat)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with torch.no_grad(), self.lanes.on("gpu compute", f"eval {unit}"):
            for x, y in zip(self.inputs[unit], self.targets, strict=True):
                logits = functional_call(self.units[unit], named, (x,))
                scored = int((y != IGNORE_INDEX).sum())
                total += lm_loss(logits, y).double() * scored
                count += scored
        self.inputs[unit] = []
        return float(total), count

    def backward(self, unit: int, params: SlotHandle, *after: object) -> int:
        """Recompute unit `unit` from its kept input and backpropagate; the gradient stays on the device."""
        flat = self._load(params, requires_grad=False)
        named = self._leaves(unit, flat)
        grad_acc = torch.zeros(flat.numel(), dtype=torch.float32, device=self.device)
        grad_in = []
        inputs = self.parked.take(unit) if unit in self.parked else self.inputs[unit]
        with self.lanes.on("gpu compute", f"backward {unit}"):
            for x, g_out in zip(inputs, self.grad_out, strict=True):
                differentiable = x.is_floating_point()
                if differentiable:
                    x = x.detach().requires_grad_(True)
                out = functional_call(self.units[unit], named, (x,))
                wrt = [*named.values(), x] if differentiable else list(named.values())
                grads = torch.autograd.grad(out, wrt, grad_outputs=g_out, allow_unused=True)
                self._accumulate(unit, grad_acc, grads[: len(named)])
                if differentiable:
                    grad_in.append(grads[-1])
            self._keep_grad(unit, grad_acc)
        self.inputs[unit] = []
        self.grad_out = grad_in
        self.parked.prefetch(unit - 1)
        return unit

    def emit_grad(self, unit: int, slot: SlotHandle, *after: object) -> SlotHandle:
        """Copy unit `unit`'s fp32 gradient - elements [slot.first, slot.first + slot.numel), the whole
        gradient unless the slot carries a range of it - into `slot` (D2H); returns when the slot holds it.
        The device lets go of the gradient once its last element is out."""
        grad, ready = self.grads[unit]
        lo = slot.first
        hi = lo + (slot.numel or grad.numel() - lo)
        left = self.grad_left.get(unit, grad.numel()) - (hi - lo)
        if left > 0:
            self.grad_left[unit] = left
        else:
            del self.grads[unit]
            self.grad_left.pop(unit, None)
        handle = slot.carrying(slot.tensor, "float32", hi - lo, slot.version, first=lo)
        dest = self.ring.tensor(handle)
        with self.lanes.on("d2h", slot.tensor, handle.nbytes) as stream:
            if stream is not None and ready is not None:
                # Wait for this unit's backward only, not for the next unit's, which the schedule has
                # already enqueued: the copy-out then overlaps that compute.
                stream.wait_event(ready)
                grad.record_stream(stream)
            dest.copy_(grad[lo:hi], non_blocking=True)
        if stream is not None:
            stream.synchronize()
        return handle

    def clip_coefficient(self, max_norm: float, *after: object) -> float:
        """The global-norm clipping coefficient of this step's gradients (call after every backward)."""
        return clip_coefficient(max_norm, self._total_norm())

    def step_summary(self, *after: object) -> dict[str, float]:
        return {"loss": float(self.loss), "grad_norm": float(self._total_norm())}

    # ---------------------------------------------------------------------------------------- helpers

    def _total_norm(self) -> torch.Tensor:
        return total_grad_norm([n for unit in sorted(self.norms) for n in self.norms[unit]])

    def _leaves(self, unit: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unit's parameters as leaf tensors that view `flat` (no copies), in layout order, so autograd
        returns one gradient per parameter. Differentiating through views of a flat leaf instead makes
        each view's backward allocate and zero a gradient of the whole unit (slice_backward) and add them
        up: at 175B width 3.6 GB per parameter, which took the device 2.6 GiB past a 24 GiB budget."""
        views = self.spec.units[unit].layout.unflatten(flat)
        return {name: view.detach().requires_grad_(True) for name, view in views.items()}

    def _accumulate(self, unit: int, grad_acc: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> None:
        """Add per-parameter gradients (layout order) into the unit's flat fp32 accumulator, in place."""
        for s, g in zip(self.spec.units[unit].layout.slices, grads, strict=True):
            if g is not None:  # a parameter this unit's forward did not use
                grad_acc[s.offset : s.offset + s.numel].add_(g.reshape(-1))

    def _keep_grad(self, unit: int, grad: torch.Tensor) -> None:
        named = self.spec.units[unit].layout.unflatten(grad)
        self.norms[unit] = parameter_norms([named[n] for n in self.param_order[unit]])
        ready = None
        if self.lanes.compute is not None:
            ready = torch.cuda.Event()
            ready.record(self.lanes.compute)
        self.grads[unit] = (grad, ready)

    def _load(self, params: SlotHandle, requires_grad: bool) -> torch.Tensor:
        """Copy a unit's params from a ring slot to the device; returns once the slot may be reused."""
        src = self.ring.tensor(params)
        with self.lanes.on("h2d", params.tensor, params.nbytes) as stream:
            flat = torch.empty(src.numel(), dtype=self.dtype, device=self.device)
            flat.copy_(src, non_blocking=True)
        if stream is not None:
            stream.synchronize()  # the slot's bytes are on the device: the slot is free
            self.lanes.compute.wait_stream(stream)  # type: ignore[union-attr]
            flat.record_stream(self.lanes.compute)  # type: ignore[arg-type]
        return flat.requires_grad_(requires_grad)

    def drain_timeline(self) -> list[Span]:
        self.lanes.flush(wait=False)
        return self.timeline.drain()

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def reset_memory_baseline(self) -> None:
        self.memory.reset()

    def peak_device_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return 0

    def shutdown(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.parked.close()
        self.ring.close()
