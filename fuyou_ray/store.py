"""The SSD tensor store: one record per stored tensor, O_DIRECT I/O from a thread pool, crash-consistent.

Layout on disk. Each SSD directory holds `fuyou-store/` with one file per (record, version, stripe):
`u00003.master.v000012.s1` is stripe 1 of unit 3's fp32 master weights as written by step 12. A record's
bytes (padded to 4 KiB) are split into one contiguous stripe per directory, so a read or write of one record
keeps every SSD busy. A record file is written once - by one `write_from`, or range by range by
`write_range` (a unit too large for one ring slot is updated in element ranges) - and never modified after
its version is staged: a new version goes to new files, so no committed copy is ever overwritten in place
(and a checkpoint may hard-link them).

Crash consistency without doubling the state. A step moves through three durable states:
- `manifest.json` (written with fsync + rename + fsync of the directory) names the records of the last
  committed step s, plus driver metadata.
- `journal.jsonl` lists units of step s+1 already *published*: `publish()` makes a unit's new versions
  durable (one fsync'd, checksummed journal line), and only then deletes the versions they supersede -
  except those the caller keeps until the commit (the compute-dtype params, which a replay of the step
  still reads). So at most the units in flight exist twice, never the whole state.
- `commit(s+1)` writes the next manifest (every published and staged record) and removes the journal.
Records written but not yet published are *staged*: a crash forgets them, and opening the store deletes
their files. A step interrupted after some units were published is finished by replaying it: the
published units are skipped (`pending`), the others updated from the same inputs, so the result is the
one an uninterrupted step gives, bit for bit. Reads see the committed state plus what this process staged
(a step's gradient log); published versions become visible at the commit.

One process owns a store at a time (`StoreLock`, an flock released by the kernel however the process dies).

Integrity. Each 4 MiB chunk carries a CRC-32 computed in the I/O thread that moved it; reads verify them
(`verify_checksums`), so a torn or corrupted record is named, never trained on.

I/O. Requests of `chunk_bytes` run on a thread pool (queue depth = io_threads); `os.preadv/pwritev` release
the GIL. O_DIRECT needs 4 KiB-aligned buffers, offsets and lengths: ring slots are page-aligned and sized
in whole 4 KiB blocks. Where the filesystem refuses O_DIRECT (tmpfs, some overlays) the store falls back to
buffered I/O for that directory and says so in the log.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import mmap
import os
import threading
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fuyou_ray.journal import Journal, StoreLock, StoreLockedError, fsync_dir

log = logging.getLogger(__name__)

ALIGN = 4096
CHUNK_BYTES = 4 * 1024 * 1024
# A writer's staging buffer (SSDIOActor.initialize): a record larger than it is written in ranges of it.
STAGING_BYTES = 64 * CHUNK_BYTES
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = ".lock"
STORE_DIR = "fuyou-store"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 stores (no journal) open unchanged


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


class StoreError(RuntimeError):
    """Base class of everything the store refuses or detects."""


class StorePathError(StoreError):
    """An SSD directory is missing, not a directory, or not writable."""


class StoreFullError(StoreError):
    """An SSD directory has no room for a write."""


class RecordNotFoundError(StoreError):
    """A read asked for a record the store does not hold."""


class ChecksumError(StoreError):
    """A record read back does not match the checksum written with it (torn or corrupted data)."""


class ManifestError(StoreError):
    """The manifest is unreadable, from another format, or names files that are missing."""


class StoreBusyError(StoreError, StoreLockedError):
    """Another live process owns the store."""


class RangeError(StoreError, ValueError):
    """A ranged read or write whose bounds split one of the record's checksum chunks."""


class RecordInMemoryError(StoreError):
    """A record's bytes live only in the run's host-memory cache (write-back; see fuyou_ray/cache.py), which
    this reader does not have: the running (or crashed) run's SSD actor owns them."""


class RecordState(enum.Enum):
    """STAGED: written by this process, not durable. PUBLISHED: durable as part of the step in progress
    (journal). COMMITTED: part of the last committed step (manifest). Legal moves: STAGED -> PUBLISHED ->
    COMMITTED, STAGED -> COMMITTED (a commit publishes what is staged), STAGED -> deleted (discard)."""

    STAGED = "staged"
    PUBLISHED = "published"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Stripe:
    directory: int  # index into the store's directories
    offset: int  # byte offset of this stripe inside the (padded) record
    nbytes: int  # padded bytes in this stripe (a multiple of 4 KiB)


@dataclass(frozen=True)
class TensorRecord:
    """Everything known about one stored tensor version. Immutable; a new version is a new record."""

    name: str
    dtype: str
    numel: int
    nbytes: int  # logical bytes (numel * itemsize)
    version: int
    stripes: tuple[Stripe, ...]
    chunk_crcs: tuple[int, ...]  # CRC-32 of the logical bytes of each chunk_bytes chunk of each stripe
    state: RecordState = RecordState.STAGED
    transient: bool = False  # e.g. a step's gradient log: never part of a committed manifest
    chunk_bytes: int = CHUNK_BYTES  # the chunking of chunk_crcs (the store may reopen with another)
    # The bytes live only in the run's host-memory cache (write-back, fuyou_ray/cache.py): no files, no
    # checksums here. Until a flush writes them to SSD such a record is durable only while the cache lives.
    in_memory: bool = False

    @property
    def padded_nbytes(self) -> int:
        return align_up(self.nbytes)

    def file_name(self, stripe_index: int) -> str:
        return f"{self.name}.v{self.version:08d}.s{stripe_index}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> TensorRecord:
        return TensorRecord(
            name=d["name"],
            dtype=d["dtype"],
            numel=d["numel"],
            nbytes=d["nbytes"],
            version=d["version"],
            stripes=tuple(Stripe(**s) for s in d["stripes"]),
            chunk_crcs=tuple(d["chunk_crcs"]),
            state=RecordState(d["state"]),
            transient=d.get("transient", False),
            chunk_bytes=d.get("chunk_bytes", CHUNK_BYTES),
            in_memory=d.get("in_memory", False),
        )


