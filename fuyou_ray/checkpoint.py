"""Checkpoints: the committed state of a step, plus its data position and RNG seeds, kept beside the store.

A checkpoint of step N lives in `<each ssd path>/fuyou-checkpoints/step-0000000N/`: hard links to the store
files of step N's records (record files are written once and never modified, so a link is a snapshot),
the store manifest of step N and `checkpoint.json` (step, data position, seeds, model fingerprint),
written last: a checkpoint without it is incomplete and ignored. Taking one costs no space; as training
moves on and the store deletes its superseded versions, a checkpoint keeps them alive, so each costs at
most the size of the state (params + fp32 master weights and Adam moments). `keep` bounds how many stay.

Restoring replaces the store's manifest by the checkpoint's and links its files back into the store;
training resumes from step N with the batches it would have seen (the batch of step s depends only on the
seeds and s). A restore interrupted half-way is finished by running it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fuyou_ray.errors import SnapshotError
from fuyou_ray.journal import fsync_dir
from fuyou_ray.store import JOURNAL, MANIFEST, STORE_DIR, SSDTensorStore, TensorRecord, align_up

CHECKPOINT_DIR = "fuyou-checkpoints"
INFO = "checkpoint.json"
NAME = re.compile(r"step-\d{8}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """What `checkpoint.json` says about one checkpoint."""

    name: str
    step: int
    created: str
    data_step: int  # the next batch is batch number data_step (it depends only on the seeds and this)
    seed: int
    data_seed: int
    fingerprint: dict[str, Any]
    nbytes: int  # bytes of its record files (shared with the store or other checkpoints while unchanged)


def checkpoint_dirs(paths: Sequence[str | os.PathLike[str]], name: str) -> list[Path]:
    if not NAME.fullmatch(name):
        # The name becomes a path: only our own pattern, never '..' or a slash.
        raise SnapshotError(f"{name!r} is not a checkpoint name (step-NNNNNNNN; see --list)")
    return [Path(p) / CHECKPOINT_DIR / name for p in paths]


def take(store: SSDTensorStore, meta: Mapping[str, Any]) -> CheckpointInfo:
    """Snapshot the store's committed step (call between steps, with nothing pending)."""
    if store.pending is not None:
        raise SnapshotError(f"step {store.pending.step} is partly applied: finish it before a checkpoint")
    step = store.committed_step
    if step < 0:
        raise SnapshotError("the store has no committed step to checkpoint")
    name = checkpoint_name(step)
    dirs = checkpoint_dirs([d.parent for d in store.dirs], name)
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)  # an incomplete earlier attempt (or the same step again): start afresh
        d.mkdir(parents=True)
    nbytes = 0
    for rec, k, path in store.committed_files():
        target = dirs[rec.stripes[k].directory] / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)  # a filesystem without hard links: a full copy
        nbytes += rec.stripes[k].nbytes
    for d in dirs:
        fsync_dir(d)
    shutil.copyfile(store.dirs[0] / MANIFEST, dirs[0] / MANIFEST)
    info = CheckpointInfo(
        name=name,
        step=step,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        data_step=int(meta.get("data_step", step)),
        seed=int(meta.get("seed", 0)),
        data_seed=int(meta.get("data_seed", 0)),
        fingerprint=dict(store.manifest.meta.get("fingerprint", {})),
        nbytes=nbytes,
    )
    _write_json(dirs[0] / INFO, asdict(info))
    return info


def list_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    root = Path(paths[0]) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if NAME.fullmatch(d.name) and (d / INFO).is_file():
            try:
                out.append(CheckpointInfo(**json.loads((d / INFO).read_text())))
            except (ValueError, TypeError) as exc:
                raise SnapshotError(f"{d / INFO}: unreadable ({exc}); delete that checkpoint") from exc
    return out


def prune(paths: Sequence[str | os.PathLike[str]], keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (and any incomplete one); returns their names."""
    complete = list_checkpoints(paths)
    doomed = [c.name for c in complete[: max(0, len(complete) - keep)]]
    root = Path(paths[0]) / CHECKPOINT_DIR
    if root.is_dir():
        names = {c.name for c in complete}
        doomed += [d.name for d in root.iterdir() if NAME.fullmatch(d.name) and d.name not in names]
    for name in doomed:
        for d in checkpoint_dirs(paths, name):
            shutil.rmtree(d, ignore_errors=True)
    return doomed


def resolve(paths: Sequence[str | os.PathLike[str]], name: str) -> CheckpointInfo:
    """The checkpoint called `name` ('latest' for the newest)."""
    complete = list_checkpoints(paths)
    if not complete:
        raise SnapshotError(f"no checkpoint in {Path(paths[0]) / CHECKPOINT_DIR}")
    if name == "latest":
        return complete[-1]
    checkpoint_dirs(paths, name)  # validates the name
    for c in complete:
        if c.name == name:
            return c
    raise SnapshotError(f"no checkpoint {name}; there are: {', '.join(c.name for c in complete)}")


def restore(paths: Sequence[str | os.PathLike[str]], name: str) -> CheckpointInfo:
    """Make checkpoint `name` ('latest': the newest) the store's committed state. Refused while a run has
    the store open, and for a checkpoint of another model than the store holds."""
    info = resolve(paths, name)
    current = Path(paths[0]) / STORE_DIR / MANIFEST
    if current.is_file():
        fingerprint = json.loads(current.read_text()).get("meta", {}).get("fingerprint")
        if fingerprint and info.fingerprint and fingerprint != info.fingerprint:
            raise SnapshotError(
                f"checkpoint {info.name} holds another model or dtype ({info.fingerprint}) than the store "
                f"in {paths[0]} ({fingerprint})"
            )
    dirs = checkpoint_dirs(paths, info.name)
    manifest = json.loads((dirs[0] / MANIFEST).read_text())
    records = [TensorRecord.from_json(r) for r in manifest["records"]]
    # Check the checkpoint is whole before touching the store.
    for rec in records:
        for k, s in enumerate(rec.stripes):
            f = dirs[s.directory] / rec.file_name(k)
            if not f.is_file() or f.stat().st_size < s.nbytes:
                raise SnapshotError(f"checkpoint {info.name} is damaged: {f} is missing or short")
    # Taking the store's lock refuses a restore under a live run; opening also removes leftovers.
    store = SSDTensorStore(paths, direct_io=False)
    try:
        store_dirs = store.dirs
    finally:
        store.close()
    for rec in records:
        for k, s in enumerate(rec.stripes):
            target = store_dirs[s.directory] / rec.file_name(k)
            target.unlink(missing_ok=True)
            try:
                os.link(dirs[s.directory] / rec.file_name(k), target)
            except OSError:
                shutil.copyfile(dirs[s.directory] / rec.file_name(k), target)
    for d in store_dirs:
        fsync_dir(d)
    tmp = store_dirs[0] / (MANIFEST + ".restore")
    shutil.copyfile(dirs[0] / MANIFEST, tmp)
    os.replace(tmp, store_dirs[0] / MANIFEST)
    (store_dirs[0] / JOURNAL).unlink(missing_ok=True)
    fsync_dir(store_dirs[0])
    SSDTensorStore(paths, direct_io=False).close()  # drops files the restored manifest does not name
    return info


def state_bytes(paths: Sequence[str | os.PathLike[str]]) -> int:
    """Bytes of the committed records of the store at `paths` (what one checkpoint costs at most)."""
    manifest = Path(paths[0]) / STORE_DIR / MANIFEST
    if not manifest.is_file():
        return 0
    return sum(align_up(r["nbytes"]) for r in json.loads(manifest.read_text())["records"])


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
