"""The SSD tensor store: round trips, striping, staged/committed versions, atomic commits, crash recovery,
corruption detection, path errors and the O_DIRECT probe."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fuyou_ray.store as store_mod
from fuyou_ray.store import (
    ALIGN,
    MANIFEST,
    STORE_DIR,
    ChecksumError,
    ManifestError,
    RangeError,
    RecordNotFoundError,
    RecordState,
    SSDTensorStore,
    StoreError,
    StoreFullError,
    StorePathError,
    TensorRecord,
    align_up,
    aligned_buffer,
)

CHUNK = 8192  # small chunks so that modest records span several chunks and stripes
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


# ---------------------------------------------------------------------------------------------- helpers


def make_dirs(tmp: Path, n: int) -> list[Path]:
    return [tmp / f"ssd{i}" for i in range(n)]


def open_store(dirs: list[Path], **kwargs: object) -> SSDTensorStore:
    kwargs.setdefault("chunk_bytes", CHUNK)
    kwargs.setdefault("io_threads", 4)
    # Unlink superseded files inline so the tests can assert on the directory right after a commit;
    # test_background_unlink covers the default.
    kwargs.setdefault("background_unlink", False)
    return SSDTensorStore(dirs, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def dirs2(tmp_path: Path) -> list[Path]:
    return make_dirs(tmp_path, 2)


@pytest.fixture
def store(dirs2: list[Path]) -> Iterator[SSDTensorStore]:
    s = open_store(dirs2)
    yield s
    s.close()


def put(
    store: SSDTensorStore, name: str, tensor: torch.Tensor, version: int, transient: bool = False
) -> TensorRecord:
    """Stage `tensor` (1-D) as `version` of `name` from a page-aligned buffer (as a ring slot would be)."""
    nbytes = tensor.numel() * tensor.element_size()
    buf = aligned_buffer(nbytes)
    torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].copy_(tensor.view(torch.uint8))
    return store.write_from(
        name,
        memoryview(buf),
        dtype=DTYPE_NAMES[tensor.dtype],
        numel=tensor.numel(),
        version=version,
        transient=transient,
    )


def crash(store: SSDTensorStore) -> None:
    """What the kernel does for a process killed with the store open: its lock goes, nothing is cleaned."""
    store._deleter.shutdown(wait=True)
    store._pool.shutdown(wait=True)
    store._sums.shutdown(wait=True)
    store._store_lock.release()


def get(store: SSDTensorStore, name: str) -> torch.Tensor:
    rec = store.record(name)
    buf = aligned_buffer(rec.nbytes)
    store.read_into(name, memoryview(buf))
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[rec.dtype]
    return torch.frombuffer(buf, dtype=torch.uint8)[: rec.nbytes].view(dtype).clone()


def data(numel: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)


def store_files(dirs: list[Path]) -> set[tuple[int, str]]:
    """(directory index, file name) of every record file in the store."""
    return {
        (i, f.name) for i, d in enumerate(dirs) for f in (d / STORE_DIR).iterdir() if f.name.startswith("u")
    }


def record_files(rec: TensorRecord) -> set[tuple[int, str]]:
    return {(s.directory, rec.file_name(k)) for k, s in enumerate(rec.stripes)}


def manifest_on_disk(dirs: list[Path]) -> dict:
    return json.loads((dirs[0] / STORE_DIR / MANIFEST).read_text())


def stripe_path(dirs: list[Path], rec: TensorRecord, k: int) -> Path:
    return dirs[rec.stripes[k].directory] / STORE_DIR / rec.file_name(k)


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest matching mount point in /proc/mounts)."""
    best, kind = "", ""
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount, fstype = fields[1], fields[2]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# ---------------------------------------------------------------------------------------------- round trips


# Sizes in elements: tiny, just under/over a block, exactly one chunk, several chunks, not 4 KiB multiples.
SIZES = [1, 3, 1023, 1025, 2048, 2049, 5000, 12_345, 40_001]


