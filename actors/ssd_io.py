"""The SSD I/O actor: owns the run's on-SSD tensor store and moves records between it and the ring."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fuyou_ray.config import ModelConfig, SSDConfig
from fuyou_ray.errors import NonFiniteStepError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import DTYPES, RingMapping, RingSpec, SlotHandle
from fuyou_ray.store import SSDTensorStore, aligned_buffer
from fuyou_ray.timeline import Span, Timeline


class SSDIOActor:
    """Owns the `SSDTensorStore` of one run and a mapping of the ring.

    Lifecycle: created by the driver (name `fuyou:ssd-io`, threaded so reads and writes overlap); on
    (re)start it opens the store, which drops whatever an unfinished step staged. `read` fills a ring slot
    from a record; `write` stages a slot's payload as a new record version; `commit` publishes a step.
    """

    def __init__(self, ssd: SSDConfig, ring: RingSpec, model: ModelConfig) -> None:
        self.log = setup_logging("ssd-io")
        # Built here, not on first use: building torch modules pulls in ~75 MB of lazy imports, which
        # belong to the process's baseline, not to the memory budget.
        self.spec = ModelSpec(model)
        self.memory = MemoryMeter("ssd-io")
        self.store = SSDTensorStore(
            ssd.paths,
            direct_io=ssd.direct_io,
            io_threads=ssd.io_threads,
            verify_checksums=ssd.verify_checksums,
        )
        self.ring = RingMapping(ring)
        self.timeline = Timeline()
        self.log.info("store at %s, committed step %d", ", ".join(ssd.paths), self.store.committed_step)

    # ------------------------------------------------------------------------------ the step's I/O

    def read(self, name: str, slot: SlotHandle, *after: object) -> SlotHandle:
        """Fill `slot` with the newest version of record `name`; returns the slot, now carrying it."""
        rec = self.store.record(name)
        handle = slot.carrying(name, rec.dtype, rec.numel, rec.version)
        with self.timeline.span("ssd read", name, rec.padded_nbytes):
            self.store.read_into(name, self.ring.memoryview(handle))
        return handle

    def write(self, slot: SlotHandle, version: int, transient: bool, *after: object) -> int:
        """Stage the slot's payload as version `version` of its record. Returns bytes written."""
        with self.timeline.span("ssd write", slot.tensor, slot.nbytes):
            rec = self.store.write_from(
                slot.tensor,
                self.ring.memoryview(slot),
                dtype=slot.dtype,
                numel=slot.numel,
                version=version,
                transient=transient,
            )
        return rec.padded_nbytes

    def commit(self, step: int, meta: Mapping[str, Any], summary: Mapping[str, float], *after: object) -> int:
        """Publish everything staged as committed step `step` (atomic), unless its loss is not finite.

        A step with a NaN/inf loss or gradient norm is discarded: its staged writes are deleted and the
        last committed state stays as it was.
        """
        bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
        if bad:
            self.store.discard_staged()
            raise NonFiniteStepError(
                f"step {step} produced non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                f"nothing was committed (the run stays at step {self.store.committed_step}). "
                "Lower optimizer.lr or check the data."
            )
        with self.timeline.span("ssd write", f"commit {step}"):
            self.store.commit(step, {**meta, **summary})
        return step

    def discard_staged(self) -> None:
        self.store.discard_staged()

    # ------------------------------------------------------------------------------ set-up and queries

    def committed(self) -> tuple[int, dict[str, Any]]:
        return self.store.committed_step, dict(self.store.manifest.meta)

    def initialize(self, seed: int, param_dtype: str, meta: Mapping[str, Any]) -> int:
        """Write a fresh model's records unit by unit, commit them as step 0.

        Working memory: one unit's fp32 weights plus one aligned staging buffer of the same size.
        """
        largest = max(u.numel for u in self.spec.units)
        staging = aligned_buffer(largest * 4)
        stage = torch.frombuffer(staging, dtype=torch.uint8)
        for unit in self.spec.units:
            master = self.spec.init_unit(unit.index, seed)
            for kind, dtype in (
                (RecordKind.PARAM, param_dtype),
                (RecordKind.MASTER, "float32"),
                (RecordKind.EXP_AVG, "float32"),
                (RecordKind.EXP_AVG_SQ, "float32"),
            ):
                view = stage[: unit.numel * DTYPES[dtype].itemsize].view(DTYPES[dtype])
                if kind in (RecordKind.PARAM, RecordKind.MASTER):
                    view.copy_(master)
                else:
                    view.zero_()
                self.store.write_from(
                    record_name(unit.index, kind),
                    memoryview(staging),
                    dtype=dtype,
                    numel=unit.numel,
                    version=0,
                )
            del master
        self.store.commit(0, meta)
        return self.store.stored_bytes()

    def read_tensor(self, name: str) -> torch.Tensor:
        """A copy of a record as a tensor (for inspection, export and tests; not on the hot path)."""
        rec = self.store.record(name)
        buf = aligned_buffer(rec.nbytes)
        self.store.read_into(name, memoryview(buf))
        return torch.frombuffer(buf, dtype=torch.uint8)[: rec.nbytes].view(DTYPES[rec.dtype]).clone()

    def stats(self) -> dict[str, int]:
        return {
            "bytes_read": self.store.bytes_read,
            "bytes_written": self.store.bytes_written,
            "bytes_stored": self.store.stored_bytes(),
        }

    def drain_timeline(self) -> list[Span]:
        return self.timeline.drain()

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def reset_memory_baseline(self) -> None:
        self.store.warm_up()
        self.memory.reset()

    def shutdown(self) -> None:
        self.ring.close()
        self.store.close()
