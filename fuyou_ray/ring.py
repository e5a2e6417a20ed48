"""The ring: fixed-size buffer slots in shared memory, mapped by every actor, pinned by the GPU actor.

Only small `SlotHandle`s travel between actors (segment, offset, dtype, shape, tensor name, version); the
bytes stay in a few large files under /dev/shm that each process maps once. Who may write a slot next is
decided by the driver, which passes the previous consumer's future as a dependency of the next producer,
so a slot is never overwritten before its consumer is done and nobody blocks waiting for it.

Lifecycle: the driver creates a `Ring` (files created, sized) and closes it at exit (files removed, also
from an atexit hook). Every actor opens a `RingMapping` from the `RingSpec` (maps lazily; the GPU actor
pins with cudaHostRegister) and closes it (unpins, then unmaps) before exiting. Segments whose creating
process is dead are removed by `remove_stale_segments()` at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fuyou_ray.store import ALIGN, align_up

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "fuyou-ring"
MAX_SEGMENT_BYTES = 1 << 30

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
    "int64": torch.int64,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


class RingError(RuntimeError):
    """The ring cannot be created or mapped (e.g. /dev/shm too small), or a handle does not fit."""


@dataclass(frozen=True)
class SlotHandle:
    """A slot of the ring and, once filled, what it carries. Small and picklable: this is what Ray moves."""

    segment: str
    offset: int
    capacity: int
    slot: int
    tensor: str = ""
    dtype: str = "uint8"
    numel: int = 0
    version: int = -1
    first: int = 0  # the element of the record the slot starts with (a range of a larger record)

    def carrying(self, tensor: str, dtype: str, numel: int, version: int, first: int = 0) -> SlotHandle:
        nbytes = numel * DTYPES[dtype].itemsize
        if align_up(nbytes) > self.capacity:
            raise RingError(f"{tensor}: {nbytes} B does not fit a {self.capacity} B ring slot")
        return replace(self, tensor=tensor, dtype=dtype, numel=numel, version=version, first=first)

    def elements(self, lo: int, hi: int) -> slice:
        """Where record elements [lo, hi) sit in this slot (which must hold them)."""
        if not self.first <= lo <= hi <= self.first + self.numel:
            raise RingError(
                f"{self.tensor}: elements [{lo}, {hi}) are not in this slot, which holds "
                f"[{self.first}, {self.first + self.numel})"
            )
        return slice(lo - self.first, hi - self.first)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class RingSpec:
    """The ring's geometry: `num_slots` slots of `slot_bytes` each, packed into segment files."""

    name: str
    slot_bytes: int
    num_slots: int
    slots_per_segment: int

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.num_slots

    @property
    def segments(self) -> list[tuple[str, int]]:
        out, left, k = [], self.num_slots, 0
        while left > 0:
            n = min(left, self.slots_per_segment)
            out.append((f"{self.name}-{k}", n * self.slot_bytes))
            left -= n
            k += 1
        return out

    def slot(self, index: int) -> SlotHandle:
        if not 0 <= index < self.num_slots:
            raise RingError(f"slot {index} outside the ring's {self.num_slots} slots")
        seg, pos = divmod(index, self.slots_per_segment)
        return SlotHandle(f"{self.name}-{seg}", pos * self.slot_bytes, self.slot_bytes, index)


def make_spec(slot_bytes: int, num_slots: int) -> RingSpec:
    slot_bytes = align_up(max(slot_bytes, ALIGN), ALIGN)
    per = max(1, MAX_SEGMENT_BYTES // slot_bytes)
    name = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return RingSpec(name, slot_bytes, num_slots, per)


class Ring:
    """Owner of the ring's shared-memory files (the driver). Creates them, removes them on close/exit."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self._paths: list[Path] = []
        free = _shm_free_bytes()
        if free is not None and free < spec.total_bytes:
            raise RingError(
                f"/dev/shm has {free / 2**20:.0f} MiB free but the ring needs "
                f"{spec.total_bytes / 2**20:.0f} MiB: enlarge /dev/shm (docker --shm-size) or lower "
                "budgets.cpu_mem"
            )
        try:
            for seg, nbytes in spec.segments:
                path = SHM_DIR / seg
                with open(path, "wb") as f:
                    f.truncate(nbytes)
                self._paths.append(path)
        except OSError as exc:
            self.close()
            raise RingError(f"cannot create ring segments in {SHM_DIR}: {exc}") from exc
        atexit.register(self.close)

    def close(self) -> None:
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._paths = []
        atexit.unregister(self.close)  # the hook would otherwise keep every closed Ring alive

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingMapping:
    """One process's view of the ring: maps segments on first use, hands out tensors over slots.

    `pin()` registers every segment with CUDA (page-locked, so H2D/D2H copies run at full PCIe rate);
    `close()` unregisters before unmapping, as CUDA requires.
    """

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self._maps: dict[str, mmap.mmap] = {}
        self._bytes: dict[str, torch.Tensor] = {}
        self._pinned: list[int] = []

    def _segment(self, name: str) -> torch.Tensor:
        if name not in self._bytes:
            path = SHM_DIR / name
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError as exc:
                raise RingError(f"ring segment {path} is gone (driver exited?)") from exc
            try:
                mm = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self._maps[name] = mm
            self._bytes[name] = torch.frombuffer(mm, dtype=torch.uint8)
        return self._bytes[name]

    def raw(self, handle: SlotHandle) -> torch.Tensor:
        """The whole slot as uint8 (capacity bytes)."""
        return self._segment(handle.segment)[handle.offset : handle.offset + handle.capacity]

    def memoryview(self, handle: SlotHandle) -> memoryview:
        self._segment(handle.segment)
        mm = self._maps[handle.segment]
        return memoryview(mm)[handle.offset : handle.offset + handle.capacity]

    def tensor(self, handle: SlotHandle) -> torch.Tensor:
        """The slot's payload as a 1-D tensor of `handle.dtype` and `handle.numel` elements (a view)."""
        raw = self.raw(handle)
        return raw[: handle.nbytes].view(DTYPES[handle.dtype])

    def pin(self) -> None:
        """Page-lock every segment for CUDA (cudaHostRegister works on /dev/shm mappings)."""
        if not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()
        for seg, _ in self.spec.segments:
            t = self._segment(seg)
            err = cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0)
            if int(err) != 0:
                raise RingError(f"cudaHostRegister of {seg} failed with CUDA error {int(err)}")
            self._pinned.append(t.data_ptr())

    def close(self) -> None:
        if self._pinned:
            cudart = torch.cuda.cudart()
            for ptr in self._pinned:
                cudart.cudaHostUnregister(ptr)
            self._pinned = []
        self._bytes.clear()
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def remove_stale_segments() -> list[str]:
    """Remove ring segments left by dead processes (a crashed or killed driver). Returns their names."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(f"{PREFIX}-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.name)
    if removed:
        log.warning("removed %d ring segment(s) left in /dev/shm by a dead run", len(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