@pytest.mark.parametrize("ndirs", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_awkward_sizes(tmp_path: Path, ndirs: int, dtype: torch.dtype) -> None:
    dirs = make_dirs(tmp_path, ndirs)
    s = open_store(dirs)
    try:
        written = {}
        for i, numel in enumerate(SIZES):
            name = f"u{i:05d}.master"
            t = data(numel, seed=i, dtype=dtype)
            rec = put(s, name, t, version=1)
            written[name] = t
            itemsize = t.element_size()
            assert rec.nbytes == numel * itemsize
            assert rec.padded_nbytes == align_up(numel * itemsize) and rec.padded_nbytes % ALIGN == 0
            assert rec.dtype == DTYPE_NAMES[dtype] and rec.numel == numel and rec.version == 1
            assert rec.state is RecordState.STAGED and rec.chunk_bytes == CHUNK
            # Stripes tile the padded record exactly, each a whole number of 4 KiB blocks.
            offset = 0
            for stripe in rec.stripes:
                assert stripe.offset == offset and stripe.nbytes % ALIGN == 0 and stripe.nbytes > 0
                offset += stripe.nbytes
            assert offset == rec.padded_nbytes
            assert len(rec.chunk_crcs) == sum(-(-st.nbytes // CHUNK) for st in rec.stripes)
        for name, t in written.items():
            back = get(s, name)
            assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
        s.commit(1, {})
        for name, t in written.items():
            assert torch.equal(get(s, name).view(torch.uint8), t.view(torch.uint8))
    finally:
        s.close()
    # A fresh store over the same directories reads the committed bytes back.
    again = open_store(dirs)
    try:
        for name, t in written.items():
            assert torch.equal(get(again, name).view(torch.uint8), t.view(torch.uint8))
            assert again.record(name).state is RecordState.COMMITTED
    finally:
        again.close()


def test_round_trip_without_checksums_and_default_chunks(tmp_path: Path) -> None:
    dirs = make_dirs(tmp_path, 2)
    s = SSDTensorStore(dirs, verify_checksums=False, background_unlink=False)
    try:
        t = data(100_000, seed=3)
        put(s, "u00000.param", t, version=0)
        assert torch.equal(get(s, "u00000.param"), t)
    finally:
        s.close()


def test_reopening_with_another_chunk_size_still_verifies(tmp_path: Path) -> None:
    dirs = make_dirs(tmp_path, 2)
    s = open_store(dirs, chunk_bytes=CHUNK)
    t = data(30_000, seed=4)
    put(s, "u00001.master", t, version=1)
    s.commit(1, {})
    s.close()
    big = open_store(dirs, chunk_bytes=4 * CHUNK)
    try:
        assert torch.equal(get(big, "u00001.master"), t)
    finally:
        big.close()


def test_read_and_write_buffer_sizes_are_checked(store: SSDTensorStore) -> None:
    t = data(1000, seed=0)  # 4000 B -> 4096 B padded
    with pytest.raises(ValueError, match="shorter"):
        store.write_from("u00000.x", memoryview(bytearray(4000)), dtype="float32", numel=1000, version=0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        store.write_from("u00000.x", memoryview(aligned_buffer(4096)), dtype="complex64", numel=10, version=0)
    put(store, "u00000.x", t, version=0)
    with pytest.raises(ValueError, match="destination"):
        store.read_into("u00000.x", memoryview(bytearray(4000)))
    with pytest.raises(RecordNotFoundError, match=r"u00099\.x"):
        store.read_into("u00099.x", memoryview(aligned_buffer(4096)))
    with pytest.raises(RecordNotFoundError):
        store.record("nothing")


def test_concurrent_writes_and_reads(store: SSDTensorStore) -> None:
    tensors = {f"u{i:05d}.param": data(3000 + 977 * i, seed=i) for i in range(8)}
    errors: list[BaseException] = []

    def worker(name: str, t: torch.Tensor) -> None:
        try:
            put(store, name, t, version=2)
            assert torch.equal(get(store, name), t)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=item) for item in tensors.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert store.names() == sorted(tensors)
    padded = sum(align_up(t.numel() * 4) for t in tensors.values())
    assert store.stored_bytes() == padded
    assert store.bytes_written == padded
    assert store.bytes_read == padded


# ---------------------------------------------------------------------------------------------- striping


@pytest.mark.parametrize("ndirs", [2, 3])
def test_large_records_stripe_over_every_directory(tmp_path: Path, ndirs: int) -> None:
    dirs = make_dirs(tmp_path, ndirs)
    s = open_store(dirs)
    try:
        t = data(50_000, seed=1)  # 200 000 B, much more than one chunk
        rec = put(s, "u00002.exp_avg", t, version=5)
        assert [st.directory for st in rec.stripes] == list(range(ndirs))
        for k in range(ndirs):
            path = dirs[k] / STORE_DIR / f"u00002.exp_avg.v00000005.s{k}"
            assert path.is_file(), f"no stripe file in {dirs[k]}"
            assert path.stat().st_size == rec.stripes[k].nbytes
        assert sum(st.nbytes for st in rec.stripes) == rec.padded_nbytes
        # Stripes start on checksum chunks (ranged I/O cuts along them) and are balanced to within that.
        sizes = [st.nbytes for st in rec.stripes]
        assert all(st.offset % CHUNK == 0 for st in rec.stripes)
        assert max(sizes) - min(sizes) <= CHUNK * ndirs
        assert torch.equal(get(s, "u00002.exp_avg"), t)
    finally:
        s.close()


def test_small_records_live_whole_in_one_directory_spread_by_name(tmp_path: Path) -> None:
    dirs = make_dirs(tmp_path, 3)
    s = open_store(dirs)
    try:
        used = set()
        for i in range(24):
            rec = put(s, f"u{i:05d}.param", data(100, seed=i), version=1)
            assert len(rec.stripes) == 1 and rec.stripes[0].offset == 0
            assert rec.stripes[0].nbytes == ALIGN
            used.add(rec.stripes[0].directory)
            assert stripe_path(dirs, rec, 0).is_file()
        assert used == {0, 1, 2}
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- ranges


def ranges(numel: int, elems: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + elems, numel)) for lo in range(0, numel, elems)]


def put_range(s: SSDTensorStore, name: str, t: torch.Tensor, lo: int, hi: int, version: int) -> object:
    """Write elements [lo, hi) of fp32 `t` as a range of `name`'s version, from its own aligned buffer."""
    buf = aligned_buffer((hi - lo) * 4)
    torch.frombuffer(buf, dtype=torch.float32)[: hi - lo].copy_(t[lo:hi])
    return s.write_range(
        name, memoryview(buf), dtype="float32", numel=t.numel(), version=version, lo=lo * 4, hi=hi * 4
    )


@pytest.mark.parametrize("ndirs", [1, 2, 3])
def test_a_version_written_range_by_range_in_any_order_reads_back_whole_and_by_range(
    tmp_path: Path, ndirs: int
) -> None:
    dirs = make_dirs(tmp_path, ndirs)
    s = open_store(dirs)
    try:
        t = data(40_001, seed=3)  # 10 chunks of CHUNK bytes and a short, padded end
        elems = 2 * CHUNK // 4
        parts = ranges(t.numel(), elems)
        order = parts[1::2] + parts[::2]
        results = [put_range(s, "u00001.master", t, lo, hi, 4) for lo, hi in order[:-1]]
        assert results == [None] * (len(order) - 1)  # not staged until every byte is written
        with pytest.raises(RecordNotFoundError):
            s.record("u00001.master")
        rec = put_range(s, "u00001.master", t, *order[-1], 4)
        assert isinstance(rec, TensorRecord) and rec.version == 4 and rec.state == RecordState.STAGED
        assert s.record("u00001.master") == rec
        assert torch.equal(get(s, "u00001.master"), t)  # the whole-record read verifies every checksum
        for lo, hi in parts:
            buf = aligned_buffer((hi - lo) * 4)
            s.read_range("u00001.master", memoryview(buf), lo * 4, hi * 4)
            assert torch.equal(torch.frombuffer(buf, dtype=torch.float32)[: hi - lo], t[lo:hi])
        s.commit(1, {})
        assert torch.equal(get(s, "u00001.master"), t)
    finally:
        s.close()


def test_ranges_that_split_a_checksum_chunk_are_refused(store: SSDTensorStore) -> None:
    t = data(10_000, seed=4)
    put(store, "u00000.master", t, 1)
    buf = aligned_buffer(40_000)
    with pytest.raises(RangeError, match="multiples of 8192"):
        store.read_range("u00000.master", memoryview(buf), 4096, 8192 * 2)
    with pytest.raises(RangeError, match="outside"):
        store.read_range("u00000.master", memoryview(buf), 0, 40_004)
    with pytest.raises(RangeError):
        store.write_range(
            "u00000.exp_avg", memoryview(buf), dtype="float32", numel=10_000, version=1, lo=0, hi=4096
        )
    assert store_files(store_dirs(store)) == record_files(store.record("u00000.master"))


def test_a_corrupted_chunk_is_named_by_the_range_that_reads_it(
    store: SSDTensorStore, dirs2: list[Path]
) -> None:
    t = data(8192, seed=5)  # 32 KiB: 4 chunks, two stripes
    rec = put(store, "u00000.exp_avg_sq", t, 1)
    path = stripe_path(dirs2, rec, 1)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # in the record's third chunk
    path.write_bytes(bytes(raw))
    buf = aligned_buffer(16384)
    store.read_range("u00000.exp_avg_sq", memoryview(buf), 0, 16384)  # chunks 0-1 are intact
    with pytest.raises(ChecksumError, match="chunk 2"):
        store.read_range("u00000.exp_avg_sq", memoryview(buf), 16384, 32768)


def test_discard_deletes_a_half_assembled_version_and_a_replay_assembles_it_again(
    store: SSDTensorStore, dirs2: list[Path]
) -> None:
    old = data(20_000, seed=6)
    put(store, "u00002.master", old, 1)
    store.commit(1, {})
    committed = store_files(dirs2)
    new = data(20_000, seed=7)
    parts = ranges(new.numel(), CHUNK // 4)
    for lo, hi in parts[:3]:
        put_range(store, "u00002.master", new, lo, hi, 2)
    assert store_files(dirs2) > committed  # the new version's files exist at full size
    store.discard_staged()  # the attempt is abandoned
    assert store_files(dirs2) == committed
    assert torch.equal(get(store, "u00002.master"), old)
    for lo, hi in reversed(parts):  # the replay
        put_range(store, "u00002.master", new, lo, hi, 2)
    assert torch.equal(get(store, "u00002.master"), new)
    store.publish(2, ["u00002.master"], {"k": 1})
    # A repeated range of a published version changes nothing.
    rec = put_range(store, "u00002.master", data(20_000, seed=8), 0, CHUNK // 4, 2)
    assert isinstance(rec, TensorRecord) and rec.state == RecordState.PUBLISHED
    store.commit(2, {})
    assert torch.equal(get(store, "u00002.master"), new)


def test_a_failed_range_abandons_the_version_and_its_files(
    store: SSDTensorStore, dirs2: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = data(20_000, seed=9)
    put_range(store, "u00003.master", t, 0, CHUNK // 4, 1)

    def fail(*args: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_mod.os, "pwritev", fail)
    with pytest.raises(StoreError, match=r"I/O error on u00003\.master"):
        put_range(store, "u00003.master", t, CHUNK // 4, 2 * CHUNK // 4, 1)
    monkeypatch.undo()
    assert store_files(dirs2) == set()
    with pytest.raises(RecordNotFoundError):
        store.record("u00003.master")


# ------------------------------------------------------------------------------------ versions, commits


def test_staged_versus_committed_visibility(dirs2: list[Path]) -> None:
    s = open_store(dirs2)
    v1, v2 = data(20_000, seed=1), data(20_000, seed=2)
    rec1 = put(s, "u00000.master", v1, version=1)
    assert s.committed_step == -1
    s.commit(1, {"data_step": 1})
    assert s.committed_step == 1
    assert s.record("u00000.master").state is RecordState.COMMITTED
    rec2 = put(s, "u00000.master", v2, version=2)
    # The newest version (staged) is what the step in progress sees...
    assert s.record("u00000.master").version == 2
    assert s.record("u00000.master").state is RecordState.STAGED
    assert torch.equal(get(s, "u00000.master"), v2)
    # ...but the committed manifest still names version 1, whose files are untouched.
    assert s.manifest.records["u00000.master"].version == 1
    assert manifest_on_disk(dirs2)["records"][0]["version"] == 1
    assert record_files(rec1) | record_files(rec2) <= store_files(dirs2)
    # Another process opening the store now (e.g. after a crash) sees only the committed step.
    s.close()
    other = open_store(dirs2)
    try:
        assert other.committed_step == 1
        assert other.record("u00000.master").version == 1
        assert torch.equal(get(other, "u00000.master"), v1)
        assert other.manifest.meta == {"data_step": 1}
    finally:
        other.close()


def test_commit_publishes_and_then_deletes_superseded_files(store: SSDTensorStore, dirs2: list[Path]) -> None:
    old = put(store, "u00000.master", data(9000, seed=1), version=1)
    keep = put(store, "u00001.master", data(9000, seed=2), version=1)
    store.commit(1, {})
    new = put(store, "u00000.master", data(9000, seed=3), version=2)

    deleted_when: list[int] = []
    real_delete = store._delete_files

    def checking_delete(rec: TensorRecord) -> None:
        # When the superseded version is deleted, the new manifest must already be on disk.
        deleted_when.append(manifest_on_disk(dirs2)["step"])
        real_delete(rec)

    store._delete_files = checking_delete  # type: ignore[method-assign]
    store.commit(2, {"k": "v"})
    store.wait_for_deletions()  # superseded files are unlinked off the critical path
    assert deleted_when == [2]
    assert not record_files(old) & store_files(dirs2)
    assert store_files(dirs2) == record_files(new) | record_files(keep)
    on_disk = manifest_on_disk(dirs2)
    assert on_disk["step"] == 2 and on_disk["meta"] == {"k": "v"} and on_disk["num_dirs"] == 2
    assert {r["name"]: r["version"] for r in on_disk["records"]} == {"u00000.master": 2, "u00001.master": 1}
    assert all(r["state"] == "committed" for r in on_disk["records"])
    # No temporary manifest is left behind.
    assert not (dirs2[0] / STORE_DIR / "manifest.tmp").exists()


def test_commit_is_atomic_when_the_manifest_rename_fails(
    store: SSDTensorStore, dirs2: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = data(20_000, seed=1), data(20_000, seed=2)
    rec1 = put(store, "u00000.master", v1, version=1)
    store.commit(1, {"step": 1})
    before = (dirs2[0] / STORE_DIR / MANIFEST).read_bytes()
    rec2 = put(store, "u00000.master", v2, version=2)

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", failing_replace)
    with pytest.raises(StoreFullError, match="Committed state is intact"):
        store.commit(2, {"step": 2})
    monkeypatch.undo()
    # Nothing was published and nothing was deleted: the committed step is intact on disk and in memory.
    assert (dirs2[0] / STORE_DIR / MANIFEST).read_bytes() == before
    assert store.committed_step == 1
    assert record_files(rec1) | record_files(rec2) <= store_files(dirs2)
    # The step's writes are still staged: retrying the commit publishes them.
    assert store.record("u00000.master").version == 2
    store.commit(2, {"step": 2})
    assert store.committed_step == 2
    assert manifest_on_disk(dirs2)["step"] == 2
    assert torch.equal(get(store, "u00000.master"), v2)
    assert store_files(dirs2) == record_files(rec2)


def test_crash_before_rename_keeps_the_previous_step(
    dirs2: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store(dirs2)
    v1 = data(20_000, seed=1)
    rec1 = put(s, "u00000.master", v1, version=1)
    s.commit(1, {})
    put(s, "u00000.master", data(20_000, seed=2), version=2)
    monkeypatch.setattr(store_mod.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        s.commit(2, {})
    monkeypatch.undo()
    s.close()  # the process "dies" here
    again = open_store(dirs2)
    try:
        assert again.committed_step == 1
        assert torch.equal(get(again, "u00000.master"), v1)
        assert store_files(dirs2) == record_files(rec1)
    finally:
        again.close()


def test_discard_staged_deletes_staged_files_and_keeps_committed(
    store: SSDTensorStore, dirs2: list[Path]
) -> None:
    v1 = data(20_000, seed=1)
    rec1 = put(store, "u00000.master", v1, version=1)
    store.commit(1, {})
    put(store, "u00000.master", data(20_000, seed=2), version=2)
    put(store, "u00005.param", data(777, seed=3), version=2)
    put(store, "u00000.grad", data(20_000, seed=4), version=2, transient=True)
    assert len(store_files(dirs2)) > len(record_files(rec1))
    store.discard_staged()
    assert store_files(dirs2) == record_files(rec1)
    assert store.record("u00000.master").version == 1
    assert torch.equal(get(store, "u00000.master"), v1)
    assert not store.has("u00005.param") and not store.has("u00000.grad")
    assert store.names() == ["u00000.master"]
    assert store.committed_step == 1


def test_discard_keeps_a_committed_file_restaged_with_the_same_version(store: SSDTensorStore) -> None:
    t = data(5000, seed=1)
    rec = put(store, "u00000.param", t, version=0)
    store.commit(0, {})
    put(store, "u00000.param", t, version=0)  # a retried initialisation: same name, same version
    store.discard_staged()
    assert all(stripe_path(store_dirs(store), rec, k).is_file() for k in range(len(rec.stripes)))
    assert torch.equal(get(store, "u00000.param"), t)


def store_dirs(store: SSDTensorStore) -> list[Path]:
    return [d.parent for d in store.dirs]


def test_restaging_a_record_deletes_the_superseded_staged_version(
    store: SSDTensorStore, dirs2: list[Path]
) -> None:
    committed = put(store, "u00000.param", data(9000, seed=1), version=1)
    store.commit(1, {})
    first = put(store, "u00000.param", data(9000, seed=2), version=2)
    latest = data(9000, seed=3)
    second = put(store, "u00000.param", latest, version=3)
    # The committed version stays (it is the only committed copy); the superseded staged one goes.
    assert store_files(dirs2) == record_files(committed) | record_files(second)
    assert not record_files(first) & store_files(dirs2)
    assert torch.equal(get(store, "u00000.param"), latest)
    store.commit(3, {})
    store.wait_for_deletions()
    assert store_files(dirs2) == record_files(second)
    put(store, "u00001.param", data(100, seed=4), version=4)
    put(store, "u00001.param", data(100, seed=5), version=5)
    store.discard_staged()
    assert store_files(dirs2) == record_files(second)


def test_reopen_after_crash_removes_leftovers(dirs2: list[Path]) -> None:
    s = open_store(dirs2)
    v1 = {f"u{i:05d}.master": data(6000 + 1000 * i, seed=i) for i in range(3)}
    committed = set()
    for name, t in v1.items():
        committed |= record_files(put(s, name, t, version=1))
    s.commit(1, {"data_step": 7})
    # The next step stages new versions, a new record and a gradient log, then the process dies (no commit,
    # no close: the files are simply left behind).
    for name in v1:
        put(s, name, data(6000, seed=99), version=2)
    put(s, "u00009.param", data(50, seed=5), version=2)
    put(s, "u00000.grad", data(6000, seed=6), version=2, transient=True)
    (dirs2[1] / STORE_DIR / "u00001.master.v00000002.s9").write_bytes(b"half-written")
    assert store_files(dirs2) > committed
    crash(s)
    again = open_store(dirs2)
    try:
        assert store_files(dirs2) == committed
        assert again.committed_step == 1 and again.manifest.meta == {"data_step": 7}
        assert again.names() == sorted(v1)
        for name, t in v1.items():
            assert again.record(name).version == 1
            assert torch.equal(get(again, name), t)
    finally:
        again.close()


def test_reopen_of_a_store_that_never_committed_is_empty(dirs2: list[Path]) -> None:
    s = open_store(dirs2)
    put(s, "u00000.master", data(20_000, seed=1), version=0)
    s.close()
    again = open_store(dirs2)
    try:
        assert again.committed_step == -1 and again.names() == [] and store_files(dirs2) == set()
    finally:
        again.close()


def test_transient_records_never_reach_a_committed_manifest(store: SSDTensorStore, dirs2: list[Path]) -> None:
    g = data(20_000, seed=1)
    grad = put(store, "u00000.grad", g, version=1, transient=True)
    param = put(store, "u00000.param", data(100, seed=2), version=1)
    assert grad.transient and not param.transient
    # Readable while the step runs (the optimizer reads the logged gradient)...
    assert store.record("u00000.grad").transient
    assert torch.equal(get(store, "u00000.grad"), g)
    assert record_files(grad) <= store_files(dirs2)
    store.commit(1, {})
    store.wait_for_deletions()
    # ...but never published, and its files are gone after the commit.
    assert [r["name"] for r in manifest_on_disk(dirs2)["records"]] == ["u00000.param"]
    assert not store.has("u00000.grad")
    assert not record_files(grad) & store_files(dirs2)
    assert store_files(dirs2) == record_files(param)


def test_commit_with_nothing_staged_advances_the_step(store: SSDTensorStore) -> None:
    put(store, "u00000.param", data(100, seed=2), version=1)
    store.commit(1, {})
    store.commit(2, {"note": "empty"})
    assert store.committed_step == 2 and store.names() == ["u00000.param"]


# ---------------------------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("stripe", [0, 1])
def test_corrupted_byte_raises_checksum_error_naming_the_record(dirs2: list[Path], stripe: int) -> None:
    s = open_store(dirs2)
    try:
        t = data(30_000, seed=1)
        rec = put(s, "u00003.exp_avg_sq", t, version=4)
        s.commit(4, {})
        path = stripe_path(dirs2, rec, stripe)
        raw = bytearray(path.read_bytes())
        raw[CHUNK + 123] ^= 0x01  # one bit, in the second chunk of the stripe
        path.write_bytes(bytes(raw))
        with pytest.raises(ChecksumError, match=r"u00003\.exp_avg_sq v4: chunk") as info:
            get(s, "u00003.exp_avg_sq")
        assert f"bytes {rec.stripes[stripe].offset + CHUNK}.." in str(info.value)
        # Also detected by a fresh store (the corruption is on disk, not in a cache).
        s.close()
        again = open_store(dirs2)
        with pytest.raises(ChecksumError, match=r"u00003\.exp_avg_sq"):
            get(again, "u00003.exp_avg_sq")
        again.close()
        # With checksums off the same read goes through (and returns the corrupted bytes).
        unchecked = open_store(dirs2, verify_checksums=False)
        assert not torch.equal(get(unchecked, "u00003.exp_avg_sq"), t)
        unchecked.close()
    finally:
        s.close()


def test_corruption_in_the_padding_is_harmless(store: SSDTensorStore) -> None:
    t = data(1000, seed=1)  # 4000 logical bytes in a 4096-byte block
    rec = put(store, "u00000.param", t, version=1)
    path = stripe_path(store_dirs(store), rec, 0)
    raw = bytearray(path.read_bytes())
    raw[4050] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert torch.equal(get(store, "u00000.param"), t)


def test_truncated_committed_file_fails_at_open(dirs2: list[Path]) -> None:
    s = open_store(dirs2)
    rec = put(s, "u00000.master", data(30_000, seed=1), version=1)
    s.commit(1, {})
    s.close()
    path = stripe_path(dirs2, rec, 1)
    os.truncate(path, path.stat().st_size - ALIGN)
    with pytest.raises(ManifestError, match=r"u00000\.master.*missing or short"):
        open_store(dirs2)
    path.unlink()
    with pytest.raises(ManifestError, match=r"u00000\.master"):
        open_store(dirs2)


def test_truncated_staged_file_fails_at_read(store: SSDTensorStore) -> None:
    rec = put(store, "u00000.master", data(30_000, seed=1), version=1)
    path = stripe_path(store_dirs(store), rec, 0)
    os.truncate(path, ALIGN)
    with pytest.raises(StoreError, match=r"u00000\.master"):
        get(store, "u00000.master")


def test_missing_staged_file_fails_at_read(store: SSDTensorStore) -> None:
    rec = put(store, "u00000.master", data(30_000, seed=1), version=1)
    stripe_path(store_dirs(store), rec, 1).unlink()
    with pytest.raises(StorePathError, match="missing"):
        get(store, "u00000.master")


@pytest.mark.parametrize("reopen_with", [1, 3])
def test_manifest_from_a_different_number_of_dirs(tmp_path: Path, reopen_with: int) -> None:
    dirs = make_dirs(tmp_path, 3)
    s = open_store(dirs[:2])
    put(s, "u00000.master", data(30_000, seed=1), version=1)
    s.commit(1, {})
    s.close()
    with pytest.raises(ManifestError, match="2 SSD directories"):
        open_store(dirs[:reopen_with])


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"format": 99, "num_dirs": 2, "step": 1, "records": []}',
        '{"format": 1, "num_dirs": 2, "records": []}',
        '{"format": 1, "num_dirs": 2, "step": 1, "records": [{"name": "x"}]}',
    ],
)
def test_unreadable_manifest(dirs2: list[Path], content: str) -> None:
    open_store(dirs2).close()
    (dirs2[0] / STORE_DIR / MANIFEST).write_text(content)
    with pytest.raises(ManifestError, match=MANIFEST):
        open_store(dirs2)


# ---------------------------------------------------------------------------------------------- paths


def test_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    with pytest.raises(StorePathError, match="not a directory"):
        SSDTensorStore([tmp_path / "ok", f])


def test_path_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StorePathError, match="not writable") as info:
        SSDTensorStore([f / "sub" / "ssd"])
    assert str(f / "sub" / "ssd") in str(info.value)


def test_path_on_a_read_only_filesystem(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():  # pragma: no cover
        pytest.skip("no procfs")
    with pytest.raises(StorePathError, match="/proc/self/ssd"):
        SSDTensorStore(["/proc/self/ssd"])


def test_no_paths_and_bad_chunk_size(tmp_path: Path) -> None:
    with pytest.raises(StorePathError, match=r"ssd\.paths"):
        SSDTensorStore([])
    with pytest.raises(ValueError, match="chunk_bytes"):
        SSDTensorStore([tmp_path], chunk_bytes=5000)


def test_missing_directories_are_created(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    s = SSDTensorStore([deep])
    s.close()
    assert (deep / STORE_DIR).is_dir()
    # The write and O_DIRECT probes leave nothing behind.
    assert list(deep.iterdir()) == [deep / STORE_DIR]
    assert [p.name for p in (deep / STORE_DIR).iterdir()] == [".lock"]


# ---------------------------------------------------------------------------------------------- O_DIRECT


def test_o_direct_probe_on_the_root_filesystem(tmp_path: Path) -> None:
    kind = fs_type(tmp_path)
    if kind not in {"ext4", "xfs", "btrfs"}:
        pytest.skip(f"{tmp_path} is on {kind}, whose O_DIRECT support varies")
    assert store_mod._supports_o_direct(tmp_path) is True
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


def test_o_direct_probe_on_tmpfs() -> None:
    if fs_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    d = Path(tempfile.mkdtemp(prefix="store-probe-", dir="/dev/shm"))
    try:
        # tmpfs accepts O_DIRECT since Linux 6.6; older kernels refuse it with EINVAL.
        assert store_mod._supports_o_direct(d) is (kernel_version() >= (6, 6))
        assert list(d.iterdir()) == []
    finally:
        shutil.rmtree(d)


def test_o_direct_is_used_where_supported(store: SSDTensorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    if not all(store.direct):
        pytest.skip("this filesystem refuses O_DIRECT")
    flags_seen: list[int] = []
    real_open = os.open

    def spy(path: object, flags: int, *args: object) -> int:
        if "u00000.param" in str(path):
            flags_seen.append(flags)
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod.os, "open", spy)
    t = data(20_000, seed=1)
    put(store, "u00000.param", t, version=1)
    assert torch.equal(get(store, "u00000.param"), t)
    assert flags_seen and all(f & os.O_DIRECT for f in flags_seen)


def test_buffered_fallback_when_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_mod, "_supports_o_direct", lambda d: False)
    dirs = make_dirs(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="fuyou_ray.store"):
        s = open_store(dirs, direct_io=True)
    try:
        assert s.direct == [False, False]
        assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == 2
        # Buffered I/O needs no alignment: plain bytearrays at any address work.
        t = data(20_001, seed=1)
        nbytes = t.numel() * 4
        src = bytearray(align_up(nbytes) + 1)
        src[1 : 1 + nbytes] = t.numpy().tobytes()
        s.write_from("u00000.master", memoryview(src)[1:], dtype="float32", numel=t.numel(), version=1)
        s.commit(1, {})
        dest = bytearray(align_up(nbytes) + 3)
        s.read_into("u00000.master", memoryview(dest)[3:])
        assert bytes(dest[3 : 3 + nbytes]) == t.numpy().tobytes()
    finally:
        s.close()


def test_direct_io_off_skips_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(d: Path) -> bool:
        raise AssertionError("probed although direct_io is off")

    monkeypatch.setattr(store_mod, "_supports_o_direct", boom)
    s = open_store(make_dirs(tmp_path, 1), direct_io=False)
    try:
        assert s.direct == [False]
        t = data(3000, seed=2)
        put(s, "u00000.param", t, version=0)
        assert torch.equal(get(s, "u00000.param"), t)
    finally:
        s.close()


def test_background_unlink_runs_off_the_commit_and_completes(dirs2: list[Path]) -> None:
    s = open_store(dirs2, background_unlink=True)
    try:
        old = put(s, "u00000.master", data(9000, seed=1), version=1)
        s.commit(1, {})
        new = put(s, "u00000.master", data(9000, seed=2), version=2)
        s.commit(2, {})
        s.wait_for_deletions()
        assert not record_files(old) & store_files(dirs2)
        assert store_files(dirs2) == record_files(new)
    finally:
        s.close()


def test_newest_is_the_published_version_once_the_committed_one_is_superseded(
    store: SSDTensorStore,
) -> None:
    """A run stopped between a unit's publication and the step's commit: the unit's committed state is
    deleted (the replay skips the unit), so inspection reads the published version (`newest`)."""
    old, new = torch.full((1000,), 1.0), torch.full((1000,), 2.0)
    put(store, "u00000.master", old, 0)
    store.commit(0, {})
    put(store, "u00000.master", new, 1)
    store.publish(1, ["u00000.master"], {})
    assert store.record("u00000.master").version == 0  # what the step in progress reads
    rec = store.newest("u00000.master")
    assert rec.version == 1
    buf = aligned_buffer(4096)
    store.read_into("u00000.master", memoryview(buf), rec)
    assert torch.equal(torch.frombuffer(buf, dtype=torch.float32)[:1000], new)
    with pytest.raises(RecordNotFoundError):
        store.newest("u00009.master")
