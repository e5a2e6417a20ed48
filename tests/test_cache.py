"""The host-memory cache (fuyou_ray/cache.py, fuyou_ray/durable.py).

- the plan fills it from cpu_mem beyond the ring: optimizer state, then the gradient log, then params;
- the store semantics: reads from /dev/shm, new versions aside, superseded ones dropped when the SSD store
  would drop them; a restarted SSD actor finds the cache again; a lost cache (new driver) brings a
  write-back store back to its last durable snapshot; a flush makes the SSD whole again;
- runs with the cache end bit-identical to runs without it (write-through and write-back, with and
  without clipping), with the SSD bytes per step cut to what the plan says;
- kill -9 of the SSD I/O actor and of optimizer actors mid-step (Ray), and of the driver (write-back:
  the resumed run goes back to the last flush), still end bit-identical, with no /dev/shm file left.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fuyou_ray import durable
from fuyou_ray.cache import CacheArea, CachedStore, CacheError, CacheSpec, HostCache
from fuyou_ray.config import ConfigError, RunConfig, Size, config_from_dict
from fuyou_ray.costmodel import working_bytes
from fuyou_ray.driver import train
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.plan import Plan, cache_bytes, make_plan
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import SHM_DIR
from fuyou_ray.store import MANIFEST, STORE_DIR, RecordInMemoryError, SSDTensorStore, align_up
from tests.conftest import REPO, fuyou_shm_segments, tiny_config
from tests.faults import fuyou_actor_processes, wait_until
from tests.test_faults import (
    KINDS,
    Reference,
    assert_identical,
    assert_no_leaks,
    fault_config,
    losses,
    report,
)
from tests.test_faults import run_with_faults as run_with_kills


def with_runtime(cfg: RunConfig, **runtime: Any) -> RunConfig:
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, **runtime))


def with_cpu_mem(cfg: RunConfig, cpu_mem: int) -> RunConfig:
    return dataclasses.replace(cfg, budgets=dataclasses.replace(cfg.budgets, cpu_mem=Size(cpu_mem)))


# ---------------------------------------------------------------------------------------------- the plan


def test_plan_caches_state_then_the_gradient_log_then_params(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, runtime={"cpu_cache": "auto"})  # exact clipping: there is a gradient log
    spec = ModelSpec(cfg.model)
    off = make_plan(with_runtime(cfg, cpu_cache="off"), spec)
    assert (off.cpu_cached_state, off.cpu_cached_params, off.grad_log_tier) == ((), (), "ssd")
    floor = off.num_slots * off.slot_bytes + working_bytes(spec)
    assert off.cpu_bytes_needed == floor
    units = tuple(range(spec.num_units))
    state = cache_bytes(spec, dataclasses.replace(off, cpu_cached_state=units))
    grads = cache_bytes(spec, dataclasses.replace(off, grad_log="cpu"))
    params = cache_bytes(spec, dataclasses.replace(off, cpu_cached_params=units))
    # 12 B/param plus the units in flight (here: all of them, the ring has room for every unit's update);
    # params twice (the old version stays until the commit); the gradient log 4 B/param.
    assert state == 2 * sum(3 * align_up(u.numel * 4) for u in spec.units)
    assert params == 2 * sum(align_up(u.numel * 4) for u in spec.units)  # fp32 params on the CPU fallback
    assert grads == sum(align_up(u.numel * 4) for u in spec.units)

    def planned(extra: int) -> Plan:
        plan = make_plan(with_cpu_mem(cfg, floor + extra), spec)
        assert plan.cpu_bytes_needed == floor + cache_bytes(spec, plan) <= floor + extra
        return plan

    only_state = planned(state)
    assert (only_state.cpu_cached_state, only_state.cpu_cached_params) == (units, ())
    assert only_state.grad_log_tier == "ssd"
    with_grads = planned(state + grads)
    assert with_grads.grad_log_tier == "cpu" and not with_grads.cpu_cached_params
    everything = planned(state + grads + params)
    assert (everything.cpu_cached_state, everything.cpu_cached_params) == (units, units)
    # A budget short of the whole state caches the units that fit, the last ones first.
    partial = planned(state // 2)
    assert 0 < len(partial.cpu_cached_state) < spec.num_units
    assert partial.cpu_cached_state == units[-len(partial.cpu_cached_state) :]
    # Write-back writes the cached records only at flushes, but keeps the previous flush's snapshot until
    # the new one is complete: the state twice on SSD at a flush, and nothing else. Write-through needs
    # the SSD space of no cache, less the gradient log that stays in memory.
    state_on_ssd = sum(align_up(u.numel * 4) + 3 * align_up(u.numel * 4) for u in spec.units)
    assert everything.ssd_bytes_needed == 2 * state_on_ssd
    through = make_plan(
        with_runtime(with_cpu_mem(cfg, everything.cpu_bytes_needed), cache_write_through=True), spec
    )
    assert through.cache_write_through and through.cpu_cached_state == units
    assert through.ssd_bytes_needed == off.ssd_bytes_needed - grads
    # No clipping: no gradient log to cache.
    free = make_plan(
        dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, max_grad_norm=0.0)), spec
    )
    assert free.grad_log_tier == "none" and free.cpu_cached_params == units


def test_cache_knobs_are_validated(tmp_path: Path) -> None:
    tree = tiny_config(tmp_path).to_dict()
    # YAML reads a bare `off` as False: it still means "off".
    off = yaml.safe_load("runtime: {cpu_cache: off}")
    assert off["runtime"]["cpu_cache"] is False
    assert (
        config_from_dict({**tree, "runtime": {**tree["runtime"], **off["runtime"]}}).runtime.cpu_cache
        == "off"
    )
    for key, value, message in (
        ("cpu_cache", "sometimes", "runtime.cpu_cache"),
        ("cache_flush_every", -1, "runtime.cache_flush_every"),
        ("cache_write_through", "yes", "runtime.cache_write_through"),
    ):
        bad = {**tree, "runtime": {**tree["runtime"], key: value}}
        with pytest.raises(ConfigError, match=message):
            config_from_dict(bad)


def test_cache_area_refuses_more_than_dev_shm_holds() -> None:
    with pytest.raises(CacheError, match=r"/dev/shm has .* free but the planned host cache needs"):
        CacheArea("fuyou-ring-0-test-cache", 1 << 60)


# ---------------------------------------------------------------------------------------------- the store

NUMEL = 3000  # not a multiple of 1024: records are padded to 4 KiB
UNITS = 2


def unit_bytes(unit: int, version: int, kind: RecordKind) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * version + 10 * unit + list(RecordKind).index(kind))
    return torch.randn(NUMEL, generator=gen)


def buffer_of(t: torch.Tensor) -> memoryview:
    buf = bytearray(align_up(t.numel() * 4))
    torch.frombuffer(buf, dtype=torch.float32)[: t.numel()].copy_(t)
    return memoryview(buf)


def read_back(store: Any, name: str) -> torch.Tensor:
    buf = bytearray(align_up(NUMEL * 4))
    store.read_into(name, memoryview(buf))
    return torch.frombuffer(buf, dtype=torch.float32)[:NUMEL].clone()


def initialize(store: CachedStore) -> None:
    """Version 0 of every record, written straight to SSD and committed (as SSDIOActor.initialize does)."""
    for unit in range(UNITS):
        for kind in KINDS:
            data = buffer_of(unit_bytes(unit, 0, kind))
            store.ssd.write_from(record_name(unit, kind), data, dtype="float32", numel=NUMEL, version=0)
    store.ssd.commit(0, {"durable_step": 0})


def step(store: CachedStore, version: int) -> None:
    """What a step does to the store: new versions of every unit's four records, published, committed."""
    for unit in range(UNITS):
        names = []
        for kind in KINDS:
            name = record_name(unit, kind)
            store.write_from(
                name,
                buffer_of(unit_bytes(unit, version, kind)),
                dtype="float32",
                numel=NUMEL,
                version=version,
            )
            names.append(name)
        store.publish(
            version, names, {"step_key": str(version)}, keep_previous=[record_name(unit, RecordKind.PARAM)]
        )
    store.commit(version, {"data_step": version})


