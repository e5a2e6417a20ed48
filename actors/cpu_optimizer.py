"""The CPU optimizer actor: AdamW over an element range of a unit's ring slots (one of a pool)."""

from __future__ import annotations

import math
import os

import torch

from fuyou_ray.cache import LentRecord, LentViews
from fuyou_ray.cpu_adam import HostAdamW, KernelMode
from fuyou_ray.errors import NonFiniteStepError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.optim import AdamWStep
from fuyou_ray.ring import RingMapping, RingSpec, SlotHandle
from fuyou_ray.timeline import Span, Timeline


class CPUOptimizerActor:
    """One member of the optimizer pool (named `fuyou:cpu-opt-<rank>`).

    Owns a ring mapping, its thread count and its AdamW (`HostAdamW`: the host kernel on those threads,
    or torch's fused AdamW where the kernel is unavailable). `update` runs AdamW in place on the slots
    holding a unit's master weights, moments and gradient - only the [lo, hi) element range it is given,
    so the pool shares one unit without copies - and writes the new compute-dtype params into `params`.
    Stateless between calls, so a restarted actor simply continues. `update` is not idempotent (it updates
    its slots in place): Ray never retries it (max_task_retries=0); after a failure the driver replays the
    step, which reads the state into the slots afresh.
    """

    def __init__(self, ring: RingSpec, rank: int, threads: int, adam_kernel: KernelMode = "auto") -> None:
        self.log = setup_logging(f"cpu-opt-{rank}")
        self.memory = MemoryMeter(f"cpu-opt-{rank}")
        self.rank = rank
        if threads > 0:
            torch.set_num_threads(threads)
        self.ring = RingMapping(ring)
        self.lent = LentViews()
        self.adamw = HostAdamW(threads or torch.get_num_threads(), adam_kernel)
        self.log.info("AdamW: %s on %d thread(s)", self.adamw.reason, self.adamw.threads)
        self.timeline = Timeline()
        self.elements = 0

    def update(
        self,
        master: SlotHandle | LentRecord,
        grad: SlotHandle | LentRecord,
        exp_avg: SlotHandle | LentRecord,
        exp_avg_sq: SlotHandle | LentRecord,
        params: SlotHandle,
        lo: int,
        hi: int,
        decay_end: int,
        hp: AdamWStep,
        grad_scale: float,
        *after: object,
    ) -> int:
        """AdamW on elements [lo, hi) of one unit; returns the number of elements updated.

        Refuses (NonFiniteStepError) a non-finite gradient before touching the state, so NaN never reaches
        the SSD: with clipping the coefficient says it (NaN for a NaN norm, 0 for an infinite one); without
        it (scale 1) the gradient range itself is checked - one summing pass, which any NaN or inf poisons.

        The state comes either in ring slots (updated in place) or as records the host cache lent
        (`LentRecord`: the new version's file, either a copy of the version the step reads, updated in
        place, or, lent without the copy, written from that version's file, which is only read).
        The gradient comes in a slot or, when the host cache holds the step's gradient log, as the log's
        cache file, read in place (`CachedStore.view`).
        """
        # A slot may hold a range of its record (`first`): a unit too large for one slot is updated range
        # by range; the params slot always holds the whole unit.
        label = master.name if isinstance(master, LentRecord) else master.tensor
        grad_label = grad.name if isinstance(grad, LentRecord) else grad.tensor
        lent = [h for h in (master, grad) if isinstance(h, LentRecord)]
        if lent:
            self.lent.forget_missing(lent[0].prefix)
        p = self.ring.tensor(params)[params.elements(lo, hi)]
        if isinstance(grad, LentRecord):  # the gradient log, read in place in the host cache
            g = self.lent.view(grad, lo, hi)
        else:
            g = self.ring.tensor(grad)[grad.elements(lo, hi)]
        finite = math.isfinite(grad_scale) and grad_scale > 0
        if finite and grad_scale == 1.0:
            finite = bool(torch.isfinite(g.sum()))
        if not finite:
            raise NonFiniteStepError(
                f"{grad_label}: non-finite gradient (clip coefficient {grad_scale}); unit not updated"
            )
        source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        with self.timeline.span("cpu adam", label, (hi - lo) * 4):
            if (
                isinstance(master, SlotHandle)
                and isinstance(exp_avg, SlotHandle)
                and isinstance(exp_avg_sq, SlotHandle)
            ):
                w, m, v = (self.ring.tensor(h)[h.elements(lo, hi)] for h in (master, exp_avg, exp_avg_sq))
            elif (
                isinstance(master, LentRecord)
                and isinstance(exp_avg, LentRecord)
                and isinstance(exp_avg_sq, LentRecord)
            ):
                w, m, v = (self.lent.view(h, lo, hi) for h in (master, exp_avg, exp_avg_sq))
                if master.source:  # lent without a copy: read the version the step read, write the new one
                    source = (
                        self.lent.view_source(master, lo, hi),
                        self.lent.view_source(exp_avg, lo, hi),
                        self.lent.view_source(exp_avg_sq, lo, hi),
                    )
            else:
                raise TypeError("update: master, exp_avg and exp_avg_sq must all be slots or all lent")
            self.adamw.update_(
                w, g, m, v, hp, decay_end=decay_end - lo, grad_scale=grad_scale, params_out=p, source=source
            )
        self.elements += hi - lo
        return hi - lo

    def pid(self) -> int:
        return os.getpid()

    def drain_timeline(self) -> list[Span]:
        return self.timeline.drain()

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def reset_memory_baseline(self) -> None:
        self.memory.reset()

    def shutdown(self) -> None:
        self.adamw.close()
        self.lent.close()
        self.ring.close()