@dataclass
class Manifest:
    """What a committed step consists of: the records, plus driver metadata (data position, RNG, ...)."""

    step: int = -1  # -1: nothing committed yet
    records: dict[str, TensorRecord] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Assembly:
    """A version `write_range` is writing range by range: its files exist at full size; `crcs` holds the
    checksums of the chunks written so far, by chunk index."""

    rec: TensorRecord
    crcs: dict[int, int]
    num_chunks: int


@dataclass
class PendingStep:
    """The published part of the step after the committed one (what the journal holds).

    `meta` identifies the step's inputs: every unit of one step must be published with the same meta, so a
    replay with other inputs (a changed config) cannot mix with what was already applied.
    """

    step: int
    meta: dict[str, Any]
    records: dict[str, TensorRecord] = field(default_factory=dict)
    keep: set[str] = field(default_factory=set)  # names whose committed version stays until the commit


class TensorStore(Protocol):
    """The narrow storage protocol the actors use. Buffers are writable/readable memoryviews."""

    def read_into(self, name: str, dest: memoryview) -> TensorRecord: ...

    def write_from(
        self, name: str, src: memoryview, *, dtype: str, numel: int, version: int, transient: bool = False
    ) -> TensorRecord: ...

    def commit(self, step: int, meta: Mapping[str, Any]) -> None: ...

    def discard_staged(self) -> None: ...