def expect(store: Any, version: int) -> None:
    for unit in range(UNITS):
        for kind in KINDS:
            assert torch.equal(read_back(store, record_name(unit, kind)), unit_bytes(unit, version, kind))


def open_cached(ssd: Path, prefix: str, *, write_through: bool = False) -> CachedStore:
    disk = SSDTensorStore([ssd], direct_io=False, background_unlink=False)
    units = tuple(range(UNITS))
    spec = CacheSpec(prefix, state_units=units, param_units=units, write_through=write_through)
    return CachedStore(disk, spec, UNITS)


def cache_of(store: CachedStore) -> HostCache:
    assert store.cache is not None, "the store has no host cache"
    return store.cache


def close(store: CachedStore) -> None:
    store.close()
    store.ssd.close()


def manifest(ssd: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ssd / STORE_DIR / MANIFEST).read_text())
    return data


@pytest.fixture
def prefix() -> Any:
    name = f"fuyou-ring-{os.getpid()}-test{time.monotonic_ns() % 10**8}-cache"
    yield name
    for path in SHM_DIR.glob(f"{name}-*"):
        path.unlink()


def test_write_back_lives_in_dev_shm_survives_restarts_and_falls_back_to_the_last_flush(
    tmp_path: Path, prefix: str
) -> None:
    ssd = tmp_path / "ssd"
    store = open_cached(ssd, prefix)
    initialize(store)
    assert durable.latest([ssd]) is None
    step(store, 1)  # its first publication snapshots step 0: the first in-memory version is no only copy
    first = durable.latest([ssd])
    assert first is not None and first.step == 0
    written = store.ssd.bytes_written
    step(store, 2)
    assert store.ssd.bytes_written == written, "a write-back step wrote to SSD"
    on_disk = manifest(ssd)
    assert on_disk["step"] == 2 and on_disk["meta"]["durable_step"] == 0
    assert all(r["in_memory"] for r in on_disk["records"])
    # On SSD: no record of the store's own (all in memory), but the step-0 snapshot, each file counted once
    # though the snapshot hard-links what the store held then.
    snapshot_files = [f for f in durable.roots([ssd])[0].rglob("*") if f.is_file()]
    assert store.ssd.stored_bytes() == 0
    assert durable.bytes_on_ssd(store.ssd.dirs) >= sum(f.stat().st_size for f in snapshot_files) > 0
    # Only the versions the store still needs are in /dev/shm: version 2 of every record.
    assert set(cache_of(store).versions()) == {(record_name(u, k), 2) for u in range(UNITS) for k in KINDS}
    read = store.ssd.bytes_read
    expect(store, 2)
    assert store.ssd.bytes_read == read and cache_of(store).bytes_read > 0
    # An SSD actor restart: the cache is still there.
    close(store)
    store = open_cached(ssd, prefix)
    assert store.restored is None and store.committed_step == 2
    expect(store, 2)
    # The SSD store alone (what tools open) refuses to read what lives in memory, naming the fix.
    with pytest.raises(RecordInMemoryError, match="fuyou-ray train"):
        store.ssd.read_into(record_name(0, RecordKind.MASTER), memoryview(bytearray(1 << 16)))
    # A new driver: the cache is gone, the store goes back to the last flush, whole on SSD.
    close(store)
    for path in SHM_DIR.glob(f"{prefix}-*"):
        path.unlink()
    store = open_cached(ssd, prefix)
    assert store.restored is not None and store.restored.step == 0 and store.committed_step == 0
    expect(store, 0)
    # Training on, then a flush: step 2 is durable and the previous snapshot is gone.
    step(store, 1)
    step(store, 2)
    assert store.flush() == 2
    assert manifest(ssd)["meta"]["durable_step"] == 2
    newest = durable.latest([ssd])
    assert newest is not None and [d.name for d in durable.roots([ssd])[0].iterdir()] == [newest.name]
    close(store)
    for path in SHM_DIR.glob(f"{prefix}-*"):
        path.unlink()
    check = SSDTensorStore([ssd], direct_io=False)
    try:
        expect(check, 2)
    finally:
        check.close()


