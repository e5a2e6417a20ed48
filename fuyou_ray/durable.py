"""Durable snapshots: the last state of a write-back run that is whole on SSD.

With a write-back host cache (fuyou_ray/cache.py) the store's manifest names records whose bytes live only
in /dev/shm: they survive an actor restart, not a driver kill or a machine crash. At each flush the cache
writes them to SSD, and `take` then snapshots the store: hard links to every file of its durable state in
`<ssd path>/fuyou-durable/flush-NNNNNNNN/`, plus a copy of the manifest (and of the journal, if a step was
partly published) and `durable.json`, written last - a snapshot without it is incomplete and ignored. The
links keep the snapshot's versions alive while training moves on (the store deletes the versions it
supersedes, the snapshot's names stay), so the snapshot costs nothing when taken and at most one state
later. The previous snapshot is removed only once the new one is complete.

`restore` puts the newest complete snapshot back under an open store's lock (the store's files re-linked,
its manifest and journal replaced, then re-read): the run resumes from that step, with the batches of
that step (a batch depends only on the seeds and the step), so the result is the one an uninterrupted run
gives, bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fuyou_ray.journal import Journal, fsync_dir
from fuyou_ray.store import JOURNAL, MANIFEST, SSDTensorStore, StoreError, TensorRecord

log = logging.getLogger(__name__)

DURABLE_DIR = "fuyou-durable"
MARKER = "durable.json"
NAME = re.compile(r"flush-(\d{8})")


class DurableError(StoreError):
    """No complete durable snapshot exists where one is needed, or one is damaged."""


@dataclass(frozen=True)
class DurableInfo:
    """What `durable.json` says about one snapshot."""

    name: str
    seq: int  # snapshots are numbered; the highest complete one is the durable state
    step: int  # the committed step it holds
    published_units: int  # units of step + 1 already published in its journal (a replay skips them)
    created: str


def roots(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    return [Path(p) / DURABLE_DIR for p in paths]


def latest(paths: Sequence[str | os.PathLike[str]]) -> DurableInfo | None:
    """The newest complete snapshot under the SSD directories `paths`, or None."""
    root = roots(paths)[0]
    if not root.is_dir():
        return None
    best: DurableInfo | None = None
    for d in root.iterdir():
        if NAME.fullmatch(d.name) and (d / MARKER).is_file():
            try:
                info = DurableInfo(**json.loads((d / MARKER).read_text()))
            except (ValueError, TypeError) as exc:
                raise DurableError(f"{d / MARKER}: unreadable ({exc}); delete {d}") from exc
            if best is None or info.seq > best.seq:
                best = info
    return best


def matches(store: SSDTensorStore) -> bool:
    """Whether the newest complete snapshot holds the store's current state (same manifest and journal)."""
    paths = [d.parent for d in store.dirs]
    info = latest(paths)
    if info is None:
        return False
    snap = roots(paths)[0] / info.name
    return all(_same_bytes(snap / name, store.dirs[0] / name) for name in (MANIFEST, JOURNAL))


def _same_bytes(a: Path, b: Path) -> bool:
    if not a.exists() or not b.exists():
        return a.exists() == b.exists()
    return a.read_bytes() == b.read_bytes()


def take(store: SSDTensorStore) -> DurableInfo:
    """Snapshot the store's durable state (every record on SSD; call with nothing staged or in flight),
    then delete every older snapshot."""
    files = store.durable_files()  # refuses records that live in host memory only
    paths = [d.parent for d in store.dirs]
    previous = latest(paths)
    seq = previous.seq + 1 if previous else 1
    name = f"flush-{seq:08d}"
    dirs = [r / name for r in roots(paths)]
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)  # an incomplete attempt of the same number
        d.mkdir(parents=True)
    for rec, k, path in files:
        _link(path, dirs[rec.stripes[k].directory] / path.name)
    for d in dirs:
        fsync_dir(d)
    _copy(store.dirs[0] / MANIFEST, dirs[0] / MANIFEST)
    pending = store.pending
    if pending is not None:
        _copy(store.dirs[0] / JOURNAL, dirs[0] / JOURNAL)
    units = {r.name.split(".")[0] for r in pending.records.values()} if pending else set()
    info = DurableInfo(name, seq, store.committed_step, len(units), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tmp = dirs[0] / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(info), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dirs[0] / MARKER)
    fsync_dir(dirs[0])
    _remove_except(paths, keep=name)
    return info


def restore(store: SSDTensorStore) -> DurableInfo:
    """Make the newest complete snapshot the store's state (the store is open: its lock is held)."""
    paths = [d.parent for d in store.dirs]
    info = latest(paths)
    if info is None:
        raise DurableError(
            f"the store in {paths[0]} names records that lived in a host-memory cache now gone, and "
            f"{roots(paths)[0]} holds no durable snapshot to fall back to: restore a checkpoint "
            "(fuyou-ray checkpoint RUN_DIR --restore latest) or start a new run"
        )
    dirs = [r / info.name for r in roots(paths)]
    manifest = json.loads((dirs[0] / MANIFEST).read_text())
    entries = Journal(dirs[0] / JOURNAL).load() if (dirs[0] / JOURNAL).exists() else []
    records = [TensorRecord.from_json(r) for r in manifest["records"]]
    records += [TensorRecord.from_json(r) for e in entries for r in e["records"]]
    for rec in records:  # whole before anything of the store is touched
        for k, s in enumerate(rec.stripes):
            f = dirs[s.directory] / rec.file_name(k)
            if not f.is_file() or f.stat().st_size < s.nbytes:
                raise DurableError(f"durable snapshot {info.name} is damaged: {f} is missing or short")
    for rec in records:
        for k, s in enumerate(rec.stripes):
            source, target = dirs[s.directory] / rec.file_name(k), store.dirs[s.directory] / rec.file_name(k)
            if target.exists() and os.path.samefile(source, target):
                continue
            target.unlink(missing_ok=True)
            _link(source, target)
    for d in store.dirs:
        fsync_dir(d)
    tmp = store.dirs[0] / (MANIFEST + ".restore")
    _copy(dirs[0] / MANIFEST, tmp)
    os.replace(tmp, store.dirs[0] / MANIFEST)
    if entries:
        store.journal.rewrite(entries)
    else:
        store.journal.remove()
    fsync_dir(store.dirs[0])
    store.reload()
    return info


def bytes_on_ssd(store_dirs: Sequence[Path]) -> int:
    """Bytes the run holds on SSD: the store's files and its durable snapshots' (hard links to the same
    file count once). With a write-back cache the store's manifest names versions that live in /dev/shm
    only, so the snapshots are most of what is on SSD."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for d in [*store_dirs, *roots([sd.parent for sd in store_dirs])]:
        for root, _, names in os.walk(d):
            for name in names:
                try:
                    st = os.stat(os.path.join(root, name))
                except FileNotFoundError:  # superseded while we walked
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def remove_all(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Delete every snapshot (the store's own manifest is whole on SSD again: they only hold space)."""
    _remove_except(paths, keep="")


def _remove_except(paths: Sequence[str | os.PathLike[str]], keep: str) -> None:
    for root in roots(paths):
        if root.is_dir():
            for d in root.iterdir():
                if d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)  # a filesystem without hard links: a full copy


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
