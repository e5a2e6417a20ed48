"""The SSD I/O actor: owns the run's on-SSD tensor store (and host cache) and moves records between them and
the ring."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fuyou_ray import durable
from fuyou_ray.cache import CachedStore, CacheSpec, LentRecord
from fuyou_ray.checkpoint import prune as prune_checkpoints
from fuyou_ray.checkpoint import take as take_checkpoint
from fuyou_ray.config import ModelConfig, SSDConfig, format_size
from fuyou_ray.errors import NonFiniteStepError, RunStateError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec
from fuyou_ray.records import OPTIMIZER_STATE, RecordKind, record_name
from fuyou_ray.ring import DTYPES, RingMapping, RingSpec, SlotHandle
from fuyou_ray.store import STAGING_BYTES, SSDTensorStore, StoreFullError, aligned_buffer
from fuyou_ray.timeline import Span, Timeline


class SSDIOActor:
    """Owns the `SSDTensorStore` of one run, its host cache (`CachedStore`, fuyou_ray/cache.py: the records
    the plan keeps in CPU memory) and a mapping of the ring.

    Lifecycle: created by the driver (name `fuyou:ssd-io`, threaded so reads and writes overlap); on
    (re)start it opens the store - waiting for a killed predecessor's lock to go - which drops whatever an
    unfinished attempt staged and keeps what it published, then attaches the run's host cache (which
    outlives actors; when it is gone - a new driver - a write-back store goes back to its last durable
    step). `read` fills a ring slot from a record; `write` stages a slot's payload as a new record version;
    `publish` makes one unit's update durable; `commit` publishes the step; `flush` writes the cache back
    to SSD. Every call is idempotent (a repeated write, publish or commit changes nothing), so a retried or
    replayed call is harmless. `shutdown` flushes a write-back cache and removes its files.
    """

    LOCK_TIMEOUT_S = 120.0  # a killed run's actors may take a while to die and release the store

    def __init__(
        self, ssd: SSDConfig, ring: RingSpec, model: ModelConfig, cache: CacheSpec | None = None
    ) -> None:
        self.log = setup_logging("ssd-io")
        # Built here, not on first use: building torch modules pulls in ~75 MB of lazy imports, which
        # belong to the process's baseline, not to the memory budget.
        self.spec = ModelSpec(model)
        self.memory = MemoryMeter("ssd-io")
        self.disk = SSDTensorStore(
            ssd.paths,
            direct_io=ssd.direct_io,
            io_threads=ssd.io_threads,
            verify_checksums=ssd.verify_checksums,
            lock_timeout_s=self.LOCK_TIMEOUT_S,
        )
        try:
            self.store = CachedStore(self.disk, cache or CacheSpec(), self.spec.num_units)
        except BaseException:
            self.disk.close()
            raise
        self.ring = RingMapping(ring)
        self._io_marks = (0, 0, 0)
        # step -> bytes (SSD read, SSD written, host cache copied both ways) up to its commit
        self.step_io: dict[int, tuple[int, int, int]] = {}
        self.timeline = Timeline()
        self._inflight = 0
        self._closing = False
        self._idle = threading.Condition()
        pending = self.disk.pending
        names = self.store.names
        self.log.info(
            "store at %s, committed step %d%s%s",
            ", ".join(ssd.paths),
            self.disk.committed_step,
            f", step {pending.step} partly published" if pending else "",
            (
                f"; {len(names)} records cached in host memory "
                f"({'write-through' if self.store.spec.write_through else 'write-back'})"
                if names
                else ""
            ),
        )

    # ------------------------------------------------------------------------------ the step's I/O

    def read(self, name: str, slot: SlotHandle, *after: object) -> SlotHandle:
        """Fill `slot` with the readable version of record `name` (from the host cache when it holds it);
        returns the slot, now carrying it."""
        with self._io():
            rec = self.disk.record(name)
            handle = slot.carrying(name, rec.dtype, rec.numel, rec.version)
            start = time.time()
            _, cached = self.store.read(name, self.ring.memoryview(handle))
            lane = "cache read" if cached else "ssd read"
            self.timeline.add(Span(lane, name, start, time.time(), rec.padded_nbytes))
        return handle

    def write(self, slot: SlotHandle, version: int, transient: bool, *after: object) -> int:
        """Stage the slot's payload as version `version` of its record. Returns bytes written."""
        # Write-through (and uncached records) cost SSD time; write-back only a copy into the cache.
        to_ssd = slot.tensor not in self.store.names or (self.store.spec.write_through and not transient)
        lane = "ssd write" if to_ssd else "cache write"
        with self._io(), self.timeline.span(lane, slot.tensor, slot.nbytes):
            rec = self.store.write_from(
                slot.tensor,
                self.ring.memoryview(slot),
                dtype=slot.dtype,
                numel=slot.numel,
                version=version,
                transient=transient,
            )
        return rec.padded_nbytes

    def read_range(self, name: str, slot: SlotHandle, lo: int, hi: int, *after: object) -> SlotHandle:
        """Fill `slot` with elements [lo, hi) of record `name` (a range of a unit too large for one slot,
        on SSD); returns the slot, now carrying them."""
        with self._io():
            rec = self.disk.record(name)
            item = DTYPES[rec.dtype].itemsize
            handle = slot.carrying(name, rec.dtype, hi - lo, rec.version, first=lo)
            with self.timeline.span("ssd read", f"{name}[{lo}:{hi}]", handle.nbytes):
                self.store.read_range(name, self.ring.memoryview(handle), lo * item, hi * item)
        return handle

    def write_range(self, slot: SlotHandle, version: int, transient: bool, numel: int, *after: object) -> int:
        """Write the slot's elements (a range of a record of `numel` elements, at `slot.first`) into version
        `version` of its record, which is staged once its last range is written. Returns bytes written."""
        item = DTYPES[slot.dtype].itemsize
        lo, hi = slot.first, slot.first + slot.numel
        with self._io(), self.timeline.span("ssd write", f"{slot.tensor}[{lo}:{hi}]", slot.nbytes):
            self.store.write_range(
                slot.tensor,
                self.ring.memoryview(slot),
                dtype=slot.dtype,
                numel=numel,
                version=version,
                lo=lo * item,
                hi=hi * item,
                transient=transient,
            )
        return slot.nbytes

    def lend(self, name: str, version: int, copy: bool, *after: object) -> LentRecord:
        """Lend cached record `name` to the optimizer, which updates a copy in a cache file into version
        `version` (CachedStore.lend), or with `copy=False` writes that version into the file from the
        version read (the host kernel's out-of-place AdamW); `adopt` then stages that version."""
        with self._io():
            start = time.time()
            lent = self.store.lend(name, version, copy=copy)
            if copy:
                nbytes = lent.numel * DTYPES[lent.dtype].itemsize
                self.timeline.add(Span("cache write", name, start, time.time(), nbytes))
        return lent

    def view(self, name: str, *after: object) -> LentRecord:
        """Cached record `name` (the step's gradient log) lent to be read in place (CachedStore.view)."""
        with self._io():
            return self.store.view(name)

    def adopt(self, lent: LentRecord, *after: object) -> int:
        """Stage the version the optimizer wrote into a lent record's file (no copy). Returns the bytes
        written to SSD: 0, unless the store is write-through (then timed as an SSD write)."""
        with self._io():
            start = time.time()
            rec = self.store.adopt(lent)
            if not self.store.spec.write_through:
                return 0
            self.timeline.add(Span("ssd write", lent.name, start, time.time(), rec.padded_nbytes))
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
        With a write-back cache, every `runtime.cache_flush_every` commits also flush it to SSD.
        """
        if self.disk.committed_step == step:
            return step
        bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
        if bad:
            self.store.discard_staged()
            raise NonFiniteStepError(
                f"step {step} produced non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                f"nothing was committed (the run stays at step {self.disk.committed_step}). "
                "Lower optimizer.lr or check the data."
            )
        with self._io(), self.timeline.span("ssd write", f"commit {step}"):
            self.store.commit(step, {**meta, **summary})
        self._count_step_io(step)
        return step

    def skip(self, step: int, meta: Mapping[str, Any]) -> int:
        """Commit step `step` without changing any record (a non-finite step skipped by policy)."""
        if self.disk.committed_step == step:
            return step
        self.store.discard_staged()
        if self.disk.pending is not None:
            raise RunStateError(f"step {step} cannot be skipped: some of its units are already updated")
        self.store.commit(step, dict(meta))
        self._count_step_io(step)
        return step

    def pending(self) -> tuple[int, list[int], dict[str, Any]] | None:
        """(step, units already updated, the step's inputs key) of a partly published step, else None."""
        pending = self.disk.pending
        if pending is None:
            return None
        units = sorted(
            {int(name[1:6]) for name in pending.records if name.endswith("." + RecordKind.MASTER.value)}
        )
        return pending.step, units, dict(pending.meta)

    def rollback(self) -> int:
        """Forget what the abandoned attempt staged (published units stay); returns the committed step."""
        self.store.discard_staged()
        return self.disk.committed_step

    def discard_staged(self) -> None:
        self.store.discard_staged()

    def flush(self) -> int:
        """Write the host cache back to SSD (write-back; between steps); returns the step durable on SSD."""
        with self._io(), self.timeline.span("ssd write", "flush"):
            return self.store.flush()

    def reserve(self, nbytes: int) -> int:
        """Refuse (StoreFullError) to start a step that needs `nbytes` more than the SSDs have free."""
        free = self.disk.free_bytes()
        if free < nbytes:
            raise StoreFullError(
                f"{', '.join(str(d.parent) for d in self.disk.dirs)}: {format_size(free)} free, but the "
                f"next step needs {format_size(nbytes)} of scratch space; free space or add a directory "
                f"to ssd.paths, then re-run to resume from step {self.disk.committed_step}"
            )
        return free

    def checkpoint(self, meta: Mapping[str, Any], keep: int) -> str:
        """Checkpoint the committed step (hard links: no copy), then keep the newest `keep`. A write-back
        cache is flushed first: a checkpoint holds only records on SSD."""
        with self._io():
            self.store.flush()
            info = take_checkpoint(self.disk, meta)
            prune_checkpoints([d.parent for d in self.disk.dirs], keep)
        self.log.info("checkpoint %s (%s of records)", info.name, format_size(info.nbytes))
        return info.name

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------------------ set-up and queries

    def committed(self) -> tuple[int, dict[str, Any]]:
        return self.disk.committed_step, dict(self.disk.manifest.meta)

    def initialize(self, seed: int, param_dtype: str, meta: Mapping[str, Any]) -> int:
        """Write a fresh model's records unit by unit to SSD, commit them as step 0 (durable).

        Working memory: one unit's fp32 weights plus an aligned staging buffer of the same size, or of
        STAGING_BYTES for a larger unit, whose records are then written range by range (`write_range`).
        """
        largest = max(u.numel for u in self.spec.units)
        staging = aligned_buffer(min(largest * 4, STAGING_BYTES))
        stage = torch.frombuffer(staging, dtype=torch.uint8)
        for unit in self.spec.units:
            master = self.spec.init_unit(unit.index, seed)
            for kind, dtype in (
                (RecordKind.PARAM, param_dtype),
                (RecordKind.MASTER, "float32"),
                (RecordKind.EXP_AVG, "float32"),
                (RecordKind.EXP_AVG_SQ, "float32"),
            ):
                itemsize = DTYPES[dtype].itemsize
                per = (
                    len(staging) // itemsize
                )  # elements per range; ranges start on multiples of STAGING_BYTES
                for lo in range(0, unit.numel, per):
                    hi = min(lo + per, unit.numel)
                    view = stage[: (hi - lo) * itemsize].view(DTYPES[dtype])
                    if kind in (RecordKind.PARAM, RecordKind.MASTER):
                        view.copy_(master[lo:hi])
                    else:
                        view.zero_()
                    self.disk.write_range(
                        record_name(unit.index, kind),
                        memoryview(staging),
                        dtype=dtype,
                        numel=unit.numel,
                        version=0,
                        lo=lo * itemsize,
                        hi=hi * itemsize,
                    )
            del master
        self.disk.commit(0, {**meta, "durable_step": 0})
        self._io_marks = self._io_now()
        return self.disk.stored_bytes()

    def read_tensor(self, name: str) -> torch.Tensor:
        """A copy of a record as a tensor (for inspection, export and tests; not on the hot path)."""
        rec = self.disk.record(name)
        buf = aligned_buffer(rec.nbytes)
        self.store.read_into(name, memoryview(buf))
        return torch.frombuffer(buf, dtype=torch.uint8)[: rec.nbytes].view(DTYPES[rec.dtype]).clone()

    def stats(self) -> dict[str, int]:
        """SSD bytes read and written since this actor started (`bytes_*`), SSD bytes per step (the median
        over the steps it committed: a step after a start reads a cold cache, and flushes come on top),
        bytes on SSD, and the host cache's figures (fuyou_ray/cache.py)."""
        per_step = list(self.step_io.values())
        cache_copies = [c for _, _, c in per_step]
        return {
            "bytes_read": self.disk.bytes_read,
            "bytes_written": self.disk.bytes_written,
            "bytes_stored": self.disk.stored_bytes(),
            "bytes_on_ssd": durable.bytes_on_ssd(self.disk.dirs),
            "ssd_read_per_step": int(statistics.median_low(r for r, _, _ in per_step)) if per_step else 0,
            "ssd_written_per_step": int(statistics.median_low(w for _, w, _ in per_step)) if per_step else 0,
            "cache_copied_per_step": int(statistics.median_low(cache_copies)) if per_step else 0,
            **self.store.stats(),
        }

    def io_per_step(self) -> dict[int, tuple[int, int, int]]:
        """Bytes (SSD read, SSD written, host cache copies) between the previous commit and each step's."""
        return dict(self.step_io)

    def _io_now(self) -> tuple[int, int, int]:
        cache = self.store.cache
        copied = cache.bytes_read + cache.bytes_written + cache.bytes_lent if cache is not None else 0
        return self.disk.bytes_read, self.disk.bytes_written, copied

    def _count_step_io(self, step: int) -> None:
        now = self._io_now()
        read, written, copied = (a - b for a, b in zip(now, self._io_marks, strict=True))
        self.step_io[step] = (read, written, copied)
        self._io_marks = now
        if len(self.step_io) > 10_000:
            del self.step_io[min(self.step_io)]

    def drain_timeline(self) -> list[Span]:
        return self.timeline.drain()

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def reset_memory_baseline(self) -> None:
        self.disk.warm_up()
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
        be deleted at the next start anyway: no temporary file outlives the run), flush a write-back cache
        (what was committed and published becomes durable on SSD) and remove its files, release the
        store."""
        with self._idle:
            self._closing = True
            self._idle.wait_for(lambda: self._inflight == 0, timeout=30)
        with contextlib.suppress(Exception):
            self.store.discard_staged()
        if self.store.spec.write_back:
            try:
                self.store.flush()
            except Exception:
                self.log.exception(
                    "could not flush the host cache to SSD; a re-run resumes from step %d",
                    self.store.durable_step,
                )
        self.store.remove_files()
        self.ring.close()
        self.store.close()
        self.disk.close()