def test_cache_keeps_what_the_store_keeps(tmp_path: Path, prefix: str) -> None:
    """Superseded optimizer state goes at its unit's publication, old params at the commit (a replay of
    the step reads them), staged versions of an abandoned attempt at the rollback."""
    store = open_cached(tmp_path / "ssd", prefix)
    initialize(store)
    step(store, 1)
    master, param = record_name(0, RecordKind.MASTER), record_name(0, RecordKind.PARAM)

    def write(kind: RecordKind, version: int, data_version: int | None = None) -> None:
        data = buffer_of(unit_bytes(0, version if data_version is None else data_version, kind))
        store.write_from(record_name(0, kind), data, dtype="float32", numel=NUMEL, version=version)

    write(RecordKind.MASTER, 2)
    assert (master, 2) in cache_of(store).versions()
    store.discard_staged()
    assert (master, 2) not in cache_of(store).versions()
    for kind in KINDS:
        write(kind, 2)
    store.publish(2, [record_name(0, k) for k in KINDS], {"step_key": "2"}, keep_previous=[param])
    held = set(cache_of(store).versions())
    assert (master, 1) not in held and (master, 2) in held
    assert {(param, 1), (param, 2)} <= held
    # A repeated write of a published version changes nothing, as on SSD.
    before = cache_of(store).bytes_written
    write(RecordKind.MASTER, 2, data_version=9)
    assert cache_of(store).bytes_written == before
    # Reads see the committed version until the commit.
    assert torch.equal(read_back(store, param), unit_bytes(0, 1, RecordKind.PARAM))
    store.commit(2, {})
    assert (param, 1) not in set(cache_of(store).versions())
    assert torch.equal(read_back(store, param), unit_bytes(0, 2, RecordKind.PARAM))
    assert torch.equal(read_back(store, master), unit_bytes(0, 2, RecordKind.MASTER))
    close(store)


