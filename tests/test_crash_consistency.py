"""Crash consistency of the SSD store without a second copy of the state: per-unit publication through the
journal, what survives a crash at each point, idempotent calls, the store lock and the space it takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuyou_ray.store import (
    JOURNAL,
    MANIFEST,
    STORE_DIR,
    RecordState,
    SSDTensorStore,
    StoreBusyError,
    StoreError,
    step_scratch_bytes,
)
from tests.test_store import crash, data, get, open_store, put, record_files, store_files

UNITS = 3
KINDS = ("param", "master", "exp_avg", "exp_avg_sq")


def names(u: int) -> list[str]:
    return [f"u{u:05d}.{k}" for k in KINDS]


def committed_store(dirs: list[Path]) -> tuple[SSDTensorStore, dict[str, torch.Tensor]]:
    """A store at committed step 1 holding UNITS units of 4 records each."""
    s = open_store(dirs)
    values = {}
    for u in range(UNITS):
        for i, name in enumerate(names(u)):
            values[name] = data(5000 + 100 * u, seed=10 * u + i)
            put(s, name, values[name], version=1)
    s.commit(1, {"data_step": 1})
    s.wait_for_deletions()
    return s, values


def update_unit(s: SSDTensorStore, u: int, version: int, publish: bool = True) -> dict[str, torch.Tensor]:
    new = {name: data(5000 + 100 * u, seed=1000 * version + 10 * u + i) for i, name in enumerate(names(u))}
    for name, t in new.items():
        put(s, name, t, version=version)
    if publish:
        s.publish(version, names(u), {"step_key": "k"}, keep_previous=[names(u)[0]])
    return new


@pytest.fixture
def dirs2(tmp_path: Path) -> list[Path]:
    return [tmp_path / "ssd0", tmp_path / "ssd1"]


def test_publication_frees_the_old_optimizer_state_but_keeps_the_params(dirs2: list[Path]) -> None:
    s, old = committed_store(dirs2)
    try:
        before = {n: s.record(n) for u in range(UNITS) for n in names(u)}
        update_unit(s, 0, 2)
        s.wait_for_deletions()
        on_disk = store_files(dirs2)
        # The old master and moments of unit 0 are gone as soon as the new ones are durable...
        for name in names(0)[1:]:
            assert not record_files(before[name]) & on_disk
        # ...its old params stay readable (a replay of the step runs forward on them), and so do the
        # other units, untouched.
        assert record_files(before[names(0)[0]]) <= on_disk
        assert torch.equal(get(s, names(0)[0]), old[names(0)[0]])
        for u in (1, 2):
            for name in names(u):
                assert torch.equal(get(s, name), old[name])
        pending = s.pending
        assert pending is not None and pending.step == 2 and set(pending.records) == set(names(0))
        assert all(r.state is RecordState.PUBLISHED for r in pending.records.values())
        assert manifest_step(dirs2) == 1
    finally:
        s.close()


def test_crash_after_some_units_is_finished_by_a_replay(dirs2: list[Path]) -> None:
    s, old = committed_store(dirs2)
    new0 = update_unit(s, 0, 2)
    update_unit(s, 1, 2, publish=False)  # written, not published: lost in the crash
    crash(s)

    again = open_store(dirs2)
    try:
        pending = again.pending
        assert pending is not None and pending.step == 2 and pending.meta == {"step_key": "k"}
        assert {n[:6] for n in pending.records} == {"u00000"}
        # The staged files of unit 1 are gone; the committed params of every unit are readable.
        assert again.committed_step == 1
        for u in range(UNITS):
            assert torch.equal(get(again, names(u)[0]), old[names(u)[0]])
        # The replay updates the units not yet published, then commits.
        new = {**new0, **update_unit(again, 1, 2), **update_unit(again, 2, 2)}
        again.commit(2, {"data_step": 2})
        again.wait_for_deletions()
        assert again.pending is None and not (dirs2[0] / STORE_DIR / JOURNAL).exists()
        for name, t in new.items():
            assert again.record(name).version == 2
            assert torch.equal(get(again, name), t)
        # Exactly the committed files remain: no leftover of either version.
        assert store_files(dirs2) == {f for r in again.manifest.records.values() for f in record_files(r)}
    finally:
        again.close()


def test_torn_journal_line_counts_as_never_written(dirs2: list[Path]) -> None:
    s, _old = committed_store(dirs2)
    update_unit(s, 0, 2)
    crash(s)
    journal = dirs2[0] / STORE_DIR / JOURNAL
    with open(journal, "a") as f:
        f.write('{"crc": 1, "body": "{\\"step\\": 2, \\"rec')  # a crash in the middle of an append
    again = open_store(dirs2)
    try:
        assert again.pending is not None and {n[:6] for n in again.pending.records} == {"u00000"}
        # The torn tail is gone, so the next publication follows a valid line.
        update_unit(again, 1, 2)
    finally:
        crash(again)
    third = open_store(dirs2)
    try:
        assert third.pending is not None
        assert {n[:6] for n in third.pending.records} == {"u00000", "u00001"}
    finally:
        third.close()


def test_a_corrupted_journal_line_is_not_trusted(dirs2: list[Path]) -> None:
    s, _old = committed_store(dirs2)
    update_unit(s, 0, 2)
    crash(s)
    journal = dirs2[0] / STORE_DIR / JOURNAL
    journal.write_text(journal.read_text().replace('"version\\":2', '"version\\":3'))
    with pytest.raises(StoreError):
        # The entry fails its CRC, so unit 0 counts as not published; but its old optimizer state was
        # already deleted - the store says so instead of training on nothing.
        open_store(dirs2)


def test_journal_of_an_already_committed_step_is_stale(dirs2: list[Path]) -> None:
    s, _ = committed_store(dirs2)
    for u in range(UNITS):
        update_unit(s, u, 2)
    journal = dirs2[0] / STORE_DIR / JOURNAL
    saved = journal.read_bytes()
    s.commit(2, {"data_step": 2})
    crash(s)
    journal.write_bytes(saved)  # as if the process died between the manifest's rename and the unlink
    again = open_store(dirs2)
    try:
        assert again.committed_step == 2 and again.pending is None
        assert not journal.exists()
    finally:
        again.close()


def test_publish_and_write_are_idempotent(dirs2: list[Path]) -> None:
    s, _ = committed_store(dirs2)
    try:
        new = update_unit(s, 0, 2)
        assert s.publish(2, names(0), {"step_key": "k"}, keep_previous=[names(0)[0]]) is False
        lines = (dirs2[0] / STORE_DIR / JOURNAL).read_text().splitlines()
        assert len(lines) == 1
        # A repeated write of a published version writes nothing and returns the durable record.
        files = store_files(dirs2)
        rec = put(s, names(0)[1], data(10, seed=99), version=2)
        assert rec.state is RecordState.PUBLISHED and store_files(dirs2) == files
        s.commit(2, {})
        assert torch.equal(get(s, names(0)[1]), new[names(0)[1]])
    finally:
        s.close()


def test_publish_refuses_mixed_inputs_and_wrong_steps(dirs2: list[Path]) -> None:
    s, _ = committed_store(dirs2)
    try:
        update_unit(s, 0, 2)
        for name in names(1):
            put(s, name, data(5100, seed=5), version=2)
        with pytest.raises(StoreError, match="other inputs"):
            s.publish(2, names(1), {"step_key": "another"})
        with pytest.raises(StoreError, match="publish of step 3"):
            s.publish(3, names(1), {"step_key": "k"})
        with pytest.raises(StoreError, match="partly published"):
            s.commit(3, {})
    finally:
        s.close()


def test_discard_keeps_published_units(dirs2: list[Path]) -> None:
    s, _ = committed_store(dirs2)
    try:
        new0 = update_unit(s, 0, 2)
        update_unit(s, 1, 2, publish=False)
        s.discard_staged()
        assert s.pending is not None and set(s.pending.records) == set(names(0))
        s.commit(2, {})
        assert torch.equal(get(s, names(0)[1]), new0[names(0)[1]])
        assert s.record(names(1)[1]).version == 1
    finally:
        s.close()


def test_peak_space_is_the_state_plus_params_and_units_in_flight(dirs2: list[Path]) -> None:
    s, _ = committed_store(dirs2)
    try:
        state = s.stored_bytes()
        peak = 0
        for u in range(UNITS):
            update_unit(s, u, 2, publish=False)
            peak = max(peak, s.stored_bytes())
            s.publish(2, names(u), {"step_key": "k"}, keep_previous=[names(u)[0]])
            peak = max(peak, s.stored_bytes())
        s.commit(2, {})
        s.wait_for_deletions()
        assert s.stored_bytes() == state
        numels = [5000 + 100 * u for u in range(UNITS)]
        bound = state + step_scratch_bytes(numels, 4, clipping=False, units_in_flight=1)
        assert peak <= bound < 2 * state
    finally:
        s.close()


def test_step_scratch_bytes() -> None:
    # bf16 params: a new copy of every unit's params, plus the in-flight units' whole state.
    assert step_scratch_bytes([1024, 2048], 2, clipping=False, units_in_flight=1) == 4096 + 4096 + (
        4096 + 3 * 8192
    )
    # With exact clipping the gradient log (fp32) is added.
    assert step_scratch_bytes([1024], 2, clipping=True, units_in_flight=2) == 4096 + 4096 + 2 * (
        4096 + 3 * 4096
    )


def test_a_second_process_cannot_open_a_store_in_use(dirs2: list[Path]) -> None:
    s = open_store(dirs2)
    try:
        code = (
            "import sys; from fuyou_ray.store import SSDTensorStore\n"
            f"SSDTensorStore({[str(d) for d in dirs2]!r}, lock_timeout_s=0.2)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert f"in use by another process (pid {os.getpid()})" in proc.stderr
    finally:
        s.close()
    with pytest.raises(StoreBusyError):
        held = SSDTensorStore(dirs2)
        try:
            SSDTensorStore(dirs2, lock_timeout_s=0.1)
        finally:
            held.close()


def test_format_1_manifest_opens(dirs2: list[Path]) -> None:
    s, old = committed_store(dirs2)
    s.close()
    path = dirs2[0] / STORE_DIR / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format"] = 1
    path.write_text(json.dumps(manifest))
    again = open_store(dirs2)
    try:
        assert torch.equal(get(again, names(0)[0]), old[names(0)[0]])
    finally:
        again.close()


def test_writes_never_go_through_an_existing_file(dirs2: list[Path]) -> None:
    """A record file is created by one write: a hard link to it (a checkpoint) keeps its bytes."""
    s, _old = committed_store(dirs2)
    try:
        rec = s.record(names(0)[1])
        src = dirs2[rec.stripes[0].directory] / STORE_DIR / rec.file_name(0)
        link = src.parent.parent / "link"
        os.link(src, link)
        before = link.read_bytes()
        put(s, names(0)[1], data(5000, seed=77), version=2)
        # Same name as a leftover: replaced by a new file, not written into.
        put(s, names(0)[1], data(5000, seed=78), version=2)
        assert link.read_bytes() == before
    finally:
        s.close()


def manifest_step(dirs: list[Path]) -> int:
    return int(json.loads((dirs[0] / STORE_DIR / MANIFEST).read_text())["step"])
