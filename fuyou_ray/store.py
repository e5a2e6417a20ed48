"""The SSD tensor store: one record per stored tensor, O_DIRECT I/O from a thread pool, atomic commits.

Layout on disk. Each SSD directory holds `fuyou-store/` with one file per (record, version, stripe):
`u00003.master.v000012.s1` is stripe 1 of unit 3's fp32 master weights as written by step 12. A record's
bytes (padded to 4 KiB) are split into one contiguous stripe per directory, so a read or write of one record
keeps every SSD busy. Writes never touch a committed file: a new version goes to new files (copy-on-write),
and `commit()` publishes the step by writing `manifest.json` (fsync + rename + fsync of the directory); only
then are the superseded files deleted. A crash before the rename leaves the previous step intact; staged
files of an unfinished step are found and removed when the store is opened again.

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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

ALIGN = 4096
CHUNK_BYTES = 4 * 1024 * 1024
MANIFEST = "manifest.json"
STORE_DIR = "fuyou-store"
FORMAT_VERSION = 1


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


class RecordState(enum.Enum):
    """STAGED: written by the step in progress. COMMITTED: part of the last published step."""

    STAGED = "staged"
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
        )


@dataclass
class Manifest:
    """What a committed step consists of: the records, plus driver metadata (data position, RNG, ...)."""

    step: int = -1  # -1: nothing committed yet
    records: dict[str, TensorRecord] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class TensorStore(Protocol):
    """The narrow storage protocol the actors use. Buffers are writable/readable memoryviews."""

    def read_into(self, name: str, dest: memoryview) -> TensorRecord: ...

    def write_from(
        self, name: str, src: memoryview, *, dtype: str, numel: int, version: int, transient: bool = False
    ) -> TensorRecord: ...

    def commit(self, step: int, meta: Mapping[str, Any]) -> None: ...

    def discard_staged(self) -> None: ...


class SSDTensorStore:
    """The on-SSD store of one run. Owns its directories' `fuyou-store/` folders and the manifest.

    Lifecycle: `SSDTensorStore(paths)` opens or creates the store and removes leftovers of an unfinished
    step; `write_from`/`read_into` move records during a step; `commit(step)` publishes it; `close()`
    stops the I/O threads. Thread-safe: the SSD actor calls it from several threads at once.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        direct_io: bool = True,
        io_threads: int = 8,
        verify_checksums: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        background_unlink: bool = True,
    ) -> None:
        if not paths:
            raise StorePathError("no SSD directory given: set ssd.paths to one or more directories")
        if chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a multiple of {ALIGN}")
        self.dirs = [self._prepare_dir(Path(p)) for p in paths]
        self.direct = [direct_io and _supports_o_direct(d) for d in self.dirs]
        for d, ok in zip(self.dirs, self.direct, strict=True):
            if direct_io and not ok:
                log.warning("%s refuses O_DIRECT (tmpfs or overlay?): using buffered I/O there", d)
        self.verify = verify_checksums
        self.chunk_bytes = chunk_bytes
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="fuyou-io")
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyou-unlink")
        self._background_unlink = background_unlink
        self._lock = threading.Lock()
        self._staged: dict[str, TensorRecord] = {}
        self.manifest = self._load_manifest()
        self._remove_unreferenced_files()
        self.bytes_read = 0
        self.bytes_written = 0

    # ------------------------------------------------------------------------------------------ setup

    @staticmethod
    def _prepare_dir(path: Path) -> Path:
        check_ssd_path(path)
        (path / STORE_DIR).mkdir(parents=True, exist_ok=True)
        return path / STORE_DIR

    def _load_manifest(self) -> Manifest:
        path = self.dirs[0] / MANIFEST
        if not path.exists():
            return Manifest()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION:
                raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT_VERSION}")
            if data.get("num_dirs") != len(self.dirs):
                raise ManifestError(
                    f"{path}: the store was written over {data.get('num_dirs')} SSD directories, "
                    f"ssd.paths lists {len(self.dirs)}; give the same directories in the same order"
                )
            records = {r["name"]: TensorRecord.from_json(r) for r in data["records"]}
            manifest = Manifest(step=int(data["step"]), records=records, meta=dict(data.get("meta", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"{path}: unreadable manifest ({exc}); restore it or start a new run"
            ) from exc
        for rec in manifest.records.values():
            for k, stripe in enumerate(rec.stripes):
                file = self.dirs[stripe.directory] / rec.file_name(k)
                if not file.exists() or file.stat().st_size < stripe.nbytes:
                    raise ManifestError(f"{path}: record {rec.name} names {file}, which is missing or short")
        return manifest

    def _remove_unreferenced_files(self) -> None:
        """Delete files of unfinished steps (staged before a crash) and of superseded versions."""
        keep = {
            (s.directory, rec.file_name(k))
            for rec in self.manifest.records.values()
            for k, s in enumerate(rec.stripes)
        }
        for index, d in enumerate(self.dirs):
            for f in d.iterdir():
                if f.name.startswith("u") and ".v" in f.name and (index, f.name) not in keep:
                    f.unlink(missing_ok=True)

    def warm_up(self) -> None:
        """Start every I/O thread now (threads start lazily), so their stacks and malloc arenas exist
        before memory accounting begins rather than appearing as fuyou-ray's allocations."""
        barrier = threading.Barrier(self._pool._max_workers)
        futures = [
            self._pool.submit(lambda: (barrier.wait(5), zlib.crc32(bytes(ALIGN))))
            for _ in range(self._pool._max_workers)
        ]
        for f in futures:
            f.result()

    def wait_for_deletions(self) -> None:
        """Block until files superseded by earlier commits are unlinked."""
        self._deleter.submit(lambda: None).result()

    def close(self) -> None:
        self._deleter.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------ queries

    @property
    def committed_step(self) -> int:
        return self.manifest.step

    def record(self, name: str) -> TensorRecord:
        """The newest version of `name`: staged by the step in progress, else committed."""
        with self._lock:
            rec = self._staged.get(name) or self.manifest.records.get(name)
        if rec is None:
            raise RecordNotFoundError(f"the store holds no record {name!r}")
        return rec

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._staged or name in self.manifest.records

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self.manifest.records) | set(self._staged))

    def stored_bytes(self) -> int:
        with self._lock:
            recs = list(self.manifest.records.values()) + list(self._staged.values())
        return sum(r.padded_nbytes for r in recs)

    # ------------------------------------------------------------------------------------------ I/O

    def _stripes_for(self, name: str, padded: int) -> tuple[Stripe, ...]:
        n = len(self.dirs)
        if n == 1 or padded <= self.chunk_bytes:
            # Small records live whole in one directory, spread by name so small I/O also balances.
            return (Stripe(zlib.crc32(name.encode()) % n, 0, padded),)
        per = align_up(-(-padded // n))
        stripes, offset = [], 0
        for d in range(n):
            size = min(per, padded - offset)
            if size <= 0:
                break
            stripes.append(Stripe(d, offset, size))
            offset += size
        return tuple(stripes)

    def _open(self, directory: int, file_name: str, write: bool) -> int:
        flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        if self.direct[directory]:
            flags |= os.O_DIRECT
        path = self.dirs[directory] / file_name
        try:
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
        """Write `numel` elements of `src` as a new version (src must cover the 4 KiB-padded size)."""
        itemsize = _itemsize(dtype)
        nbytes = numel * itemsize
        padded = align_up(nbytes)
        if src.nbytes < padded:
            raise ValueError(f"{name}: source buffer of {src.nbytes} B is shorter than {padded} B (padded)")
        src = src.cast("B")[:padded]
        stripes = self._stripes_for(name, padded)
        rec = TensorRecord(name, dtype, numel, nbytes, version, stripes, (), chunk_bytes=self.chunk_bytes)
        fds = [self._open(s.directory, rec.file_name(k), write=True) for k, s in enumerate(stripes)]
        try:
            for k, s in enumerate(stripes):
                try:
                    os.posix_fallocate(fds[k], 0, s.nbytes)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise StoreFullError(
                            f"{self.dirs[s.directory]}: no space for {s.nbytes} B of {name}; free space "
                            "or add a directory to ssd.paths. Committed state is intact."
                        ) from exc
                    raise

            def write_chunk(k: int, rec_off: int, file_off: int, size: int) -> int:
                view = src[rec_off : rec_off + size]
                done = 0
                while done < size:
                    done += os.pwritev(fds[k], [view[done:]], file_off + done)
                logical = max(0, min(size, nbytes - rec_off))
                return zlib.crc32(view[:logical])

            futures = [self._pool.submit(write_chunk, *c) for c in self._chunks(rec)]
            crcs = tuple(_results(futures, name))
            for fd in fds:
                os.fsync(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFullError(f"SSD full while writing {name}; committed state is intact") from exc
            raise
        finally:
            for fd in fds:
                os.close(fd)
        rec = replace(rec, chunk_crcs=crcs, transient=transient)
        with self._lock:
            previous = self._staged.get(name)
            self._staged[name] = rec
            self.bytes_written += padded
            committed = self.manifest.records.get(name)
        # A version staged earlier in this step and now superseded: nothing will ever name its files.
        if (
            previous is not None
            and previous.version != rec.version
            and (committed is None or committed.version != previous.version)
        ):
            self._delete_files(previous)
        return rec

    def read_into(self, name: str, dest: memoryview) -> TensorRecord:
        """Read the newest version of `name` into `dest` (which must cover the padded size)."""
        rec = self.record(name)
        if dest.nbytes < rec.padded_nbytes:
            raise ValueError(f"{name}: destination of {dest.nbytes} B < {rec.padded_nbytes} B (padded)")
        dest = dest.cast("B")[: rec.padded_nbytes]
        fds = [self._open(s.directory, rec.file_name(k), write=False) for k, s in enumerate(rec.stripes)]
        try:

            def read_chunk(k: int, rec_off: int, file_off: int, size: int) -> int:
                view = dest[rec_off : rec_off + size]
                done = 0
                while done < size:
                    got = os.preadv(fds[k], [view[done:]], file_off + done)
                    if got == 0:
                        raise ChecksumError(f"{name}: file {rec.file_name(k)} ends early (torn write?)")
                    done += got
                logical = max(0, min(size, rec.nbytes - rec_off))
                return zlib.crc32(view[:logical]) if self.verify else 0

            chunks = list(self._chunks(rec))
            futures = [self._pool.submit(read_chunk, *c) for c in chunks]
            crcs = _results(futures, name)
        finally:
            for fd in fds:
                os.close(fd)
        if self.verify:
            for i, (got, want) in enumerate(zip(crcs, rec.chunk_crcs, strict=True)):
                if got != want:
                    raise ChecksumError(
                        f"{name} v{rec.version}: chunk {i} (bytes {chunks[i][1]}..) fails its "
                        f"checksum (crc {got:#x} != {want:#x}): the record is corrupted on disk"
                    )
        with self._lock:
            self.bytes_read += rec.padded_nbytes
        return rec

    # ------------------------------------------------------------------------------------------ commits

    def commit(self, step: int, meta: Mapping[str, Any]) -> None:
        """Publish every staged non-transient record as step `step`, atomically; drop the rest."""
        with self._lock:
            staged = dict(self._staged)
        old = self.manifest
        records = dict(old.records)
        for name, rec in staged.items():
            if not rec.transient:
                records[name] = replace(rec, state=RecordState.COMMITTED)
        new = Manifest(step=step, records=records, meta=dict(meta))
        self._write_manifest(new)
        # Forget the staged records only once they are durable: if the manifest write fails, they stay
        # staged, so the commit can be retried (or the step discarded) instead of silently losing them.
        with self._lock:
            self.manifest = new
            for name, rec in staged.items():
                if self._staged.get(name) is rec:
                    del self._staged[name]
        # Only now that the new manifest is durable may the superseded and transient files go. Unlinking
        # GBs of files takes seconds on some filesystems, so it runs off the step's critical path; a
        # crash before it finishes leaves unreferenced files, which the next open removes.
        doomed = [rec for name, rec in old.records.items() if records[name].version != rec.version]
        doomed += [rec for rec in staged.values() if rec.transient]
        if self._background_unlink:
            self._deleter.submit(self._delete_all, doomed)
        else:
            self._delete_all(doomed)

    def discard_staged(self) -> None:
        """Forget and delete everything written since the last commit (the step is abandoned)."""
        with self._lock:
            staged = list(self._staged.values())
            self._staged.clear()
        for rec in staged:
            committed = self.manifest.records.get(rec.name)
            if committed is None or committed.version != rec.version:
                self._delete_files(rec)

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
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.dirs[0], os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

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


def _results(futures: list[Future[int]], name: str) -> list[int]:
    try:
        return [f.result() for f in futures]
    except OSError as exc:
        raise StoreError(f"I/O error on {name}: {exc}") from exc


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