def test_retired_versions_lend_their_pages_to_the_next_write(prefix: str) -> None:
    """keep_only parks one retired version per record as `.free`; the record's next write reuses those
    pages (same inode: no fresh tmpfs allocation), whatever its size, and every version reads back whole."""
    cache = HostCache(prefix, threads=2)
    try:
        data = {v: torch.full((3 * 2**20,), float(v)) for v in (1, 2, 3)}
        cache.write("u00000.master", 1, buffer_of(data[1]))
        cache.write("u00000.master", 2, buffer_of(data[2]))
        cache.write("u00000.exp_avg", 1, buffer_of(data[1]))
        assert cache.keep_only({("u00000.master", 2)}) == 2
        assert set(cache.versions()) == {("u00000.master", 2)}
        parked = cache.free_path("u00000.master")
        inode = parked.stat().st_ino
        assert cache.free_path("u00000.exp_avg").exists() and cache.free_bytes() == 2 * data[1].numel() * 4
        cache.write("u00000.master", 3, buffer_of(data[3][: 2**20]))  # smaller: truncated to size
        assert not parked.exists() and cache.path("u00000.master", 3).stat().st_ino == inode

        def read(version: int, numel: int) -> torch.Tensor:
            buf = bytearray(numel * 4)
            assert cache.read("u00000.master", version, memoryview(buf))
            return torch.frombuffer(buf, dtype=torch.float32)

        assert torch.equal(read(3, 2**20), data[3][: 2**20])
        assert cache.path("u00000.master", 3).stat().st_size == 2**20 * 4
        assert torch.equal(read(2, 3 * 2**20), data[2])
        cache.remove_all()
        assert not list(SHM_DIR.glob(f"{prefix}-*"))
    finally:
        cache.close()


def test_writes_into_recycled_pages_reuse_their_kept_mapping(prefix: str) -> None:
    """A write maps its file once; the next write into the same pages (the file's `.free` reincarnation)
    copies through that mapping; mappings of deleted files are dropped, and every version reads back."""
    cache = HostCache(prefix, threads=2)
    name = "u00000.master"

    def mapping_of(version: int) -> object:
        st = cache.path(name, version).stat()
        return cache._maps[(st.st_dev, st.st_ino)]

    def read(version: int) -> torch.Tensor:
        buf = bytearray(2**22)
        assert cache.read(name, version, memoryview(buf))
        return torch.frombuffer(buf, dtype=torch.float32)

    data = {v: torch.full((2**20,), float(v)) for v in range(1, 5)}
    try:
        cache.write(name, 1, buffer_of(data[1]))
        first = mapping_of(1)
        cache.write(name, 2, buffer_of(data[2]))
        assert cache.kept_mappings == 2
        cache.keep_only({(name, 2)})  # v1 becomes the .free file: its mapping stays
        assert cache.kept_mappings == 2
        cache.write(name, 3, buffer_of(data[3]))  # into v1's pages, through v1's mapping
        assert mapping_of(3) is first and cache.kept_mappings == 2
        assert torch.equal(read(3), data[3]) and torch.equal(read(2), data[2])
        cache.keep_only({(name, 3)})
        cache.write(name, 4, buffer_of(data[4]))  # into v2's pages
        assert torch.equal(read(4), data[4]) and torch.equal(read(3), data[3])
        cache.keep_only({(name, 4)})  # v3 parked as .free
        cache.keep_only(set())  # v4 deleted (a .free exists): its mapping goes, the parked one stays
        assert cache.kept_mappings == 1
        cache.remove_all()
        assert cache.kept_mappings == 0 and not list(SHM_DIR.glob(f"{prefix}-*"))
    finally:
        cache.close()


