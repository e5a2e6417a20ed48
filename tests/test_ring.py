"""The shared-memory ring: geometry, segment files, shared views, slot capacity, cleanup, pinning."""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fuyou_ray.ring as ring_mod
from fuyou_ray.ring import (
    DTYPES,
    PREFIX,
    SHM_DIR,
    Ring,
    RingError,
    RingMapping,
    RingSpec,
    SlotHandle,
    dtype_name,
    make_spec,
    remove_stale_segments,
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm")


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(make_spec(5000, 5))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three 8 KiB slots per segment, so a handful of slots spans several segment files."""
    monkeypatch.setattr(ring_mod, "MAX_SEGMENT_BYTES", 3 * 8192)


def segment_paths(spec: RingSpec) -> list[Path]:
    return [SHM_DIR / name for name, _ in spec.segments]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("the pid was reused at once")  # pragma: no cover


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("asked", "slot_bytes"), [(1, 4096), (4096, 4096), (4097, 8192), (5000, 8192), (1 << 20, 1 << 20)]
)
def test_make_spec_rounds_slots_to_whole_pages(asked: int, slot_bytes: int) -> None:
    spec = make_spec(asked, 3)
    assert spec.slot_bytes == slot_bytes
    assert spec.num_slots == 3 and spec.total_bytes == 3 * slot_bytes
    assert spec.name.startswith(f"{PREFIX}-{os.getpid()}-")
    assert make_spec(asked, 3).name != spec.name  # each ring gets its own files


def test_ring_creates_files_of_the_right_total_size(ring: Ring) -> None:
    spec = ring.spec
    paths = segment_paths(spec)
    assert len(paths) == 1
    assert all(p.is_file() for p in paths)
    assert sum(p.stat().st_size for p in paths) == spec.total_bytes == 5 * 8192


def test_segments_split_at_the_segment_limit(small_segments: None) -> None:
    spec = make_spec(8192, 8)
    assert spec.slots_per_segment == 3
    assert [n for _, n in spec.segments] == [3 * 8192, 3 * 8192, 2 * 8192]
    with Ring(spec) as r:
        paths = segment_paths(spec)
        assert [p.stat().st_size for p in paths] == [3 * 8192, 3 * 8192, 2 * 8192]
        assert sum(p.stat().st_size for p in paths) == spec.total_bytes
        assert r.spec is spec
    assert not any(p.exists() for p in paths)


def test_slots_are_aligned_and_do_not_overlap(small_segments: None) -> None:
    spec = make_spec(5000, 8)
    sizes = dict(spec.segments)
    intervals: dict[str, list[tuple[int, int]]] = {}
    for i in range(spec.num_slots):
        h = spec.slot(i)
        assert h.slot == i and h.capacity == spec.slot_bytes
        assert h.offset % 4096 == 0 and h.capacity % 4096 == 0
        assert h.offset + h.capacity <= sizes[h.segment]
        intervals.setdefault(h.segment, []).append((h.offset, h.offset + h.capacity))
    assert set(intervals) == set(sizes)
    for spans in intervals.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    with pytest.raises(RingError):
        spec.slot(spec.num_slots)
    with pytest.raises(RingError):
        spec.slot(-1)


def test_ring_refuses_more_than_shm_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring_mod, "_shm_free_bytes", lambda: 4096)
    spec = make_spec(8192, 4)
    with pytest.raises(RingError, match=r"/dev/shm has .* free"):
        Ring(spec)
    assert not any(p.exists() for p in segment_paths(spec))


# ---------------------------------------------------------------------------------------------- mappings


def test_tensor_views_share_memory_across_mappings(ring: Ring) -> None:
    spec = ring.spec
    writer, reader = RingMapping(spec), RingMapping(spec)
    try:
        h = spec.slot(2).carrying("u00001.param", "float32", 1000, version=3)
        src = torch.arange(1000, dtype=torch.float32) * 0.5
        writer.tensor(h).copy_(src)
        view = reader.tensor(h)
        assert view.dtype == torch.float32 and view.shape == (1000,)
        assert torch.equal(view, src)
        # And back the other way, through a bf16 handle on the same slot.
        hb = spec.slot(2).carrying("u00001.param", "bfloat16", 3000, version=4)
        reader.tensor(hb).fill_(1.25)
        assert torch.equal(writer.tensor(hb), torch.full((3000,), 1.25, dtype=torch.bfloat16))
        # Neighbouring slots were not touched.
        for other in (1, 3):
            assert int(reader.raw(spec.slot(other)).count_nonzero()) == 0
        # Views are page-aligned (O_DIRECT can read straight into them) and raw covers the capacity.
        raw = reader.raw(h)
        assert raw.numel() == spec.slot_bytes and raw.data_ptr() % 4096 == 0
        mv = writer.memoryview(h)
        assert mv.nbytes == spec.slot_bytes
        assert (
            bytes(mv[:4])
            == torch.tensor([1.25, 1.25], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
        )
        mv[:4] = b"\0\0\0\0"
        assert float(raw[:4].view(torch.bfloat16)[0]) == 0.0
        del view, raw, mv
    finally:
        writer.close()
        reader.close()


def test_views_are_shared_with_another_process(ring: Ring) -> None:
    spec = ring.spec
    h = spec.slot(4).carrying("u00000.grad", "uint8", 16, version=1)
    seg = SHM_DIR / h.segment
    code = (
        "import mmap, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "mm = mmap.mmap(fd, os.fstat(fd).st_size)\n"
        "off = int(sys.argv[2])\n"
        "mm[off:off + 16] = bytes(range(16))\n"
        "mm.close()\n"
    )
    mapping = RingMapping(spec)
    try:
        view = mapping.tensor(h)  # mapped before the other process writes
        subprocess.run([sys.executable, "-c", code, str(seg), str(h.offset)], check=True)
        assert view.tolist() == list(range(16))
        del view
    finally:
        mapping.close()


def test_mapping_a_removed_ring_is_a_ring_error() -> None:
    spec = make_spec(4096, 2)
    Ring(spec).close()
    mapping = RingMapping(spec)
    with pytest.raises(RingError, match="gone"):
        mapping.tensor(spec.slot(0))
    mapping.close()


# ---------------------------------------------------------------------------------------------- handles


def test_carrying_refuses_a_payload_bigger_than_the_slot() -> None:
    spec = make_spec(8192, 2)
    slot = spec.slot(1)
    ok = slot.carrying("t", "float32", 2048, version=0)
    assert ok.nbytes == 8192 and ok.numel == 2048 and ok.tensor == "t" and ok.version == 0
    assert ok.slot == 1 and ok.segment == slot.segment and ok.offset == slot.offset
    assert slot.tensor == "" and slot.numel == 0  # handles are immutable; carrying makes a new one
    with pytest.raises(RingError, match="does not fit"):
        slot.carrying("t", "float32", 2049, version=0)
    assert slot.carrying("t", "bfloat16", 4096, version=0).nbytes == 8192
    with pytest.raises(RingError, match="t2"):
        slot.carrying("t2", "bfloat16", 4097, version=0)


def test_handles_are_small_and_picklable() -> None:
    h = make_spec(1 << 20, 4).slot(3).carrying("u00042.exp_avg_sq", "float32", 1 << 18, version=17)
    blob = pickle.dumps(h)
    assert len(blob) < 512
    assert pickle.loads(blob) == h
    assert isinstance(h, SlotHandle)


def test_dtype_names_round_trip() -> None:
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    with pytest.raises(ValueError):
        dtype_name(torch.complex64)


# ---------------------------------------------------------------------------------------------- cleanup


def test_close_removes_the_files_and_is_idempotent(small_segments: None) -> None:
    r = Ring(make_spec(8192, 7))
    paths = segment_paths(r.spec)
    assert len(paths) == 3 and all(p.exists() for p in paths)
    r.close()
    assert not any(p.exists() for p in paths)
    r.close()


def test_a_closed_ring_is_not_kept_alive_by_its_exit_hook() -> None:
    r = Ring(make_spec(4096, 1))
    ref = weakref.ref(r)
    r.close()
    del r
    gc.collect()
    assert ref() is None


def test_remove_stale_segments_removes_dead_and_keeps_live() -> None:
    pid = dead_pid()
    stale = SHM_DIR / f"{PREFIX}-{pid}-deadbeef-0"
    stale_too = SHM_DIR / f"{PREFIX}-{pid}-deadbeef-1"
    odd = SHM_DIR / f"{PREFIX}-notapid-x-0"
    live = Ring(make_spec(4096, 2))
    try:
        for p in (stale, stale_too, odd):
            p.write_bytes(b"\0" * 4096)
        removed = remove_stale_segments()
        assert {stale.name, stale_too.name} <= set(removed)
        assert not stale.exists() and not stale_too.exists()
        assert all(p.exists() for p in segment_paths(live.spec))
        assert odd.exists()  # a name it cannot parse is not its business
        assert not any(name.startswith(live.spec.name) for name in removed)
    finally:
        live.close()
        for p in (stale, stale_too, odd):
            p.unlink(missing_ok=True)


def test_pid_alive() -> None:
    assert ring_mod._pid_alive(os.getpid())
    assert ring_mod._pid_alive(1)  # init: alive (EPERM counts as alive too)
    assert not ring_mod._pid_alive(dead_pid())


# ---------------------------------------------------------------------------------------------- pinning


def test_pin_is_a_no_op_without_cuda(ring: Ring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_cudart() -> None:
        raise AssertionError("cudart used without CUDA")

    monkeypatch.setattr(torch.cuda, "cudart", no_cudart)
    mapping = RingMapping(ring.spec)
    mapping.pin()
    assert mapping._pinned == []
    mapping.close()


class FakeCudart:
    """Records cudaHostRegister/Unregister calls and checks the memory is still mapped at unregister."""

    def __init__(self, mapping: RingMapping, fail_with: int = 0) -> None:
        self.mapping = mapping
        self.fail_with = fail_with
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.registered.append((ptr, nbytes))
        return self.fail_with

    def cudaHostUnregister(self, ptr: int) -> int:
        assert self.mapping._maps and not any(mm.closed for mm in self.mapping._maps.values()), (
            "unregistered after unmapping"
        )
        self.unregistered.append(ptr)
        return 0


def test_pin_registers_every_segment_and_unpins_before_unmapping(
    small_segments: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ring(make_spec(8192, 7)) as r:
        mapping = RingMapping(r.spec)
        fake = FakeCudart(mapping)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
        mapping.pin()
        assert [n for _, n in fake.registered] == [n for _, n in r.spec.segments]
        assert all(ptr % 4096 == 0 for ptr, _ in fake.registered)
        mapping.close()
        assert fake.unregistered == [ptr for ptr, _ in fake.registered]
        assert mapping._maps == {}


def test_pin_failure_is_a_ring_error(ring: Ring, monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = RingMapping(ring.spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(mapping, fail_with=712))
    with pytest.raises(RingError, match="712"):
        mapping.pin()
    mapping.close()
