"""The host-memory cache: records the plan keeps in CPU memory instead of reading and writing them on SSD.

The plan (fuyou_ray/plan.py) names the units whose optimizer state (fp32 master weights, Adam moments) and
params live in host memory, and whether the step's gradient log does; `CacheSpec` carries that to the SSD
actor, whose `CachedStore` puts those records in a `HostCache`: one file per record version in /dev/shm,
`<ring name>-cache-<record>.v<version>`. The files belong to the run, not to an actor: a restarted SSD
actor finds them again (the cache survives kill -9 of any actor), and since they are named like the ring's
segments (after the driver's pid) the next start removes those of a dead driver, like the ring's. The
driver's `CacheArea` checks /dev/shm has room for them and removes them when the run ends.

`CachedStore` is the `TensorStore` the SSD actor uses. Records stay records: the SSD store's manifest and
journal (on SSD) keep saying which version of each record a step reads, publishes and commits, so a step
interrupted by an actor crash is replayed exactly as without the cache. Only where the bytes are changes:
- the optimizer state (fp32 master weights, Adam moments) of a cached unit is lent, not copied through
  the ring: `lend` copies the version the step reads into a file for the new version (within the cache,
  while the GPU computes), the optimizer actors update that file in place through their own mappings
  (`LentViews`), and `adopt` stages it like a write. One copy per record instead of two, and none after
  the optimizer;
- a read of another cached record copies its version from the cache file into the ring slot (no SSD read);
- a write puts the new version in a new cache file (written aside, then renamed: never torn, and the
  committed version is never overwritten in place) and
  - write-through (`runtime.cache_write_through`): also writes it to SSD as without the cache, so every
    commit stays durable on SSD; the cache saves the reads;
  - write-back: stages it in the store as an `in_memory` record (no SSD bytes). The store's manifest
    then names versions that exist only in /dev/shm, so `flush` (every `runtime.cache_flush_every`
    commits, before each checkpoint, at the end of the run and when it is stopped) writes them to SSD,
    makes the manifest name those files, and snapshots the store (fuyou_ray/durable.py). A driver killed
    between flushes (or a machine crash) loses the cache: the next start restores the last snapshot and
    the run resumes from its step, bit-identically (the batch of a step depends only on the seeds and
    the step). The manifest's meta says which step is durable on SSD (`durable_step`).
A cache file lives as long as the store still needs its version (`SSDTensorStore.live_versions`), so the
cache holds what the SSD would: the state, plus the old params until the commit (a replay reads them),
plus the new versions of the units in flight.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuyou_ray import durable
from fuyou_ray.records import OPTIMIZER_STATE, RecordKind, record_name
from fuyou_ray.ring import DTYPES, SHM_DIR, RingSpec, _shm_free_bytes
from fuyou_ray.store import (
    CHUNK_BYTES,
    Manifest,
    PendingStep,
    SSDTensorStore,
    StoreError,
    TensorRecord,
    _itemsize,
    align_up,
)

log = logging.getLogger(__name__)

TMP = ".tmp"
FREE = ".free"  # a retired version whose pages the next write of its record reuses
LENT = ".lent"  # a version being written by another process (HostCache.lend)


class CacheError(StoreError):
    """The host cache cannot hold a record (/dev/shm full), or lost one the store still needs."""


def cache_prefix(ring: RingSpec) -> str:
    """The cache files' name prefix: the ring's name (`fuyou-ring-<driver pid>-<id>`) + `-cache`."""
    return f"{ring.name}-cache"


@dataclass(frozen=True)
class CacheSpec:
    """What the plan keeps in host memory, as the SSD actor receives it (small, picklable)."""

    prefix: str = ""  # file names in /dev/shm start with it ("" = no cache)
    state_units: tuple[int, ...] = ()  # units whose fp32 master weights and Adam moments are cached
    param_units: tuple[int, ...] = ()  # units whose compute-dtype params are cached
    grad_log: bool = False  # the step's gradient log (exact clipping) lives in host memory, not on SSD
    write_through: bool = False
    flush_every: int = 0  # write-back: flush every N commits (0: only at checkpoints, the end and stops)
    threads: int = 8  # the copies' threads (`copy_threads`)

    def record_names(self, num_units: int) -> frozenset[str]:
        """Every record the cache holds, for a model of `num_units` units."""
        names = {record_name(u, kind) for u in self.state_units for kind in OPTIMIZER_STATE}
        names |= {record_name(u, RecordKind.PARAM) for u in self.param_units}
        if self.grad_log:
            names |= {record_name(u, RecordKind.GRAD) for u in range(num_units)}
        return frozenset(names)

    @property
    def write_back(self) -> bool:
        """Durable records may live in host memory only (until a flush)."""
        return bool(self.state_units or self.param_units) and not self.write_through


@dataclass(frozen=True)
class LentRecord:
    """A cached record lent to the optimizer for one update (small, picklable: what Ray moves).

    `target` is the file `HostCache.lend` made for the new version `version`, a copy of the version the
    step reads; the optimizer updates it in place through its own mapping (`LentViews`), and the SSD
    actor's `adopt` makes it that version. Instead of a copy into a ring slot and one back into a new
    cache file, one copy within the cache, made while the GPU still computes: the optimizer phase then
    ends with the update, not with the writes. `CachedStore.view` lends a record to read only (the
    step's gradient log): `target` is then the cached file of the version the step reads, `version` its
    version, and nothing is adopted. A lend without the copy (`copy=False`, for the optimizer's
    out-of-place host kernel) leaves `target` unfilled and names the version read in `source`: the
    optimizer reads the old state there and writes the new one into `target`, 24 bytes per parameter
    less copied per step."""

    name: str
    dtype: str
    numel: int
    version: int
    target: str
    prefix: str  # the cache's file-name prefix (LentViews drops mappings of files gone from it)
    source: str = ""  # the cached file of the version read, when `target` is not a copy of it


class LentViews:
    """An optimizer actor's mappings of lent cache files, as tensors of an element range.

    Mappings are kept across calls, keyed by inode and byte range, for the reason HostCache keeps its own:
    the cache recycles a record's two inodes (version -> `.free` -> lent -> version), so after a step or
    two every update finds its range mapped and populated. `forget_missing` drops the mappings of files
    deleted since (they would pin their pages); `close` drops all. Lifecycle: one per optimizer actor.
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int, int, int, bool], mmap.mmap] = {}

    def view(self, lent: LentRecord, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the lent file (the new version, to update in place)."""
        return self._view(lent.target, lent.dtype, lo, hi)

    def view_source(self, lent: LentRecord, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the version read, mapped read-only (a lend without a copy)."""
        if not lent.source:
            raise CacheError(f"{lent.name}: lent as a copy, it has no source to read")
        return self._view(lent.source, lent.dtype, lo, hi, writable=False)

    def _view(self, path: str, dtype: str, lo: int, hi: int, writable: bool = True) -> torch.Tensor:
        itemsize = DTYPES[dtype].itemsize
        start, end = lo * itemsize, hi * itemsize
        offset = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError as exc:
            raise CacheError(f"lent cache file {path} is gone (the SSD actor restarted?)") from exc
        try:
            st = os.fstat(fd)
            if st.st_size < end:
                raise CacheError(f"lent cache file {path} holds {st.st_size} B, not the {end} B lent")
            # (writable is part of the key: a recycled inode read as a source may later be lent to write)
            key = (st.st_dev, st.st_ino, offset, end - offset, writable)
            mm = self._maps.get(key)
            if mm is None:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
                mm = mmap.mmap(fd, end - offset, flags=flags, prot=prot, offset=offset)
                self._maps[key] = mm
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # a read-only source: torch warns that writing it is undefined
            warnings.simplefilter("ignore", UserWarning)
            whole = torch.frombuffer(mm, dtype=torch.uint8)
        return whole[start - offset : end - offset].view(DTYPES[dtype])

    def forget_missing(self, prefix: str) -> None:
        """Drop the mappings of files no longer among the cache's files (`prefix`)."""
        live = _live_inodes(prefix)
        for key in [k for k in self._maps if k[:2] not in live]:
            self._close(key)

    def close(self) -> None:
        for key in list(self._maps):
            self._close(key)

    @property
    def mapped(self) -> int:
        return len(self._maps)

    def _close(self, key: tuple[int, int, int, int, bool]) -> None:
        mm = self._maps.pop(key)
        with contextlib.suppress(BufferError):  # a tensor still refers to it: it goes with the tensor
            mm.close()


def copy_threads(configured: int = 0) -> int:
    """Threads for the cache's copies: `configured`, or (0) one per core up to 16. The copies are
    memory-bound: on the 16-core H100 box 16 threads moved 14.0 GB/s into the cache and 37.4 GB/s out of it
    (4 calls at once, 1 GiB records), 8 threads 10.4 and 25.1 GB/s."""
    return configured if configured > 0 else max(1, min(16, os.cpu_count() or 1))


def cache_spec(plan: Any, ring: RingSpec, flush_every: int, threads: int = 0) -> CacheSpec:
    """The cache of `plan` (a fuyou_ray.plan.Plan) for the run whose ring is `ring`; `threads` as
    `runtime.cache_threads`."""
    return CacheSpec(
        prefix=cache_prefix(ring),
        state_units=tuple(plan.cpu_cached_state),
        param_units=tuple(plan.cpu_cached_params),
        grad_log=plan.grad_log_tier == "cpu",
        write_through=bool(plan.cache_write_through),
        flush_every=flush_every,
        threads=copy_threads(threads),
    )


class HostCache:
    """The cache's files in /dev/shm: one per record version, written whole by `write` (aside, then
    renamed into place), read by `read`, retired by `keep_only`. Copies run in `threads` threads
    (`os.preadv` and numpy's copies release the GIL). Owns its thread pool; the files belong to the run.

    Page recycling: writing into fresh tmpfs pages costs the kernel a page allocation and zeroing per
    4 KiB, which made writes ~8x slower than reads (1.1 vs 8.5 GB/s measured). So `keep_only` does not
    delete a record's retired version but renames it to `<record>.free` (one per record), and the next
    `write` of that record overwrites those pages in place. A retired version is never a version the
    store still needs, so committed bytes are still never overwritten; a `.free` file is not a version
    (`versions` skips it) and goes with the run's other files.

    Kept mappings: a write copies through a shared mapping of the file, and mapping 1 GiB afresh costs the
    kernel 262144 page-table entries (MAP_POPULATE), which held writes to 10-14 GB/s while reads into the
    already-mapped ring ran at 31-37 GB/s. A recycled file keeps its inode through its renames (version ->
    `.free` -> the next version), so the cache keeps each file's mapping, keyed by inode, for the next
    write into the same pages. A kept mapping pins its inode (so the key cannot be reused by another file);
    `keep_only` drops the mappings of files that are gone, `remove_all` and `close` drop all. The mapped
    pages are the cache's own (counted in budgets.cpu_mem), shared with /dev/shm: they show in this
    process's RSS, not as extra memory.
    """

    def __init__(self, prefix: str, threads: int = 4) -> None:
        if not prefix:
            raise ValueError("a host cache needs a name prefix")
        self.prefix = prefix
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fuyou-cache")
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int], _KeptMapping] = {}  # (st_dev, st_ino) -> the file's mapping
        self.bytes_read = 0
        self.bytes_written = 0
        self.bytes_lent = 0  # versions copied for another process to update (`lend`)

    def path(self, name: str, version: int) -> Path:
        return SHM_DIR / f"{self.prefix}-{name}.v{version:08d}"

    def free_path(self, name: str) -> Path:
        """Where `keep_only` parks a retired version of `name` for the next `write` to reuse."""
        return SHM_DIR / f"{self.prefix}-{name}{FREE}"

    def _take_free(self, name: str, tmp: Path) -> bool:
        """Move the parked pages of `name` to `tmp` (atomic: two writers never get the same file)."""
        try:
            os.rename(self.free_path(name), tmp)
        except FileNotFoundError:
            return False
        return True

    def has(self, name: str, version: int) -> bool:
        return self.path(name, version).is_file()

    def write(self, name: str, version: int, src: memoryview) -> None:
        """Store `src` (the record's padded bytes) as version `version` of `name`.

        The copy goes through a shared mapping, in `threads` threads: tmpfs serialises `pwrite`s to one
        file on its inode lock, which held the copies into the cache to ~3 GB/s on 16 cores while reads
        (no such lock) ran at 12.8 GB/s. The file's pages are reserved first (`posix_fallocate`), so a full
        /dev/shm is an ENOSPC here and not a SIGBUS in a store to the mapping."""
        final = self.path(name, version)
        tmp = final.with_name(f"{final.name}.{os.getpid()}-{threading.get_ident()}{TMP}")
        nbytes = src.nbytes

        def copy(kept: _KeptMapping) -> None:
            source = np.frombuffer(src, np.uint8, nbytes)
            self._run(functools.partial(_copy_chunk, kept.array, source), nbytes, name)

        self._produce(name, tmp, nbytes, copy)
        os.replace(tmp, final)
        with self._lock:
            self.bytes_written += nbytes

    def fill(self, name: str, version: int, nbytes: int, reader: Callable[[memoryview], object]) -> None:
        """Store version `version` of `name` (`nbytes`) by letting `reader` fill the new file's mapping
        (e.g. an SSD read straight into the cache: no bounce through a ring slot)."""
        final = self.path(name, version)
        tmp = final.with_name(f"{final.name}.{os.getpid()}-{threading.get_ident()}{TMP}")
        self._produce(name, tmp, nbytes, lambda kept: reader(memoryview(kept.mm)))
        os.replace(tmp, final)

    def lend(self, name: str, version: int, new_version: int, copy: bool = True) -> str:
        """A copy of version `version` of `name`, in a file for `new_version` that another process (the
        optimizer) may update in place; `adopt` then makes it that version. The copy runs here, in this
        cache's threads and through its kept mappings, while the GPU still computes, so the optimizer
        later only updates (its in-place AdamW, as on a ring slot). The file is made from the record's
        parked pages. Lending the same new version again (a replayed step) copies afresh into the same
        file: whatever a failed attempt wrote there is overwritten. `copy=False` only makes the file (its
        pages reserved): the optimizer then writes every element of it from the version read."""
        source = self.path(name, version)
        lent = self.lent_path(name, new_version)
        tmp = lent.with_name(f"{lent.name}.{os.getpid()}-{threading.get_ident()}{TMP}")
        if not copy:
            try:
                nbytes = source.stat().st_size
            except FileNotFoundError as exc:
                raise CacheError(f"{name} v{version} is not in the host cache ({source})") from exc
            self._produce(name, tmp, nbytes, lambda kept: None, start_from=lent)
            os.replace(tmp, lent)
            return str(lent)
        try:
            fd = os.open(source, os.O_RDWR)
        except FileNotFoundError as exc:
            raise CacheError(f"{name} v{version} is not in the host cache ({source})") from exc
        try:
            st = os.fstat(fd)
            key, nbytes = (st.st_dev, st.st_ino), st.st_size
            src = self._pinned(key, nbytes)
            if src is None:
                self._forget(key)  # (another size: that mapping no longer fits the file)
                src = self._keep(key, _KeptMapping(fd, nbytes))
        finally:
            os.close(fd)

        def duplicate(kept: _KeptMapping) -> None:
            self._run(functools.partial(_copy_chunk, kept.array, src.array), nbytes, name)

        try:
            self._produce(name, tmp, nbytes, duplicate, start_from=lent)
        finally:
            self._unpin(src)
        os.replace(tmp, lent)
        with self._lock:
            self.bytes_lent += nbytes
        return str(lent)

    def lent_path(self, name: str, version: int) -> Path:
        """The file `lend` makes for `version` of `name` (partial until `adopt`, and named like one)."""
        return SHM_DIR / f"{self.prefix}-{name}.v{version:08d}{LENT}{TMP}"

    def adopt(self, name: str, version: int) -> bool:
        """Make the lent file of `version` that version of `name`; False when there is no lent file."""
        try:
            os.replace(self.lent_path(name, version), self.path(name, version))
        except FileNotFoundError:
            return False
        return True

    def _produce(
        self,
        name: str,
        tmp: Path,
        nbytes: int,
        fill: Callable[[_KeptMapping], object],
        start_from: Path | None = None,
    ) -> None:
        """Make `tmp` a file of `nbytes` - the file `start_from` when it exists, else the record's parked
        pages when it has some - and `fill` it through its kept mapping; on error the file goes."""
        recycled = False
        if start_from is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(start_from, tmp)
                recycled = True
        recycled = recycled or self._take_free(name, tmp)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | (0 if recycled else os.O_TRUNC), 0o600)
        key = (-1, -1)
        kept: _KeptMapping | None = None
        try:
            st = os.fstat(fd)
            key, had = (st.st_dev, st.st_ino), st.st_size
            kept = self._pinned(key, nbytes) if recycled else None
            if kept is None:
                self._forget(key)  # (another size: that mapping no longer fits the file)
                if had != nbytes:
                    os.ftruncate(fd, nbytes)
                if nbytes and (not recycled or nbytes > had):
                    try:
                        os.posix_fallocate(fd, 0, nbytes)
                    except OSError as exc:
                        raise _cache_io_error(exc, name) from exc
            if nbytes:
                if kept is None:
                    kept = self._keep(key, _KeptMapping(fd, nbytes))
                fill(kept)
        except BaseException:
            self._forget(key)
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
            if kept is not None:
                self._unpin(kept)

    def read(self, name: str, version: int, dest: memoryview) -> bool:
        """Copy version `version` of `name` into `dest`; False when the cache does not hold it."""
        try:
            fd = os.open(self.path(name, version), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            nbytes = os.fstat(fd).st_size
            if dest.nbytes < nbytes:
                raise ValueError(f"{name}: destination of {dest.nbytes} B < {nbytes} B cached")

            def get(off: int, size: int) -> int:
                view = dest[off : off + size]
                done = 0
                while done < size:
                    got = os.preadv(fd, [view[done:]], off + done)
                    if got == 0:
                        raise CacheError(f"{name} v{version}: the cache file ends early")
                    done += got
                return size

            self._run(get, nbytes, name)
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_read += nbytes
        return True

    @contextlib.contextmanager
    def mapped(self, name: str, version: int) -> Iterator[memoryview]:
        """A read-only view of a cached version (for writing it to SSD without a copy)."""
        path = self.path(name, version)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise CacheError(f"{name} v{version} is not in the host cache ({path})") from exc
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        view = memoryview(mm)
        try:
            yield view
        finally:
            # Unmapped at once, so a flush holds one record's pages mapped at a time. (After an error a
            # traceback may still hold slices of the view; the mapping then goes with them.)
            with contextlib.suppress(BufferError):
                view.release()
                mm.close()

    def versions(self) -> dict[tuple[str, int], Path]:
        """(name, version) -> path of every complete file; partial writes are not listed."""
        out: dict[tuple[str, int], Path] = {}
        start = len(self.prefix) + 1
        for path in SHM_DIR.glob(f"{self.prefix}-*"):
            if path.name.endswith((TMP, FREE)):
                continue
            name, sep, version = path.name[start:].rpartition(".v")
            if sep and version.isdigit():
                out[(name, int(version))] = path
        return out

    def keep_only(self, keep: Collection[tuple[str, int]]) -> int:
        """Retire every complete file whose (name, version) is not in `keep`: the first of each record
        becomes its `.free` file (unless it has one), the others are deleted. Returns how many."""
        doomed = [(key, p) for key, p in self.versions().items() if key not in keep]
        for (name, _), p in doomed:
            free = self.free_path(name)
            with contextlib.suppress(FileNotFoundError):
                if free.exists():
                    p.unlink()
                else:
                    os.rename(p, free)
        self._forget_missing()
        return len(doomed)

    def _pinned(self, key: tuple[int, int], nbytes: int) -> _KeptMapping | None:
        """The kept mapping of inode `key` if it maps `nbytes`, pinned (see `_unpin`); else None."""
        with self._lock:
            kept = self._maps.get(key)
            if kept is None or kept.nbytes != nbytes:
                return None
            kept.users += 1
            return kept

    def _keep(self, key: tuple[int, int], kept: _KeptMapping) -> _KeptMapping:
        """Keep a new mapping of inode `key`, pinned."""
        with self._lock:
            kept.users += 1
            self._maps[key] = kept
        return kept

    def _unpin(self, kept: _KeptMapping) -> None:
        """A copy through `kept` is done: close it if it was forgotten meanwhile."""
        with self._lock:
            kept.users -= 1
            close = kept.forgotten and kept.users == 0
        if close:
            kept.close()

    def _forget(self, key: tuple[int, int]) -> None:
        """Drop the kept mapping of inode `key`. One that a copy still uses closes when the copy is done:
        the commit's `keep_only` scans /dev/shm while other threads rename files (tmp -> version -> .free),
        and a scan can miss a file mid-rename, so a live file's mapping may be forgotten under a copy."""
        with self._lock:
            kept = self._maps.pop(key, None)
            if kept is not None and kept.users:
                kept.forgotten = True
                kept = None
        if kept is not None:
            kept.close()

    def _forget_missing(self) -> None:
        """Drop the mappings of files no longer in /dev/shm (deleted: they would pin their pages)."""
        live = _live_inodes(self.prefix)
        with self._lock:
            gone = [key for key in self._maps if key not in live]
        for key in gone:
            self._forget(key)

    @property
    def kept_mappings(self) -> int:
        return len(self._maps)

    def free_bytes(self) -> int:
        """Bytes parked in `.free` files for reuse (they count against /dev/shm like the versions)."""
        total = 0
        for p in SHM_DIR.glob(f"{self.prefix}-*{FREE}"):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def remove_partial(self) -> None:
        """Delete files a killed writer left half-written (call when no writer of this run is alive)."""
        for path in SHM_DIR.glob(f"{self.prefix}-*{TMP}"):
            path.unlink(missing_ok=True)

    def stored_bytes(self) -> int:
        total = 0
        for p in self.versions().values():
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def remove_all(self) -> None:
        self._forget_all()
        remove_files(self.prefix)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._forget_all()

    def _forget_all(self) -> None:
        with self._lock:
            keys = list(self._maps)
        for key in keys:
            self._forget(key)

    def _run(self, fn: Any, nbytes: int, name: str) -> None:
        futures: list[Future[int]] = [
            self._pool.submit(fn, off, min(CHUNK_BYTES, nbytes - off))
            for off in range(0, nbytes, CHUNK_BYTES)
        ]
        try:
            for f in futures:
                f.result()
        except OSError as exc:
            for f in futures:
                f.cancel()
            raise _cache_io_error(exc, name) from exc


class _KeptMapping:
    """A populated shared mapping of one cache file (see HostCache: kept mappings)."""

    def __init__(self, fd: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self.users = 0  # copies running through it (HostCache pins it for each)
        self.forgotten = False  # dropped from the cache's mappings while pinned: close at the last unpin
        self.mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.array: np.ndarray = np.frombuffer(self.mm, dtype=np.uint8)

    def close(self) -> None:
        del self.array
        # A copy still running in another thread holds a slice: the mapping then goes with the slice.
        with contextlib.suppress(BufferError):
            self.mm.close()


def _live_inodes(prefix: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file of the cache named with `prefix` (a kept mapping of any other inode
    belongs to a deleted file)."""
    live = set()
    for path in SHM_DIR.glob(f"{prefix}-*"):
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            live.add((st.st_dev, st.st_ino))
    return live


def _copy_chunk(dst: np.ndarray, src: np.ndarray, off: int, size: int) -> int:
    np.copyto(dst[off : off + size], src[off : off + size])  # releases the GIL: the threads copy at once
    return size


def _cache_io_error(exc: OSError, name: str) -> CacheError:
    if exc.errno == errno.ENOSPC:
        return CacheError(
            f"/dev/shm is full: no room for {name} in the host cache; enlarge /dev/shm (docker "
            "--shm-size), lower budgets.cpu_mem or set runtime.cpu_cache: off. Committed state is intact."
        )
    return CacheError(f"host cache I/O error on {name}: {exc}")


def remove_files(prefix: str) -> int:
    """Delete every cache file (complete or partial) named with `prefix`; returns how many."""
    n = 0
    for path in SHM_DIR.glob(f"{prefix}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            n += 1
    return n


class CacheArea:
    """The driver's side of a run's host cache (the files, not their contents).

    Lifecycle: created beside the ring, once the plan is known - refuses (CacheError) when /dev/shm lacks
    room for the planned cache -; `close()` (also on `with` exit and at interpreter exit) removes every
    cache file left. It closes after the actors have stopped: a write-back SSD actor flushes the cache to
    SSD on its way out. After kill -9 of the driver, the next start's `ring.remove_stale_segments()`
    removes the files (they are named after the dead driver's pid).
    """

    def __init__(self, prefix: str, nbytes: int) -> None:
        self.prefix = prefix
        free = _shm_free_bytes()
        if nbytes and free is not None and free < nbytes:
            raise CacheError(
                f"/dev/shm has {free / 2**20:.0f} MiB free but the planned host cache needs "
                f"{nbytes / 2**20:.0f} MiB: enlarge /dev/shm (docker --shm-size), lower budgets.cpu_mem, or "
                "set runtime.cpu_cache: off"
            )
        atexit.register(self.close)

    def close(self) -> None:
        remove_files(self.prefix)
        atexit.unregister(self.close)

    def __enter__(self) -> CacheArea:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CachedStore:
    """The store of the SSD actor: an `SSDTensorStore` plus the host cache for the records `spec` names.

    Owns the `HostCache` (not the `SSDTensorStore`, which the SSD actor opens and closes). Lifecycle:
    constructed right after the SSD store is opened - if the store names in-memory versions that the
    cache no longer holds (the driver was restarted), it restores the last durable snapshot first, and it
    drops cache files the store no longer needs -; `read_into`/`write_from`/`publish`/`commit`/
    `discard_staged` during steps; `flush()` writes back; `close()` stops its threads (the files stay for
    the next actor or the driver). In write-back mode the first publication of a run that finds no
    snapshot of the store's current state takes one (the first in-memory version must not become the
    only copy of anything); other modes delete snapshots left by an earlier write-back run at their first
    publication (they only hold space). Opening changes nothing on SSD unless it must restore, so a start
    refused later (another model) leaves the run as it was. Thread-safe like the SSD store: the SSD actor
    calls it from several threads at once.
    """

    def __init__(self, ssd: SSDTensorStore, spec: CacheSpec, num_units: int) -> None:
        self.ssd = ssd
        self.spec = spec
        self.names = spec.record_names(num_units)
        self.cache = HostCache(spec.prefix, spec.threads) if spec.prefix and self.names else None
        self._gc_lock = threading.Lock()
        self._writing: set[tuple[str, int]] = set()
        self._durable_lock = threading.Lock()
        self.flushed_bytes = 0
        self.restored: durable.DurableInfo | None = None
        self.paths = [d.parent for d in ssd.dirs]
        try:
            if self.cache is not None:
                self.cache.remove_partial()  # the store's lock is ours: no other writer is alive
            lost = [r for r in ssd.durable_records() if r.in_memory and not self._cached(r.name, r.version)]
            if lost:
                gone = ssd.committed_step
                self.restored = durable.restore(ssd)
                log.warning(
                    "step %d lived partly in a host cache that is gone (%s, ...): the store is back at the "
                    "last durable step %d (%s); the run resumes from there",
                    gone,
                    lost[0].name,
                    self.restored.step,
                    self.restored.name,
                )
            snapshot = durable.latest(self.paths)
            self._snapshot_step = snapshot.step if snapshot is not None else -1
            # Whether the snapshots already suit this mode: in write-back, one covers what an in-memory
            # version would replace (the store's state now, or the one before its in-memory versions).
            self._snapshots_ok = (
                self.restored is not None or self._holds_memory() or durable.matches(ssd)
                if spec.write_back
                else snapshot is None
            )
            self._collect()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------ the step's I/O

    def read_into(self, name: str, dest: memoryview) -> TensorRecord:
        return self.read(name, dest)[0]

    def read(self, name: str, dest: memoryview) -> tuple[TensorRecord, bool]:
        """Read the version a step reads of `name` into `dest`; returns it and whether the cache had it."""
        rec = self.ssd.record(name)
        held = rec.in_memory or name in self.names
        if held and self.cache is not None and self.cache.read(name, rec.version, dest.cast("B")):
            return rec, True
        if rec.in_memory:
            raise CacheError(
                f"{name} v{rec.version} lives only in the host cache, which no longer holds it (was /dev/shm "
                "cleared under the run?); re-run to resume from the last durable step"
            )
        return self.ssd.read_into(name, dest), False

    def write_from(
        self, name: str, src: memoryview, *, dtype: str, numel: int, version: int, transient: bool = False
    ) -> TensorRecord:
        """Stage `src` as version `version` of `name` (see the module docs for where the bytes go)."""
        if name not in self.names or self.cache is None:
            return self.ssd.write_from(
                name, src, dtype=dtype, numel=numel, version=version, transient=transient
            )
        if not transient:
            done = self.ssd.durable_version(name, version)
            if done is not None:
                return done  # a repeated write of a published or committed version changes nothing
        padded = align_up(numel * _itemsize(dtype))
        if src.nbytes < padded:
            raise ValueError(f"{name}: source buffer of {src.nbytes} B is shorter than {padded} B (padded)")
        key = (name, version)
        with self._gc_lock:
            self._writing.add(key)  # from now until staged, the collector leaves this version alone
        try:
            self.cache.write(name, version, src.cast("B")[:padded])
            if self.spec.write_through and not transient:
                return self.ssd.write_from(name, src, dtype=dtype, numel=numel, version=version)
            return self.ssd.stage_in_memory(
                name, dtype=dtype, numel=numel, version=version, transient=transient
            )
        finally:
            with self._gc_lock:
                self._writing.discard(key)

    def read_range(self, name: str, dest: memoryview, lo: int, hi: int) -> TensorRecord:
        """Bytes [lo, hi) of the version a step reads (SSDTensorStore.read_range); SSD records only."""
        self._refuse_ranges(name)
        return self.ssd.read_range(name, dest, lo, hi)

    def write_range(
        self,
        name: str,
        src: memoryview,
        *,
        dtype: str,
        numel: int,
        version: int,
        lo: int,
        hi: int,
        transient: bool = False,
    ) -> TensorRecord | None:
        """Bytes [lo, hi) of a version assembled range by range (SSDTensorStore.write_range); SSD records
        only."""
        self._refuse_ranges(name)
        return self.ssd.write_range(
            name, src, dtype=dtype, numel=numel, version=version, lo=lo, hi=hi, transient=transient
        )

    def _refuse_ranges(self, name: str) -> None:
        # The planner never splits a unit whose state it caches: a cached record moves whole (or is lent).
        if name in self.names and self.cache is not None:
            raise CacheError(
                f"{name} is held by the host cache, which moves records whole: ranged I/O is for records "
                "on SSD (a plan that caches a unit's state does not update it in element ranges)"
            )

    def view(self, name: str) -> LentRecord:
        """The cache file of the version a step reads of `name`, for another process to read in place (the
        optimizer reads the step's gradient log there instead of through a copy into a ring slot)."""
        rec = self.ssd.record(name)
        if name not in self.names or self.cache is None or not self.cache.has(name, rec.version):
            raise CacheError(
                f"{name} v{rec.version} is not in the host cache: read it into a ring slot instead"
            )
        return LentRecord(
            name, rec.dtype, rec.numel, rec.version, str(self.cache.path(name, rec.version)), self.spec.prefix
        )

    def lend(self, name: str, version: int, copy: bool = True) -> LentRecord:
        """Lend cached record `name` for updating into version `version` in another process (LentRecord).
        The version the step reads comes into the cache first when it is only on SSD (the first step
        after a start), read straight into its cache file. `copy=False`: the new version's file is not
        a copy of the version read, which the record names as its `source` (HostCache.lend)."""
        if name not in self.names or self.cache is None:
            raise CacheError(f"{name} is not a cached record: it cannot be lent")
        rec = self.ssd.record(name)
        if not self.cache.has(name, rec.version):
            if rec.in_memory:
                raise CacheError(
                    f"{name} v{rec.version} lives only in the host cache, which no longer holds it (was "
                    "/dev/shm cleared under the run?); re-run to resume from the last durable step"
                )
            self.cache.fill(name, rec.version, rec.padded_nbytes, lambda view: self.ssd.read_into(name, view))
        target = self.cache.lend(name, rec.version, version, copy=copy)
        source = "" if copy else str(self.cache.path(name, rec.version))
        return LentRecord(name, rec.dtype, rec.numel, version, target, self.spec.prefix, source)

    def adopt(self, lent: LentRecord) -> TensorRecord:
        """Stage the lent record's new version, now written, as `write_from` stages a written one.
        Idempotent: a version already published or committed changes nothing."""
        done = self.ssd.durable_version(lent.name, lent.version)
        if done is not None:
            return done
        if self.cache is None:
            raise CacheError(f"{lent.name}: adopted without a host cache")
        key = (lent.name, lent.version)
        with self._gc_lock:
            self._writing.add(key)  # from the rename until staged, the collector leaves it alone
        try:
            if not self.cache.adopt(lent.name, lent.version) and not self.cache.has(*key):
                raise CacheError(f"{lent.name} v{lent.version}: no lent file to adopt ({lent.target})")
            if self.spec.write_through:
                with self.cache.mapped(*key) as view:
                    return self.ssd.write_from(
                        lent.name, view, dtype=lent.dtype, numel=lent.numel, version=lent.version
                    )
            return self.ssd.stage_in_memory(
                lent.name, dtype=lent.dtype, numel=lent.numel, version=lent.version
            )
        finally:
            with self._gc_lock:
                self._writing.discard(key)

    def publish(
        self, step: int, names: Collection[str], meta: Mapping[str, Any], keep_previous: Collection[str] = ()
    ) -> bool:
        self._snapshots_before_change()
        done = self.ssd.publish(step, names, meta, keep_previous)
        if done:
            self._collect()
        return done

    def commit(self, step: int, meta: Mapping[str, Any]) -> None:
        """Commit step `step` (its meta gains `durable_step`: the step a crash of the whole machine would
        go back to), then flush when one is due (write-back)."""
        self._snapshots_before_change()
        durable_step = self._snapshot_step if self.spec.write_back else step
        self.ssd.commit(step, {**meta, "durable_step": durable_step})
        self._collect()
        if self.spec.write_back and self.spec.flush_every and step % self.spec.flush_every == 0:
            self.flush()

    def discard_staged(self) -> None:
        self.ssd.discard_staged()
        self._collect()

    # ------------------------------------------------------------------------------ durability

    @property
    def durable_step(self) -> int:
        """The step on SSD whole: the committed one, or with in-memory versions the last snapshot's."""
        return self._snapshot_step if self._holds_memory() else self.ssd.committed_step

    def flush(self) -> int:
        """Write-back: write every durable in-memory version to SSD, make the manifest (and journal) name
        those files, and snapshot the store; returns the step now durable on SSD. Call between steps, or
        with the step's calls drained (nothing staged). A crash at any point leaves the previous snapshot
        (or, once the manifest is rewritten, the store itself) durable."""
        if not self.spec.write_back or self.ssd.committed_step < 0:
            return self.ssd.committed_step
        held = [r for r in self.ssd.durable_records() if r.in_memory]
        if not held and durable.matches(self.ssd):
            return self.ssd.committed_step
        for rec in held:
            if self.cache is None:
                raise CacheError(f"{rec.name} v{rec.version} is in host memory, but this store has no cache")
            with self.cache.mapped(rec.name, rec.version) as view:
                self.ssd.write_from(rec.name, view, dtype=rec.dtype, numel=rec.numel, version=rec.version)
            self.flushed_bytes += rec.padded_nbytes
        step = self.ssd.committed_step
        self.ssd.relocate_staged({"durable_step": step})
        with self._durable_lock:
            info = durable.take(self.ssd)
            self._snapshot_step = step
            self._snapshots_ok = True
        log.info(
            "flushed %d cached records (%.1f MiB) to SSD: step %d is durable (%s)",
            len(held),
            sum(r.padded_nbytes for r in held) / 2**20,
            step,
            info.name,
        )
        return step

    def _snapshots_before_change(self) -> None:
        """Before the first change of the durable state (see the class docs)."""
        if self._snapshots_ok or self.ssd.committed_step < 0:
            return  # (nothing durable yet: a new store's first commit is whole on SSD, SSDIOActor.initialize)
        with self._durable_lock:
            if self._snapshots_ok:
                return
            if self.spec.write_back:
                durable.take(self.ssd)
                self._snapshot_step = self.ssd.committed_step
            else:
                durable.remove_all(self.paths)
                self._snapshot_step = -1
            self._snapshots_ok = True

    def _holds_memory(self) -> bool:
        return any(r.in_memory for r in self.ssd.durable_records())

    # ------------------------------------------------------------------------------ queries

    @property
    def committed_step(self) -> int:
        return self.ssd.committed_step

    @property
    def pending(self) -> PendingStep | None:
        return self.ssd.pending

    @property
    def manifest(self) -> Manifest:
        return self.ssd.manifest

    def record(self, name: str) -> TensorRecord:
        """The version a step reads (see SSDTensorStore.record)."""
        return self.ssd.record(name)

    def stored_bytes(self) -> int:
        """Bytes on SSD (the cache's bytes: `stats()`)."""
        return self.ssd.stored_bytes()

    def stats(self) -> dict[str, int]:
        return {
            "cache_records": len(self.names),
            "cache_bytes": self.cache.stored_bytes() if self.cache else 0,
            "cache_bytes_read": self.cache.bytes_read if self.cache else 0,
            "cache_bytes_written": self.cache.bytes_written if self.cache else 0,
            "cache_bytes_lent": self.cache.bytes_lent if self.cache else 0,
            "flushed_bytes": self.flushed_bytes,
            "durable_step": self.durable_step,
        }

    def remove_files(self) -> None:
        """Delete every cache file (the run is ending; after a flush they hold nothing the SSD lacks)."""
        if self.cache is not None:
            self.cache.remove_all()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _cached(self, name: str, version: int) -> bool:
        return self.cache is not None and self.cache.has(name, version)

    def _collect(self) -> None:
        """Delete cache files whose version the store no longer needs (superseded, discarded)."""
        if self.cache is None:
            return
        with self._gc_lock:
            self.cache.keep_only(self.ssd.live_versions() | self._writing)