def test_a_mapping_forgotten_under_a_copy_closes_when_the_copy_is_done(prefix: str) -> None:
    """The commit's scan of /dev/shm can miss a file that another thread is renaming, and forget its
    kept mapping while a lend copies through it (the H100 box saw "_KeptMapping has no attribute array"):
    a pinned mapping stays open until its copy unpins it; the lend then reads back what it copied."""
    cache = HostCache(prefix, threads=2)
    name = "u00000.master"
    data = torch.arange(2**20, dtype=torch.float32)
    try:
        cache.write(name, 1, buffer_of(data))
        st = cache.path(name, 1).stat()
        key = (st.st_dev, st.st_ino)
        src = cache._pinned(key, st.st_size)
        assert src is not None
        cache._forget(key)  # as a scan that missed the file would
        assert key not in cache._maps and src.array.nbytes == st.st_size, "closed under its copy"
        cache._unpin(src)
        assert not hasattr(src, "array"), "a forgotten mapping must close at its last unpin"
        lent = Path(cache.lend(name, 1, 2))  # maps the source afresh
        assert torch.equal(torch.from_file(str(lent), size=2**20, dtype=torch.float32), data)
        kept = cache._maps[key]
        assert kept.users == 0 and not kept.forgotten, "lend must unpin what it pinned"
    finally:
        cache.close()