class SSDTensorStore:
    """The on-SSD store of one run. Owns its directories' `fuyou-store/` folders, the manifest and journal.

    Lifecycle: `SSDTensorStore(paths)` takes the store's lock, opens or creates it and removes leftovers of
    an unfinished step (staged files; a torn journal line); `write_from`/`read_into` move records during a
    step (`write_range`/`read_range` a record too large for one buffer, range by range); `publish` makes a
    unit's new versions durable; `commit(step)` publishes the step; `close()` stops
    the I/O threads and releases the lock. Thread-safe: the SSD actor calls it from several threads at once.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        direct_io: bool = True,
        io_threads: int = 8,
        verify_checksums: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        lock_timeout_s: float = 5.0,
        background_unlink: bool = True,
    ) -> None:
        if not paths:
            raise StorePathError("no SSD directory given: set ssd.paths to one or more directories")
        if chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a multiple of {ALIGN}")
        self.dirs = [self._prepare_dir(Path(p)) for p in paths]
        self._store_lock = StoreLock(self.dirs[0] / LOCK)
        try:
            self._store_lock.acquire(lock_timeout_s)
        except StoreLockedError as exc:
            raise StoreBusyError(str(exc)) from None
        try:
            self.direct = [direct_io and _supports_o_direct(d) for d in self.dirs]
            for d, ok in zip(self.dirs, self.direct, strict=True):
                if direct_io and not ok:
                    log.warning("%s refuses O_DIRECT (tmpfs or overlay?): using buffered I/O there", d)
            self.verify = verify_checksums
            self.chunk_bytes = chunk_bytes
            self._lock = threading.Lock()  # guards the record maps
            self._meta_lock = threading.Lock()  # serialises journal and manifest writes
            self._staged: dict[str, TensorRecord] = {}
            # Versions being written range by range (`write_range`), by name; staged once complete.
            self._assembling: dict[str, _Assembly] = {}
            self._assembly_lock = threading.Lock()
            self.journal = Journal(self.dirs[0] / JOURNAL)
            self._open_metadata()
        except BaseException:
            self._store_lock.release()
            raise
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="fuyou-io")
        self._sums = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="fuyou-crc")
        # Unlinking GBs of superseded files takes seconds on some filesystems: it runs off the step's
        # critical path. A crash before it finishes leaves unreferenced files, which the next open removes.
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyou-unlink")
        self._background_unlink = background_unlink
        self.bytes_read = 0
        self.bytes_written = 0

    # ------------------------------------------------------------------------------------------ setup

    @staticmethod
    def _prepare_dir(path: Path) -> Path:
        check_ssd_path(path)
        (path / STORE_DIR).mkdir(parents=True, exist_ok=True)
        return path / STORE_DIR

    def _open_metadata(self) -> None:
        self.manifest = self._load_manifest()
        self._pending = self._load_journal()
        self._check_files()
        self._remove_unreferenced_files()

    def reload(self) -> None:
        """Read the manifest and journal again after they were replaced on disk under this store's lock
        (fuyou_ray/durable.py restores a durable snapshot this way); drops what this process staged."""
        self.discard_staged()
        with self._meta_lock, self._lock:
            self._open_metadata()

    def _load_manifest(self) -> Manifest:
        path = self.dirs[0] / MANIFEST
        if not path.exists():
            return Manifest()
        try:
            data = json.loads(path.read_text())
            if data.get("format") not in READABLE_FORMATS:
                raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT_VERSION}")
            if data.get("num_dirs") != len(self.dirs):
                raise ManifestError(
                    f"{path}: the store was written over {data.get('num_dirs')} SSD directories, "
                    f"ssd.paths lists {len(self.dirs)}; give the same directories in the same order"
                )
            records = {r["name"]: TensorRecord.from_json(r) for r in data["records"]}
            return Manifest(step=int(data["step"]), records=records, meta=dict(data.get("meta", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"{path}: unreadable manifest ({exc}); restore it or start a new run"
            ) from exc

    def _load_journal(self) -> PendingStep | None:
        """The published units of the step after the committed one. Entries of other steps are stale (a
        crash between the manifest's rename and the journal's removal): the manifest already has them."""
        entries = self.journal.load()
        valid = [e for e in entries if e.get("step") == self.manifest.step + 1]
        if len(valid) != len(entries) or (entries and len(entries) != _count_lines(self.journal.path)):
            # Drop stale entries and a torn tail now, so that the next append follows a valid line.
            self.journal.rewrite(valid)
        pending: PendingStep | None = None
        try:
            for e in valid:
                if pending is None:
                    pending = PendingStep(int(e["step"]), dict(e["meta"]))
                for r in e["records"]:
                    rec = TensorRecord.from_json(r)
                    pending.records[rec.name] = replace(rec, state=RecordState.PUBLISHED)
                pending.keep.update(e.get("keep", []))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"{self.journal.path}: unreadable entry ({exc}); restore a checkpoint"
            ) from exc
        return pending

    def _check_files(self) -> None:
        """Every file the manifest and journal name must exist (a committed version superseded by a
        published one may already be gone: its deletion is what publication allows)."""
        pending = self._pending.records if self._pending else {}
        for rec in self.manifest.records.values():
            superseded = rec.name in pending and rec.name not in (self._pending.keep if self._pending else ())
            if not superseded:
                self._check_record_files(rec, self.dirs[0] / MANIFEST)
        for rec in pending.values():
            self._check_record_files(rec, self.journal.path)

    def _check_record_files(self, rec: TensorRecord, source: Path) -> None:
        # (An in-memory record has no stripes: its owner, fuyou_ray/cache.py, checks its cache file.)
        for k, stripe in enumerate(rec.stripes):
            file = self.dirs[stripe.directory] / rec.file_name(k)
            if not file.exists() or file.stat().st_size < stripe.nbytes:
                raise ManifestError(f"{source}: record {rec.name} names {file}, which is missing or short")

    def _referenced(self) -> set[tuple[int, str]]:
        recs = list(self.manifest.records.values())
        if self._pending:
            recs += self._pending.records.values()
        return {(s.directory, rec.file_name(k)) for rec in recs for k, s in enumerate(rec.stripes)}

    def _remove_unreferenced_files(self) -> None:
        """Delete files of unfinished steps (staged before a crash) and of superseded versions."""
        keep = self._referenced()
        for index, d in enumerate(self.dirs):
            for f in d.iterdir():
                if _is_record_file(f.name) and (index, f.name) not in keep:
                    f.unlink(missing_ok=True)
            (d / (MANIFEST.rsplit(".", 1)[0] + ".tmp")).unlink(missing_ok=True)

    def warm_up(self) -> None:
        """Start every I/O and checksum thread now (threads start lazily), so their stacks and malloc
        arenas exist before memory accounting begins rather than appearing as fuyou-ray's allocations."""
        for pool in (self._pool, self._sums):
            barrier = threading.Barrier(pool._max_workers)

            def meet(barrier: threading.Barrier = barrier) -> int:
                barrier.wait(5)
                return zlib.crc32(bytes(ALIGN))

            for f in [pool.submit(meet) for _ in range(pool._max_workers)]:
                f.result()

    def wait_for_deletions(self) -> None:
        """Block until files superseded by earlier publications and commits are unlinked."""
        self._deleter.submit(lambda: None).result()

    def close(self) -> None:
        self._deleter.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self._sums.shutdown(wait=True)
        self._store_lock.release()

    # ------------------------------------------------------------------------------------------ queries

    @property
    def committed_step(self) -> int:
        return self.manifest.step

    @property
    def pending(self) -> PendingStep | None:
        """The step after the committed one, where some of its units are already published."""
        with self._lock:
            return self._pending

    def record(self, name: str) -> TensorRecord:
        """The version a step reads: what this process staged (e.g. the step's gradient log), else the
        committed one. Published versions of the step in progress become visible at its commit."""
        with self._lock:
            rec = self._staged.get(name) or self.manifest.records.get(name)
            if rec is None and self._pending is not None:
                rec = self._pending.records.get(name)
        if rec is None:
            raise RecordNotFoundError(f"the store holds no record {name!r}")
        return rec

    def newest(self, name: str) -> TensorRecord:
        """The newest durable version of `name`: the one the step in progress published, else the committed
        one. What a stopped run holds of a unit whose update was published before the stop (its previous
        state is gone; a replay skips the unit). A step reads `record`."""
        with self._lock:
            rec = self._pending.records.get(name) if self._pending is not None else None
            rec = rec or self.manifest.records.get(name)
        if rec is None:
            raise RecordNotFoundError(f"the store holds no durable record {name!r}")
        return rec

    def has(self, name: str) -> bool:
        with self._lock:
            published = self._pending is not None and name in self._pending.records
            return name in self._staged or name in self.manifest.records or published

    def names(self) -> list[str]:
        with self._lock:
            published = set(self._pending.records) if self._pending else set()
            return sorted(set(self.manifest.records) | set(self._staged) | published)

    def stored_bytes(self) -> int:
        """Bytes of every record file the store holds now (committed, published and staged)."""
        with self._lock:
            recs = {(r.name, r.version): r for r in self.manifest.records.values()}
            if self._pending:
                recs.update({(r.name, r.version): r for r in self._pending.records.values()})
            recs.update({(r.name, r.version): r for r in self._staged.values()})
            superseded = set()
            if self._pending:
                superseded = {
                    (n, r.version)
                    for n, r in self.manifest.records.items()
                    if n in self._pending.records and n not in self._pending.keep
                }
        return sum(r.padded_nbytes for key, r in recs.items() if key not in superseded and not r.in_memory)

    def free_bytes(self) -> int:
        """Free bytes over the store's directories (each filesystem counted once)."""
        seen: dict[int, int] = {}
        for d in self.dirs:
            try:
                st = os.statvfs(d)
                seen[os.stat(d).st_dev] = st.f_bavail * st.f_frsize
            except FileNotFoundError as exc:
                raise StorePathError(f"{d} is missing: was the SSD directory removed?") from exc
        return sum(seen.values())

    def committed_files(self) -> list[tuple[TensorRecord, int, Path]]:
        """(record, stripe index, path) of every file of the committed step (for checkpoints)."""
        with self._lock:
            recs = list(self.manifest.records.values())
        _refuse_in_memory(recs, self.manifest.step)
        return [
            (rec, k, self.dirs[s.directory] / rec.file_name(k))
            for rec in recs
            for k, s in enumerate(rec.stripes)
        ]

    # ------------------------------------------------- hooks of the host-memory cache (fuyou_ray/cache.py)

    def durable_records(self) -> list[TensorRecord]:
        """The records a reopened store would read: the committed ones not superseded by a published one,
        plus the published ones."""
        with self._lock:
            pending = self._pending
            out = [
                rec
                for name, rec in self.manifest.records.items()
                if pending is None or name not in pending.records or name in pending.keep
            ]
            if pending is not None:
                out += pending.records.values()
        return out

    def live_versions(self) -> set[tuple[str, int]]:
        """(name, version) of every record still needed: durable (see `durable_records`) or staged."""
        with self._lock:
            staged = list(self._staged.values())
        return {(r.name, r.version) for r in [*self.durable_records(), *staged]}

    def stage_in_memory(
        self, name: str, *, dtype: str, numel: int, version: int, transient: bool = False
    ) -> TensorRecord:
        """Stage version `version` of `name` whose bytes the caller keeps in host memory (no SSD I/O). It is
        published and committed like any record; its manifest entry says `in_memory`."""
        nbytes = numel * _itemsize(dtype)
        rec = TensorRecord(name, dtype, numel, nbytes, version, (), (), transient=transient, in_memory=True)
        with self._lock:
            previous = self._staged.pop(name, None)
            self._staged[name] = rec
        if previous is not None:
            self._delete_files(previous)
        return rec

    def relocate_staged(self, meta_update: Mapping[str, Any]) -> int:
        """Make the staged SSD copies of durable in-memory records (same name and version, written by
        `write_from`) the durable ones: the journal and then the manifest are rewritten (same step, meta
        updated by `meta_update`). Returns how many records moved to SSD. A crash in between leaves each
        file valid on its own (one names the new SSD files, the other still the in-memory versions)."""
        with self._meta_lock:
            with self._lock:
                moved = {
                    (n, r.version): replace(r, state=RecordState.COMMITTED)
                    for n, r in self._staged.items()
                    if not r.in_memory and not r.transient
                }
                pending = self._pending
                manifest = self.manifest

                def swap(rec: TensorRecord) -> TensorRecord:
                    new = moved.get((rec.name, rec.version))
                    return replace(new, state=rec.state) if rec.in_memory and new is not None else rec

                records = {n: swap(r) for n, r in manifest.records.items()}
                published = {n: swap(r) for n, r in pending.records.items()} if pending else {}
                used = {(r.name, r.version) for r in [*records.values(), *published.values()]}
                count = sum(
                    1
                    for r in [*manifest.records.values(), *(pending.records.values() if pending else [])]
                    if r.in_memory and (r.name, r.version) in moved
                )
            if pending is not None:
                entries = self.journal.load()
                for e in entries:
                    e["records"] = [
                        swap(TensorRecord.from_json(r)).to_json() if r.get("in_memory") else r
                        for r in e["records"]
                    ]
                self._sync_dirs()
                self.journal.rewrite(entries)
            new = Manifest(step=manifest.step, records=records, meta={**manifest.meta, **meta_update})
            self._sync_dirs()
            self._write_manifest(new)
            with self._lock:
                self.manifest = new
                if pending is not None:
                    pending.records.update(published)
                for name, rec in list(self._staged.items()):
                    if (name, rec.version) in used and not rec.in_memory:
                        del self._staged[name]
        return count

    def durable_files(self) -> list[tuple[TensorRecord, int, Path]]:
        """(record, stripe index, path) of every file of `durable_records` (for durable snapshots)."""
        recs = self.durable_records()
        _refuse_in_memory(recs, self.manifest.step)
        return [
            (rec, k, self.dirs[s.directory] / rec.file_name(k))
            for rec in recs
            for k, s in enumerate(rec.stripes)
        ]

    # ------------------------------------------------------------------------------------------ I/O

    def _stripes_for(self, name: str, padded: int) -> tuple[Stripe, ...]:
        n = len(self.dirs)
        if n == 1 or padded <= self.chunk_bytes:
            # Small records live whole in one directory, spread by name so small I/O also balances.
            return (Stripe(zlib.crc32(name.encode()) % n, 0, padded),)
        # Stripes start on checksum-chunk boundaries, so the record's chunks sit at multiples of
        # chunk_bytes: the grid that ranged reads and writes (`read_range`, `write_range`) cut along.
        per = align_up(-(-padded // n), self.chunk_bytes)
        stripes, offset = [], 0
        for d in range(n):
            size = min(per, padded - offset)
            if size <= 0:
                break
            stripes.append(Stripe(d, offset, size))
            offset += size
        return tuple(stripes)

    def _open(self, directory: int, file_name: str, write: bool, create: bool = True) -> int:
        # A record file is created by exactly one write (O_EXCL after removing any leftover of the same name),
        # so a write never goes through to a file that a checkpoint hard-linked. `create=False` opens a
        # file that `write_range` created for the version it is assembling.
        if write and not create:
            flags = os.O_WRONLY
            write = False  # nothing to remove first
        else:
            flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL) if write else os.O_RDONLY
        if self.direct[directory]:
            flags |= os.O_DIRECT
        path = self.dirs[directory] / file_name
        try:
            if write:
                path.unlink(missing_ok=True)
            return os.open(path, flags, 0o644)
        except FileNotFoundError as exc:
            raise StorePathError(f"{path} is missing: was the SSD directory removed?") from exc

    def _chunks(self, rec: TensorRecord) -> Iterator[tuple[int, int, int, int]]:
        """(stripe index, offset in record, offset in file, nbytes) for each chunk, in record order."""
        for k, stripe in enumerate(rec.stripes):
            pos = 0
            while pos < stripe.nbytes:
                size = min(rec.chunk_bytes, stripe.nbytes - pos)
                yield k, stripe.offset + pos, pos, size
                pos += size

    def durable_version(self, name: str, version: int) -> TensorRecord | None:
        """The published or committed record `name` at exactly `version`, if there is one."""
        return self._durable_version(name, version)

    def _durable_version(self, name: str, version: int) -> TensorRecord | None:
        """The published or committed record `name` at exactly `version`, if there is one."""
        with self._lock:
            rec = self._pending.records.get(name) if self._pending else None
            if rec is None or rec.version != version:
                rec = self.manifest.records.get(name)
        return rec if rec is not None and rec.version == version else None

    def write_from(
        self,
        name: str,
        src: memoryview,
        *,
        dtype: str,
        numel: int,
        version: int,
        transient: bool = False,
    ) -> TensorRecord:
        """Write `numel` elements of `src` as a new version (src must cover the 4 KiB-padded size).

        Idempotent: a version that is already durable (published or committed) is not written again, so a
        repeated call never touches a durable file.
        """
        durable = self._durable_version(name, version)
        if durable is not None and not transient and not durable.in_memory:
            return durable
        itemsize = _itemsize(dtype)
        nbytes = numel * itemsize
        padded = align_up(nbytes)
        if src.nbytes < padded:
            raise ValueError(f"{name}: source buffer of {src.nbytes} B is shorter than {padded} B (padded)")
        rec = self._new_record(name, dtype, numel, version)
        with self._lock:
            previous = self._staged.pop(name, None)
        if previous is not None:
            # A version staged earlier by this process and now superseded: nothing will ever name its files.
            self._delete_files(previous)
        self._allocate(rec)
        try:
            chunks, _ = self._range_chunks(rec, 0, nbytes)
            crcs = tuple(self._write_chunks(rec, src.cast("B")[:padded], 0, chunks))
        except BaseException:
            self._delete_files(rec)  # a half-written version is nobody's
            raise
        rec = replace(rec, chunk_crcs=crcs, transient=transient)
        with self._lock:
            self._staged[name] = rec
            self.bytes_written += padded
        return rec

    def read_into(self, name: str, dest: memoryview, rec: TensorRecord | None = None) -> TensorRecord:
        """Read `rec` (default: `record(name)`) into `dest` (which must cover the padded size), verifying its
        checksums."""
        rec = self.record(name) if rec is None else rec
        return self._read(rec, dest, 0, rec.nbytes)

    def read_range(
        self, name: str, dest: memoryview, lo: int, hi: int, rec: TensorRecord | None = None
    ) -> TensorRecord:
        """Read bytes [lo, hi) of `rec` (default: `record(name)`) into `dest`, verifying the checksums of
        the chunks they cover. `lo` and `hi` fall on the record's checksum chunks (multiples of
        `rec.chunk_bytes`; `hi` may be the record's size, and then `dest` covers the 4 KiB padding too)."""
        rec = self.record(name) if rec is None else rec
        return self._read(rec, dest, lo, hi)

    def _read(self, rec: TensorRecord, dest: memoryview, lo: int, hi: int) -> TensorRecord:
        name = rec.name
        if rec.in_memory:
            _refuse_in_memory([rec], self.manifest.step)
        chunks, end = self._range_chunks(rec, lo, hi)
        if dest.nbytes < end - lo:
            raise ValueError(f"{name}: destination of {dest.nbytes} B < {end - lo} B (bytes {lo}..{end})")
        dest = dest.cast("B")[: end - lo]
        fds: dict[int, int] = {}
        try:
            for k in sorted({c[1] for c in chunks}):
                fds[k] = self._open(rec.stripes[k].directory, rec.file_name(k), write=False)

            def read_chunk(k: int, rec_off: int, file_off: int, size: int) -> Future[int] | None:
                view = dest[rec_off - lo : rec_off - lo + size]
                done = 0
                while done < size:
                    got = os.preadv(fds[k], [view[done:]], file_off + done)
                    if got == 0:
                        raise ChecksumError(f"{name}: file {rec.file_name(k)} ends early (torn write?)")
                    done += got
                logical = max(0, min(size, rec.nbytes - rec_off))
                # Checked on the checksum threads while this I/O thread reads the next chunk.
                return self._sums.submit(_crc, view[:logical]) if self.verify else None

            pending = _results([self._pool.submit(read_chunk, *c[1:]) for c in chunks], name)
            crcs = [0 if f is None else f.result() for f in pending]
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.verify:
            for (i, _, off, _, _), got in zip(chunks, crcs, strict=True):
                if got != rec.chunk_crcs[i]:
                    raise ChecksumError(
                        f"{name} v{rec.version}: chunk {i} (bytes {off}..) fails its "
                        f"checksum (crc {got:#x} != {rec.chunk_crcs[i]:#x}): the record is corrupted on disk "
                        f"({self.dirs[rec.stripes[0].directory]}); restore a checkpoint"
                    )
        with self._lock:
            self.bytes_read += end - lo
        return rec

    def _range_chunks(
        self, rec: TensorRecord, lo: int, hi: int
    ) -> tuple[list[tuple[int, int, int, int, int]], int]:
        """The chunks bytes [lo, hi) of `rec` cover, as (chunk index, stripe, offset in record, offset in
        file, nbytes), and where the covered bytes end (the padded size when hi is the record's end)."""
        if not 0 <= lo <= hi <= rec.nbytes:
            raise RangeError(f"{rec.name}: bytes [{lo}, {hi}) outside its {rec.nbytes} B")
        end = hi if hi < rec.nbytes else rec.padded_nbytes
        out = []
        for i, (k, off, file_off, size) in enumerate(self._chunks(rec)):
            if off + size <= lo or off >= end:
                continue
            if off < lo or off + size > end:
                raise RangeError(
                    f"{rec.name}: bytes [{lo}, {hi}) split its checksum chunk {i} "
                    f"(bytes {off}..{off + size}): ranges must start and end on multiples of "
                    f"{rec.chunk_bytes} B (or at the record's end)"
                )
            out.append((i, k, off, file_off, size))
        return out, end

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
        """Write bytes [lo, hi) of version `version` of `name` (a record of `numel` elements) from `src`.

        For a record too large to pass through one buffer: the version is assembled from ranges, written
        by any threads in any order; the call that completes it stages the version (as `write_from` does)
        and returns its record, the others return None. Bounds as for `read_range`. Writing a range again
        rewrites the same bytes. Idempotent for a version that is already durable, like `write_from`.
        """
        durable = self._durable_version(name, version)
        if durable is not None and not transient and not durable.in_memory:
            return durable
        # Bad bounds are refused before anything is created (the layout of a version is a pure function).
        chunks, end = self._range_chunks(self._new_record(name, dtype, numel, version), lo, hi)
        if src.nbytes < end - lo:
            raise ValueError(f"{name}: source of {src.nbytes} B < {end - lo} B (bytes {lo}..{end})")
        asm = self._assembly(name, dtype, numel, version)
        rec = asm.rec
        try:
            crcs = self._write_chunks(rec, src.cast("B")[: end - lo], lo, chunks)
        except BaseException:
            self._abandon(asm)
            raise
        with self._assembly_lock:
            if self._assembling.get(name) is not asm:
                raise StoreError(
                    f"{name} v{version}: the version was abandoned while bytes {lo}..{hi} were written "
                    "(another range failed, or the step was discarded); the step's replay writes it again"
                )
            asm.crcs.update((c[0], crc) for c, crc in zip(chunks, crcs, strict=True))
            complete = len(asm.crcs) == asm.num_chunks
            if complete:
                del self._assembling[name]
        with self._lock:
            self.bytes_written += end - lo
        if not complete:
            return None
        rec = replace(rec, chunk_crcs=tuple(asm.crcs[i] for i in range(asm.num_chunks)), transient=transient)
        with self._lock:
            self._staged[name] = rec
        return rec

    def _write_chunks(
        self, rec: TensorRecord, src: memoryview, lo: int, chunks: list[tuple[int, int, int, int, int]]
    ) -> list[int]:
        """Write `chunks` (from `_range_chunks`) of `rec`'s allocated files from `src`, which holds the
        record's bytes from `lo` on, and fsync them; returns the chunks' checksums. The checksums run
        beside the writes on their own threads: the I/O threads only move bytes, so the SSD keeps
        io_threads requests in flight."""
        fds: dict[int, int] = {}
        try:
            for k in sorted({c[1] for c in chunks}):
                fds[k] = self._open(rec.stripes[k].directory, rec.file_name(k), write=True, create=False)

            def write_chunk(k: int, rec_off: int, file_off: int, size: int) -> int:
                view = src[rec_off - lo : rec_off - lo + size]
                done = 0
                while done < size:
                    done += os.pwritev(fds[k], [view[done:]], file_off + done)
                return size

            sums = [
                self._sums.submit(_crc, src[off - lo : off - lo + max(0, min(n, rec.nbytes - off))])
                for _, _, off, _, n in chunks
            ]
            _results([self._pool.submit(write_chunk, *c[1:]) for c in chunks], rec.name)
            crcs: list[int] = _results(sums, rec.name)
            for fd in fds.values():
                os.fsync(fd)
            return crcs
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFullError(
                    f"SSD full while writing {rec.name}: free space and re-run. Committed state is intact."
                ) from exc
            raise
        finally:
            for fd in fds.values():
                os.close(fd)

    def _assembly(self, name: str, dtype: str, numel: int, version: int) -> _Assembly:
        """The version of `name` being assembled by `write_range`: created (files allocated) by the first
        range. An assembly of another version, or a staged version, of `name` is superseded: deleted."""
        with self._assembly_lock:
            asm = self._assembling.get(name)
            if asm is not None and (asm.rec.version, asm.rec.numel, asm.rec.dtype) == (version, numel, dtype):
                return asm
            if asm is not None:
                del self._assembling[name]
                self._delete_files(asm.rec)
            with self._lock:
                previous = self._staged.pop(name, None)
            if previous is not None:
                self._delete_files(previous)
            rec = self._new_record(name, dtype, numel, version)
            self._allocate(rec)
            asm = _Assembly(rec, {}, sum(1 for _ in self._chunks(rec)))
            self._assembling[name] = asm
            return asm

    def _new_record(self, name: str, dtype: str, numel: int, version: int) -> TensorRecord:
        nbytes = numel * _itemsize(dtype)
        stripes = self._stripes_for(name, align_up(nbytes))
        return TensorRecord(name, dtype, numel, nbytes, version, stripes, (), chunk_bytes=self.chunk_bytes)

    def _allocate(self, rec: TensorRecord) -> None:
        """Create `rec`'s files at their full size (a full SSD is a named error here, not mid-write)."""
        for k, s in enumerate(rec.stripes):
            fd = self._open(s.directory, rec.file_name(k), write=True)
            try:
                os.posix_fallocate(fd, 0, s.nbytes)
            except OSError as exc:
                self._delete_files(rec)
                if exc.errno == errno.ENOSPC:
                    raise StoreFullError(
                        f"{self.dirs[s.directory]}: no space for {s.nbytes} B of {rec.name}; free space "
                        "or add a directory to ssd.paths. Committed state is intact."
                    ) from exc
                raise
            finally:
                os.close(fd)

    def _abandon(self, asm: _Assembly) -> None:
        with self._assembly_lock:
            if self._assembling.get(asm.rec.name) is asm:
                del self._assembling[asm.rec.name]
        self._delete_files(asm.rec)

    # ------------------------------------------------------------------------------------------ commits

    def publish(
        self, step: int, names: Collection[str], meta: Mapping[str, Any], keep_previous: Collection[str] = ()
    ) -> bool:
        """Make the staged versions of `names` durable as part of step `step` (the one after the committed).

        Once the journal line is on disk the versions they supersede are deleted, except `keep_previous`,
        whose committed versions stay readable until the commit. Idempotent: names already published are
        skipped; returns whether anything was published.
        """
        with self._meta_lock:
            if step != self.manifest.step + 1:
                raise StoreError(f"publish of step {step}, but the committed step is {self.manifest.step}")
            with self._lock:
                pending = self._pending
                if pending is not None and pending.meta != dict(meta):
                    raise StoreError(
                        f"step {step} was partly applied with other inputs ({pending.meta}) than now "
                        f"({dict(meta)}): resume with the config the step started with, or restore a "
                        "checkpoint"
                    )
                todo: list[TensorRecord] = []
                for name in names:
                    rec = self._staged.get(name)
                    if rec is None and pending is not None and name in pending.records:
                        continue  # published before: a repeated call
                    if rec is None or rec.transient or rec.version != step:
                        raise StoreError(f"publish of {name} for step {step}: no staged version {step} of it")
                    todo.append(rec)
            if not todo:
                return False
            self._sync_dirs()  # the new files' directory entries are durable before the journal names them
            self.journal.append(
                {
                    "step": step,
                    "meta": dict(meta),
                    "records": [replace(r, state=RecordState.PUBLISHED).to_json() for r in todo],
                    "keep": sorted(keep_previous),
                }
            )
            superseded = []
            with self._lock:
                if self._pending is None:
                    self._pending = PendingStep(step, dict(meta))
                for rec in todo:
                    self._pending.records[rec.name] = replace(rec, state=RecordState.PUBLISHED)
                    if self._staged.get(rec.name) is rec:
                        del self._staged[rec.name]
                    old = self.manifest.records.get(rec.name)
                    if rec.name in keep_previous:
                        self._pending.keep.add(rec.name)
                    elif old is not None and old.version != rec.version:
                        superseded.append(old)
        self._unlink(superseded)
        return True

    def commit(self, step: int, meta: Mapping[str, Any]) -> None:
        """Make every published and staged non-transient record step `step`, atomically; drop the rest."""
        with self._meta_lock:
            with self._lock:
                staged = dict(self._staged)
                pending = self._pending
            if pending is not None and pending.step != step:
                raise StoreError(f"commit of step {step} while step {pending.step} is partly published")
            old = self.manifest
            records = dict(old.records)
            if pending is not None:
                records.update(
                    {n: replace(r, state=RecordState.COMMITTED) for n, r in pending.records.items()}
                )
            for name, rec in staged.items():
                if not rec.transient:
                    records[name] = replace(rec, state=RecordState.COMMITTED)
            new = Manifest(step=step, records=records, meta=dict(meta))
            self._sync_dirs()
            self._write_manifest(new)
            # Forget the staged records only once they are durable: if the manifest write fails, they stay
            # staged, so the commit can be retried (or the step discarded) instead of silently losing them.
            with self._lock:
                self.manifest = new
                self._pending = None
                for name, rec in staged.items():
                    if self._staged.get(name) is rec:
                        del self._staged[name]
            self.journal.remove()
        # Only now that the new manifest is durable may the superseded and transient files go.
        doomed = [rec for name, rec in old.records.items() if records[name].version != rec.version]
        doomed += [rec for rec in staged.values() if rec.transient]
        self._unlink(doomed)

    def discard_staged(self) -> None:
        """Forget and delete everything this process staged since the last publication (the attempt is
        abandoned). Published units stay: a replay of the step skips them."""
        with self._lock:
            staged = list(self._staged.values())
            self._staged.clear()
        with self._assembly_lock:
            staged += [asm.rec for asm in self._assembling.values()]
            self._assembling.clear()
        for rec in staged:
            if self._durable_version(rec.name, rec.version) is None:
                self._delete_files(rec)

    def _sync_dirs(self) -> None:
        for d in self.dirs:
            try:
                fsync_dir(d)
            except FileNotFoundError as exc:
                raise StorePathError(f"{d} is missing: was the SSD directory removed?") from exc

    def _write_manifest(self, manifest: Manifest) -> None:
        data = {
            "format": FORMAT_VERSION,
            "num_dirs": len(self.dirs),
            "step": manifest.step,
            "meta": manifest.meta,
            "records": [r.to_json() for r in manifest.records.values()],
        }
        path = self.dirs[0] / MANIFEST
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except FileNotFoundError as exc:
            raise StorePathError(f"{self.dirs[0]} is missing: was the SSD directory removed?") from exc
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno == errno.ENOSPC:
                raise StoreFullError(
                    f"{self.dirs[0]}: no space for the manifest; free space and re-run. Committed state "
                    "is intact."
                ) from exc
            raise
        fsync_dir(self.dirs[0])

    def _unlink(self, records: list[TensorRecord]) -> None:
        if self._background_unlink:
            self._deleter.submit(self._delete_all, records)
        else:
            self._delete_all(records)

    def _delete_all(self, records: list[TensorRecord]) -> None:
        for rec in records:
            self._delete_files(rec)

    def _delete_files(self, rec: TensorRecord) -> None:
        for k, s in enumerate(rec.stripes):
            (self.dirs[s.directory] / rec.file_name(k)).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- helpers


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "float64": 8}


