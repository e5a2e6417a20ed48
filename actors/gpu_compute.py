"""The GPU compute actor: runs the model unit by unit on weights streamed through the ring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.func import functional_call

from fuyou_ray.config import ModelConfig
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec, lm_loss
from fuyou_ray.optim import clip_coefficient, parameter_norms, total_grad_norm
from fuyou_ray.ring import DTYPES, RingMapping, RingSpec, SlotHandle
from fuyou_ray.timeline import Span, Timeline


class GPUComputeActor:
    """Owns the compute device, a weightless copy of every unit, and the step's activations.

    Lifecycle: created once per run (name `fuyou:gpu-compute`, `num_gpus=1` when CUDA is used); pins the
    ring on CUDA. Per step: `start_step` receives the batch; `forward(u)` runs unit u on the WHOLE batch
    (micro-batch by micro-batch) with params read from a ring slot, keeping each unit's input; `head` runs
    the last unit forward and backward at once (its params are loaded once per step); `backward(u)`
    reloads unit u's params, recomputes its forward from the kept input and backpropagates, accumulating
    the unit's gradient over micro-batches and writing it (fp32) into a ring slot. Every call returns only
    when what it wrote to the ring is complete. A restarted actor has lost the step's activations: the
    driver replays the step from `start_step`.
    """

    def __init__(self, model: ModelConfig, ring: RingSpec, device: str, compute_dtype: str) -> None:
        self.log = setup_logging("gpu-compute")
        self.memory = MemoryMeter("gpu-compute")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Ray exposes the actor's GPU as the only visible device.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[compute_dtype]
        self.spec = ModelSpec(model)
        self.units = [self.spec.build_unit(u.index, "meta") for u in self.spec.units]
        # Parameter names of each unit in module order: the order clip_grad_norm_ stacks norms in.
        self.param_order = [[n for n, _ in m.named_parameters()] for m in self.units]
        self.ring = RingMapping(ring)
        self.timeline = Timeline()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.ring.pin()
        self.inputs: list[list[torch.Tensor]] = []
        self.grad_out: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.accum = 1
        self.loss = 0.0
        self.norms: dict[int, list[torch.Tensor]] = {}
        self.log.info("compute on %s in %s, %d units", self.device, compute_dtype, len(self.units))

    # ---------------------------------------------------------------------------------------- the step

    def start_step(self, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> int:
        """Take the step's batch (global_batch, seq_len); forget the previous step's state."""
        n = self.spec.num_units
        self.inputs = [[] for _ in range(n)]
        self.inputs[0] = [t.to(self.device) for t in inputs.split(micro_batch)]
        self.targets = [t.to(self.device) for t in targets.split(micro_batch)]
        self.accum = len(self.targets)
        self.grad_out = []
        self.loss = 0.0
        self.norms = {}
        return self.accum

    def forward(self, unit: int, params: SlotHandle, *after: object) -> int:
        """Run unit `unit` forward on every micro-batch; keep its outputs as the next unit's inputs."""
        named = self._load(unit, params, requires_grad=False)
        with torch.no_grad(), self._compute(f"forward {unit}"):
            self.inputs[unit + 1] = [
                functional_call(self.units[unit], named, (x,)) for x in self.inputs[unit]
            ]
        return unit

    def head(self, unit: int, params: SlotHandle, grad_slot: SlotHandle, *after: object) -> SlotHandle:
        """Last unit: forward + loss + backward in one visit; its gradient goes to `grad_slot`."""
        flat = self._load_flat(params, requires_grad=True)
        named = self.spec.units[unit].layout.unflatten(flat)
        grad_acc = torch.zeros(flat.numel(), dtype=torch.float32, device=self.device)
        self.grad_out = []
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        with self._compute(f"head {unit}"):
            for x, y in zip(self.inputs[unit], self.targets, strict=True):
                x = x.detach().requires_grad_(True)
                loss = lm_loss(functional_call(self.units[unit], named, (x,)), y) / self.accum
                g_flat, g_x = torch.autograd.grad(loss, [flat, x])
                grad_acc += g_flat.float()
                self.grad_out.append(g_x)
                total += loss.detach()
        self.inputs[unit] = []
        self.loss = float(total)
        return self._emit_grad(unit, grad_acc, grad_slot, params.version)

    def backward(self, unit: int, params: SlotHandle, grad_slot: SlotHandle, *after: object) -> SlotHandle:
        """Recompute unit `unit` from its kept input and backpropagate; its gradient goes to `grad_slot`."""
        flat = self._load_flat(params, requires_grad=True)
        named = self.spec.units[unit].layout.unflatten(flat)
        grad_acc = torch.zeros(flat.numel(), dtype=torch.float32, device=self.device)
        grad_in = []
        with self._compute(f"backward {unit}"):
            for x, g_out in zip(self.inputs[unit], self.grad_out, strict=True):
                differentiable = x.is_floating_point()
                if differentiable:
                    x = x.detach().requires_grad_(True)
                out = functional_call(self.units[unit], named, (x,))
                wrt = [flat, x] if differentiable else [flat]
                grads = torch.autograd.grad(out, wrt, grad_outputs=g_out)
                grad_acc += grads[0].float()
                if differentiable:
                    grad_in.append(grads[1])
        self.inputs[unit] = []
        self.grad_out = grad_in
        return self._emit_grad(unit, grad_acc, grad_slot, params.version)

    def clip_coefficient(self, max_norm: float, *after: object) -> float:
        """The global-norm clipping coefficient of this step's gradients (call after every backward)."""
        return clip_coefficient(max_norm, self._total_norm())

    def step_summary(self, *after: object) -> dict[str, float]:
        return {"loss": self.loss, "grad_norm": float(self._total_norm())}

    def _total_norm(self) -> torch.Tensor:
        return total_grad_norm([n for unit in sorted(self.norms) for n in self.norms[unit]])

    # ---------------------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _compute(self, label: str) -> Iterator[None]:
        with self.timeline.span("gpu compute", label):
            yield
            self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load_flat(self, params: SlotHandle, requires_grad: bool) -> torch.Tensor:
        src = self.ring.tensor(params)
        # The copy is what frees the slot for reuse: on CUDA it is the H2D transfer from pinned memory.
        with self.timeline.span("h2d", params.tensor, params.nbytes):
            flat = src.to(self.device, dtype=self.dtype, copy=True)
            self._sync()
        return flat.requires_grad_(requires_grad)

    def _load(self, unit: int, params: SlotHandle, requires_grad: bool) -> dict[str, torch.Tensor]:
        return self.spec.units[unit].layout.unflatten(self._load_flat(params, requires_grad))

    def _emit_grad(self, unit: int, grad: torch.Tensor, slot: SlotHandle, version: int) -> SlotHandle:
        named = self.spec.units[unit].layout.unflatten(grad)
        self.norms[unit] = parameter_norms([named[n] for n in self.param_order[unit]])
        handle = slot.carrying(slot.tensor, "float32", grad.numel(), version)
        with self.timeline.span("d2h", slot.tensor, handle.nbytes):
            self.ring.tensor(handle).copy_(grad)  # D2H into the (pinned) ring slot; synchronous
        return handle

    def drain_timeline(self) -> list[Span]:
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
        self.ring.close()