@pytest.mark.parametrize("copy", [True, False], ids=["lend-copy", "out-of-place"])
def test_the_optimizer_updates_lent_records_in_the_cache_files_as_it_would_ring_slots(
    prefix: str, copy: bool
) -> None:
    """ssd.lend + opt.update + ssd.adopt, at the level of their parts: the new version, updated in place
    in the lent copy - or, lent without the copy, written from the version read (the host kernel's
    out-of-place AdamW) - with the gradient from a slot, or read in place from the cache, equals AdamW on
    ring slots bit for bit; the version read stays intact; lending again (a replay) gives the same file,
    and a failed attempt's update is undone (copied afresh, or overwritten from the version read);
    mappings of deleted files are dropped."""
    from actors.cpu_optimizer import CPUOptimizerActor
    from fuyou_ray.cache import LentRecord
    from fuyou_ray.optim import AdamWStep, adamw_update_
    from fuyou_ray.ring import Ring, make_spec

    numel = 3 * 2**20 + 12345  # several update blocks, and ranges that do not start on a page
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(numel, generator=gen) for k in ("master", "exp_avg")}
    state["exp_avg_sq"] = torch.rand(numel, generator=gen)
    grad = torch.randn(numel, generator=gen)
    hp = AdamWStep(3, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    cache = HostCache(prefix, threads=2)
    spec = make_spec(align_up(numel * 4), 5)
    with Ring(spec):
        opt = CPUOptimizerActor(spec, 0, 2)
        try:
            for kind, t in state.items():
                cache.write(f"u00001.{kind}", 1, buffer_of(t))
            lent = {}
            for kind in state:
                target = cache.lend(f"u00001.{kind}", 1, 2, copy=copy)
                source = "" if copy else str(cache.path(f"u00001.{kind}", 1))
                lent[kind] = LentRecord(f"u00001.{kind}", "float32", numel, 2, target, prefix, source)
            g_slot = spec.slot(0).carrying("u00001.grad", "float32", numel, 2)
            p_slot = spec.slot(1).carrying("u00001.param", "bfloat16", numel, 2)
            w, m, v = lent["master"], lent["exp_avg"], lent["exp_avg_sq"]
            opt.ring.tensor(g_slot).copy_(grad)
            opt.update(w, g_slot, m, v, p_slot, 0, numel, 2**20, hp, 0.5)  # a failed attempt's update
            for kind in state:  # the replay lends again: the same file (the version read copied afresh)
                assert cache.lend(f"u00001.{kind}", 1, 2, copy=copy) == lent[kind].target
            opt.ring.tensor(g_slot).copy_(grad)
            # The second range reads the gradient in place from a cached gradient log (CachedStore.view).
            cache.write("u00001.grad", 2, buffer_of(grad))
            g_view = LentRecord("u00001.grad", "float32", numel, 2, str(cache.path("u00001.grad", 2)), prefix)
            for (lo, hi), g_src in zip(((0, 1_500_001), (1_500_001, numel)), (g_slot, g_view), strict=True):
                opt.update(w, g_src, m, v, p_slot, lo, hi, 2**20, hp, 0.5)
            expected = {k: t.clone() for k, t in state.items()}
            params = torch.empty(numel, dtype=torch.bfloat16)
            g = grad.clone()
            adamw_update_(
                expected["master"], g, expected["exp_avg"], expected["exp_avg_sq"], hp,
                decay_end=2**20, grad_scale=0.5, params_out=params,
            )  # fmt: skip
            assert torch.equal(opt.ring.tensor(p_slot), params)
            for kind in state:
                assert cache.adopt(f"u00001.{kind}", 2) and not cache.adopt(f"u00001.{kind}", 2)
                for version, want in ((2, expected[kind]), (1, state[kind])):
                    buf = bytearray(align_up(numel * 4))
                    assert cache.read(f"u00001.{kind}", version, memoryview(buf))
                    got = torch.frombuffer(buf, dtype=torch.float32)[:numel]
                    assert torch.equal(got, want), (kind, version)
            # 3 records x (the whole file, then 2 ranges), the gradient's range; out of place also the
            # version read, the same ranges again (read-only)
            mapped = 10 if copy else 19
            assert opt.lent.mapped == mapped
            cache.keep_only({(f"u00001.{kind}", 1) for kind in state})  # v2 parked as .free: same inode
            opt.lent.forget_missing(prefix)
            assert opt.lent.mapped == mapped
            cache.remove_all()
            opt.lent.forget_missing(prefix)
            assert opt.lent.mapped == 0
        finally:
            opt.shutdown()
            cache.remove_all()
            cache.close()


def test_view_lends_the_cached_gradient_log_of_the_step_and_refuses_what_is_not_cached(
    tmp_path: Path, prefix: str
) -> None:
    disk = SSDTensorStore([tmp_path / "ssd"], direct_io=False, background_unlink=False)
    store = CachedStore(disk, CacheSpec(prefix, state_units=(0,), grad_log=True), UNITS)
    try:
        initialize(store)
        grad = record_name(1, RecordKind.GRAD)
        data = unit_bytes(1, 3, RecordKind.GRAD)
        store.write_from(grad, buffer_of(data), dtype="float32", numel=NUMEL, version=1, transient=True)
        lent = store.view(grad)
        assert (lent.name, lent.version, lent.numel) == (grad, 1, NUMEL)
        got = torch.from_file(lent.target, size=NUMEL, dtype=torch.float32)
        assert torch.equal(got, data)
        with pytest.raises(CacheError, match="not in the host cache"):
            store.view(record_name(1, RecordKind.MASTER))  # on SSD: read into a slot instead
    finally:
        close(store)


def test_a_full_dev_shm_is_a_named_error_not_a_bus_error(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cache writes go through a mapping; their pages are reserved first, so tmpfs running out of room is
    an ENOSPC (a CacheError naming the fixes) and never a SIGBUS, and the half-made file goes."""
    cache = HostCache(prefix, threads=2)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(CacheError, match=r"/dev/shm is full: no room for u00000.master.*cpu_cache: off"):
            cache.write("u00000.master", 1, buffer_of(torch.ones(2**20)))
        assert not list(SHM_DIR.glob(f"{prefix}-*"))
    finally:
        cache.close()


def test_write_through_is_durable_at_every_commit(tmp_path: Path, prefix: str) -> None:
    ssd = tmp_path / "ssd"
    store = open_cached(ssd, prefix, write_through=True)
    initialize(store)
    step(store, 1)
    step(store, 2)
    assert manifest(ssd)["meta"]["durable_step"] == 2
    assert not any(r.get("in_memory") for r in manifest(ssd)["records"])
    read = store.ssd.bytes_read
    expect(store, 2)
    assert store.ssd.bytes_read == read, "a cached read went to SSD"
    assert durable.latest([ssd]) is None  # nothing to fall back to: the store itself is durable
    close(store)
    for path in SHM_DIR.glob(f"{prefix}-*"):
        path.unlink()
    store = open_cached(ssd, prefix, write_through=True)
    assert store.restored is None
    expect(store, 2)  # from SSD now
    assert store.ssd.bytes_read > 0
    close(store)


def test_an_interrupted_flush_leaves_the_previous_durable_state(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssd = tmp_path / "ssd"
    store = open_cached(ssd, prefix)
    initialize(store)
    step(store, 1)
    assert store.flush() == 1
    step(store, 2)

    def crash(*args: Any) -> int:
        raise OSError("killed mid-flush")

    monkeypatch.setattr(SSDTensorStore, "relocate_staged", crash)
    with pytest.raises(OSError, match="mid-flush"):
        store.flush()  # the SSD copies are written, the manifest does not name them yet
    monkeypatch.undo()
    close(store)
    for path in SHM_DIR.glob(f"{prefix}-*"):
        path.unlink()
    store = open_cached(ssd, prefix)
    assert store.restored is not None and store.committed_step == 1
    expect(store, 1)
    close(store)


# ---------------------------------------------------------------------------------------------- runs


def ssd_bytes_per_step(spec: ModelSpec, plan: Plan, clip: bool) -> tuple[int, int]:
    """SSD bytes (read, written) of a steady step of `plan` on the CPU fallback (fp32 params): params are
    read twice (forward, backward; the head once; with clipping once less, as the forward and the head
    ran ahead on the previous step's new params) and written once, state read and written, the gradient
    log written and read back - except what the cache holds."""
    read = written = 0
    last = spec.num_units - 1
    for u, unit in enumerate(spec.units):
        record = align_up(unit.numel * 4)
        if u not in plan.cpu_cached_params:
            read += record * ((1 if u == last else 2) - (1 if clip else 0))
            written += record
        elif plan.cache_write_through:
            written += record
        if u not in plan.cpu_cached_state:
            read += 3 * record
            written += 3 * record
        elif plan.cache_write_through:
            written += 3 * record
        if plan.grad_log_tier == "ssd" and u != 0:  # the last gradient out (unit 0's) is not logged
            read += record
            written += record
    return read, written


def run_dir_tensors(cfg: RunConfig) -> dict[RecordKind, list[torch.Tensor]]:
    return {k: load_unit_tensors(cfg, k) for k in KINDS}


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_cached_runs_are_bit_identical_and_cut_the_ssd_traffic(tmp_path: Path, clip: bool) -> None:
    base = tiny_config(tmp_path / "off", steps=4, optimizer={"max_grad_norm": 0.5 if clip else 0.0})
    spec = ModelSpec(base.model)
    plain = train(with_runtime(base, cpu_cache="off"), executor="local")
    ref = Reference(losses(base), run_dir_tensors(base))
    plan_off = make_plan(with_runtime(base, cpu_cache="off"), spec)
    assert (plain.io["ssd_read_per_step"], plain.io["ssd_written_per_step"]) == ssd_bytes_per_step(
        spec, plan_off, clip
    )
    state_only = plan_off.cpu_bytes_needed + cache_bytes(
        spec, dataclasses.replace(plan_off, cpu_cached_state=tuple(range(spec.num_units)))
    )
    for name, runtime, cpu_mem in (
        ("write-back", {}, base.budgets.cpu_mem),
        ("write-through", {"cache_write_through": True}, base.budgets.cpu_mem),
        ("state only", {"cache_flush_every": 2}, state_only),
        ("lends without copies", {"lend_copy": False}, base.budgets.cpu_mem),
        ("torch AdamW: lends copy", {"adam_kernel": "torch", "lend_copy": False}, base.budgets.cpu_mem),
    ):
        cfg = tiny_config(
            tmp_path / name,
            steps=4,
            optimizer={"max_grad_norm": 0.5 if clip else 0.0},
            runtime={"cpu_cache": "auto", **runtime},
        )
        cfg = with_cpu_mem(cfg, cpu_mem)
        plan = make_plan(cfg, spec)
        assert plan.cpu_cached_state, name
        result = train(cfg, executor="local")
        assert_identical(cfg, ref)
        expected = ssd_bytes_per_step(spec, plan, clip)
        got = (result.io["ssd_read_per_step"], result.io["ssd_written_per_step"])
        assert got == expected, f"{name}: SSD bytes per step (read, written) {got} != {expected}"
        assert expected[0] < plain.io["ssd_read_per_step"] and expected[1] <= plain.io["ssd_written_per_step"]
        # The optimizer updates cached state in the cache's own files (lent): a copy of the version read
        # with torch's AdamW, or, with the host kernel's out-of-place AdamW, no copy at all. Other cached
        # records are copied into ring slots (read).
        lend_copies = cfg.runtime.lend_copy or cfg.runtime.adam_kernel == "torch"
        assert plan.lend_copy == lend_copies
        assert (result.io["cache_bytes_lent"] > 0) == lend_copies and result.io["cache_records"] > 0
        left = [p.name for p in SHM_DIR.glob("fuyou-ring-*-cache-*") if f"-{os.getpid()}-" in p.name]
        assert not left, f"cache files outlived the run: {left}"


# ---------------------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def uncached(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Reference]:
    """Uninterrupted runs without the cache (in process, one torch thread as each actor has)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for clip in (True, False):
            cfg = fault_config(
                tmp_path_factory.mktemp(f"uncached-{clip}"), clip, steps=CACHED_STEPS, cpu_cache="off"
            )
            train(cfg, executor="local")
            out[clip] = Reference(losses(cfg), run_dir_tensors(cfg))
    finally:
        torch.set_num_threads(threads)
    return out


# Steps of the cached fault runs: enough that the planned kills (each followed by a restart and a random
# pause) land before the run ends; at 10, CI saw 3 of 6 land.
CACHED_STEPS = 24


@pytest.mark.slow
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_actor_kills_with_a_write_back_cache(
    tmp_path: Path, uncached: dict[bool, Reference], clip: bool, ray_cluster: Any
) -> None:
    """kill -9 of the SSD I/O actor (which holds the cache's only copy of the step in progress, and
    flushes it every other commit) and of optimizer actors, mid-step: the restarted SSD actor finds the
    cache in /dev/shm and the step is replayed, bit-identical to a run without the cache."""
    cfg = fault_config(tmp_path, clip, steps=CACHED_STEPS, cpu_cache="auto", cache_flush_every=2)
    plan = [
        ("ssd", "publish"),
        ("opt", "update"),
        ("ssd", "commit"),
        ("ssd", "read"),
        ("opt", ""),
        ("ssd", "write"),
    ]
    injector = run_with_kills(cfg, plan, seed=7)
    report(f"kills with a write-back cache, {'clipping' if clip else 'overlapped optimizer'}", injector)
    # The run can end before the last planned kills land (see CACHED_STEPS).
    assert len(injector.kills) >= 4, injector.missed
    assert {k.kind for k in injector.kills} == {"ssd", "opt"}
    assert_identical(cfg, uncached[clip])
    assert_no_leaks(cfg)
    assert not {s for s in fuyou_shm_segments() if f"-{os.getpid()}-" in s}


@pytest.mark.slow
def test_driver_killed_between_flushes_resumes_from_the_last_flush(
    tmp_path: Path, uncached: dict[bool, Reference], ray_cluster: Any
) -> None:
    """kill -9 of the driver of a write-back run: the cache dies with it, the SSD holds the step of the
    last flush; the re-run restores it (and drops the metrics of the steps it runs again) and ends
    bit-identical to a run without the cache. The killed driver's cache files go at the next start."""
    cfg = fault_config(tmp_path, True, steps=CACHED_STEPS, cpu_cache="auto", cache_flush_every=4)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    command = [sys.executable, "-m", "fuyou_ray", "train", str(config_file)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        reached = wait_until(lambda: committed(metrics) >= 6 or proc.poll() is not None, 180, 0.01)
        assert reached and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.kill()
    finally:
        proc.wait()
    assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()
    left = {s for s in fuyou_shm_segments() if f"-{proc.pid}-" in s and "-cache-" in s}
    assert left, "the killed driver's cache files stay until the next start"
    on_disk = manifest(Path(cfg.ssd.paths[0]))
    assert on_disk["meta"]["durable_step"] == 4 < on_disk["step"]
    assert any(r.get("in_memory") for r in on_disk["records"])
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert not left & fuyou_shm_segments()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(
        range(1, CACHED_STEPS + 1)
    )
    assert_identical(cfg, uncached[True])
    assert_no_leaks(cfg)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_flush_the_cache(
    tmp_path: Path, uncached: dict[bool, Reference], ray_cluster: Any
) -> None:
    """A write-back run stopped with Ctrl-C (in process) or SIGTERM (`ray job stop`, through Ray actors)
    flushes its cache on the way out: the committed step (and the published part of the one in progress)
    is whole on SSD, no /dev/shm file is left, and the re-run goes on from there bit-identically."""
    cfg = fault_config(tmp_path, True, steps=CACHED_STEPS, cpu_cache="auto", cache_flush_every=0)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    for sig, executor, after in ((signal.SIGINT, "local", 2), (signal.SIGTERM, "ray", 5)):
        command = [sys.executable, "-m", "fuyou_ray", "train", str(config_file), "--executor", executor]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        reached = wait_until(
            lambda a=after, p=proc: committed(metrics) >= a or p.poll() is not None, 180, 0.01
        )
        assert reached and proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        on_disk = manifest(Path(cfg.ssd.paths[0]))
        assert not any(r.get("in_memory") for r in on_disk["records"]), "the stop did not flush the cache"
        assert on_disk["meta"]["durable_step"] == on_disk["step"] == committed(metrics)
        assert not {s for s in fuyou_shm_segments() if f"-{proc.pid}-" in s}, "files left in /dev/shm"
        assert wait_until(lambda: not fuyou_actor_processes(), 30, 0.1), fuyou_actor_processes()
    train(cfg, executor="local")
    assert_identical(cfg, uncached[True])


def committed(metrics: Path) -> int:
    try:
        return len(metrics.read_text().splitlines())
    except OSError:
        return 0