def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; one of {sorted(_ITEMSIZE)}") from None


def _crc(view: memoryview) -> int:
    return zlib.crc32(view)


def _results(futures: list[Future[Any]], name: str) -> list[Any]:
    try:
        return [f.result() for f in futures]
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise StoreError(f"I/O error on {name}: {exc}") from exc


def step_scratch_bytes(
    unit_numels: Sequence[int], param_itemsize: int, *, clipping: bool, units_in_flight: int
) -> int:
    """SSD bytes a training step needs beyond the committed state (which is sum over units of the params
    plus 12 B/element of fp32 master weights and Adam moments, each record padded to 4 KiB).

    - every unit's new params: the old ones stay until the commit, because a replay of the step reads them;
    - the gradient log (fp32) when exact clipping is on;
    - the whole new state of the units in flight (written, not yet published).
    """
    params = sum(align_up(n * param_itemsize) for n in unit_numels)
    grads = sum(align_up(n * 4) for n in unit_numels) if clipping else 0
    largest = max((align_up(n * param_itemsize) + 3 * align_up(n * 4) for n in unit_numels), default=0)
    return params + grads + units_in_flight * largest


def _refuse_in_memory(records: Sequence[TensorRecord], step: int) -> None:
    held = [r.name for r in records if r.in_memory]
    if held:
        raise RecordInMemoryError(
            f"{held[0]} (and {len(held) - 1} more) of step {step} lived only in the run's host-memory cache "
            "(runtime.cpu_cache, write-back): run `fuyou-ray train` with the run's config to bring the "
            "store back to its last durable step (its SSD actor restores it), then read it"
        )


def _is_record_file(name: str) -> bool:
    """`u00003.master.v00000012.s1` is a record file (the others are the manifest, journal and lock)."""
    return name.startswith("u") and ".v" in name and ".s" in name


def _count_lines(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


def _supports_o_direct(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, ALIGN)
        os.pwritev(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()


def check_ssd_path(path: str | os.PathLike[str]) -> None:
    """Raise StorePathError unless `path` is (or can be created as) a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorePathError(f"SSD path {path} is not a directory: fix ssd.paths")
    if path.resolve() == Path(path.anchor or "/"):
        raise StorePathError(f"SSD path {path} is a filesystem root: give ssd.paths a directory of its own")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fuyou-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StorePathError(
            f"SSD path {path} is not writable ({exc.strerror}): fix ssd.paths or its permissions"
        ) from exc


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (usable for O_DIRECT) of at least nbytes, padded to 4 KiB."""
    return mmap.mmap(-1, max(ALIGN, align_up(nbytes)))
