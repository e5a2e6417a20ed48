"""The SSD I/O actor: owns the run's on-SSD tensor store and moves records between it and the ring."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fuyou_ray.checkpoint import prune as prune_checkpoints
from fuyou_ray.checkpoint import take as take_checkpoint
from fuyou_ray.config import ModelConfig, SSDConfig, format_size
from fuyou_ray.errors import NonFiniteStepError, RunStateError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec
from fuyou_ray.records import OPTIMIZER_STATE, RecordKind, record_name
from fuyou_ray.ring import DTYPES, RingMapping, RingSpec, SlotHandle
from fuyou_ray.store import SSDTensorStore, StoreFullError, aligned_buffer
from fuyou_ray.timeline import Span, Timeline


class SSDIOActor:
    """Owns the `SSDTensorStore` of one run and a mapping of the ring.

    Lifecycle: created by the driver (name `fuyou:ssd-io`, threaded so reads and writes overlap); on
    (re)start it opens the store - waiting for a killed predecessor's lock to go - which drops whatever an
    unfinished attempt staged and keeps what it published. `read` fills a ring slot from a record; `write`
    stages a slot's payload as a new record version; `publish` makes one unit's update durable; `commit`
    publishes the step. Every call is idempotent (a repeated write, publish or commit changes nothing), so a
    retried or replayed call is harmless.
    """

    LOCK_TIMEOUT_S = 120.0  # a killed run's actors may take a while to die and release the store

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
            lock_timeout_s=self.LOCK_TIMEOUT_S,
        )
        self.ring = RingMapping(ring)
        self.timeline = Timeline()
        self._inflight = 0
        self._closing = False
        self._idle = threading.Condition()
        pending = self.store.pending
        self.log.info(
            "store at %s, committed step %d%s",
            ", ".join(ssd.paths),
            self.store.committed_step,
            f", step {pending.step} partly published" if pending else "",
        )

    # ------------------------------------------------------------------------------ the step's I/O

    def read(self, name: str, slot: SlotHandle, *after: object) -> SlotHandle:
        """Fill `slot` with the readable version of record `name`; returns the slot, now carrying it."""
        with self._io():
            rec = self.store.record(name)
            handle = slot.carrying(name, rec.dtype, rec.numel, rec.version)
            with self.timeline.span("ssd read", name, rec.padded_nbytes):
                self.store.read_into(name, self.ring.memoryview(handle))
        return handle

    def write(self, slot: SlotHandle, version: int, transient: bool, *after: object) -> int:
        """Stage the slot's payload as version `version` of its record. Returns bytes written."""
        with self._io(), self.timeline.span("ssd write", slot.tensor, slot.nbytes):
            rec = self.store.write_from(
                slot.tensor,
                self.ring.memoryview(slot),
                dtype=slot.dtype,
                numel=slot.numel,
                version=version,
                transient=transient,
            )
        return rec.padded_nbytes

    def publish(self, unit: int, version: int, step_key: str, *after: object) -> int:
        """Make unit `unit`'s new params and optimizer state durable as part of step `version`.

        The superseded optimizer state is freed at once; the superseded params stay readable until the
        commit, because a replay of this step (after a crash) runs forward and backward on them again.
        """
        names = [record_name(unit, kind) for kind in (RecordKind.PARAM, *OPTIMIZER_STATE)]
        with self._io():
            self.store.publish(
                version, names, {"step_key": step_key}, keep_previous=[record_name(unit, RecordKind.PARAM)]
            )
        return unit

    def commit(self, step: int, meta: Mapping[str, Any], summary: Mapping[str, float], *after: object) -> int:
        """Publish everything staged as committed step `step` (atomic), unless its loss is not finite.

        A step with a NaN/inf loss or gradient norm is discarded: its staged writes are deleted and the
        last committed state stays as it was. Committing a step that is already committed does nothing.
        """
        if self.store.committed_step == step:
            return step
        bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
        if bad:
            self.store.discard_staged()
            raise NonFiniteStepError(
                f"step {step} produced non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                f"nothing was committed (the run stays at step {self.store.committed_step}). "
                "Lower optimizer.lr or check the data."
            )
        with self._io(), self.timeline.span("ssd write", f"commit {step}"):
            self.store.commit(step, {**meta, **summary})
        return step

    def skip(self, step: int, meta: Mapping[str, Any]) -> int:
        """Commit step `step` without changing any record (a non-finite step skipped by policy)."""
        if self.store.committed_step == step:
            return step
        self.store.discard_staged()
        if self.store.pending is not None:
            raise RunStateError(f"step {step} cannot be skipped: some of its units are already updated")
        self.store.commit(step, dict(meta))
        return step

    def pending(self) -> tuple[int, list[int], dict[str, Any]] | None:
        """(step, units already updated, the step's inputs key) of a partly published step, else None."""
        pending = self.store.pending
        if pending is None:
            return None
        units = sorted(
            {int(name[1:6]) for name in pending.records if name.endswith("." + RecordKind.MASTER.value)}
        )
        return pending.step, units, dict(pending.meta)

    def rollback(self) -> int:
        """Forget what the abandoned attempt staged (published units stay); returns the committed step."""
        self.store.discard_staged()
        return self.store.committed_step

    def discard_staged(self) -> None:
        self.store.discard_staged()

    def reserve(self, nbytes: int) -> int:
        """Refuse (StoreFullError) to start a step that needs `nbytes` more than the SSDs have free."""
        free = self.store.free_bytes()
        if free < nbytes:
            raise StoreFullError(
                f"{', '.join(str(d.parent) for d in self.store.dirs)}: {format_size(free)} free, but the "
                f"next step needs {format_size(nbytes)} of scratch space; free space or add a directory "
                f"to ssd.paths, then re-run to resume from step {self.store.committed_step}"
            )
        return free

    def checkpoint(self, meta: Mapping[str, Any], keep: int) -> str:
        """Checkpoint the committed step (hard links: no copy), then keep the newest `keep`."""
        with self._io():
            info = take_checkpoint(self.store, meta)
            prune_checkpoints([d.parent for d in self.store.dirs], keep)
        self.log.info("checkpoint %s (%s of records)", info.name, format_size(info.nbytes))
        return info.name

    def pid(self) -> int:
        return os.getpid()

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

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """Count a call that touches the store, so that shutdown can wait for the ones in flight."""
        with self._idle:
            if self._closing:
                raise RunStateError("the SSD actor is shutting down")
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def shutdown(self) -> None:
        """Refuse new I/O, let the calls in flight finish, delete what an unfinished step staged (it would
        be deleted at the next start anyway: no temporary file outlives the run), release the store."""
        with self._idle:
            self._closing = True
            self._idle.wait_for(lambda: self._inflight == 0, timeout=30)
        with contextlib.suppress(Exception):
            self.store.discard_staged()
        self.ring.close()
        self.store.close()
