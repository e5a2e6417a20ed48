"""One committed step for the whole job: a two-phase commit over the pipelines' stores, and reconciliation.

Every pipeline's store is a crash-consistent store of its own (fuyou_ray/store.py). A data-parallel step
becomes the job's committed step in two phases, both driven by the driver:

1. prepare: each pipeline publishes every unit of the step in its store's journal (new params and its
   shard of the optimizer state), then votes (`ShardStoreActor.prepare`): all units published, under the
   step's key, with a finite loss. Superseded versions are all kept until the commit, so until phase 2 any
   pipeline can redo any unit from the same inputs (the step's replay re-runs every unit on every pipeline;
   writes and publications of units already published change nothing).
2. commit: once every pipeline has voted, the driver commits each store (its manifest: fsync + rename).

A crash between two stores' commits leaves some stores at step s+1 and the others at step s with every unit
of s+1 published: `reconcile` finds the job's step (s+1) and finishes phase 2 on the others. Any other
disagreement (a store of another run, rank or pipeline count, a store emptied or restored to another step)
is refused with `ShardMismatchError`, before anything is written.

Core code: no Ray, no actors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fuyou_ray.errors import RunStateError
from fuyou_ray.parallel.shards import JobLayout, ShardMismatchError

# Keys of a store's commit meta that are the step's own (its summary), not the job's.
SUMMARY_KEYS = ("loss", "grad_norm")


@dataclass(frozen=True)
class StoreState:
    """What one pipeline's store says about itself (`ShardStoreActor.state()`)."""

    rank: int
    paths: tuple[str, ...]
    committed: int  # -1: empty
    meta: Mapping[str, Any] = field(default_factory=dict)
    pending_step: int | None = None  # the step after the committed one, if some of its units are published
    pending_units: tuple[int, ...] = ()
    pending_key: str | None = None

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> StoreState:
        return StoreState(
            rank=int(d["rank"]),
            paths=tuple(d["paths"]),
            committed=int(d["committed"]),
            meta=dict(d["meta"]),
            pending_step=d.get("pending_step"),
            pending_units=tuple(d.get("pending_units", ())),
            pending_key=d.get("pending_key"),
        )


@dataclass(frozen=True)
class Reconciled:
    """Where the job stands, and what the driver must do before its next step."""

    committed: int  # the job's committed step; -1: a new job
    initialize: tuple[int, ...] = ()  # ranks whose store must be initialised (the job's step 0)
    commit: tuple[int, ...] = ()  # ranks that must commit `committed` (phase 2 was interrupted)
    skip: tuple[int, ...] = ()  # ranks that must commit `committed` as a skipped step
    meta: Mapping[str, Any] = field(default_factory=dict)  # the committed stores' meta (job part)


def job_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A store's commit meta without its own shard description (what every store's commit shares)."""
    return {k: v for k, v in meta.items() if k != "shard"}


def reconcile(
    states: Sequence[StoreState], layout: JobLayout, fingerprint: Mapping[str, Any], num_units: int
) -> Reconciled:
    """The job's committed step from its stores' states; ShardMismatchError when they do not belong
    together, RunStateError when they hold another model."""
    if [s.rank for s in states] != list(range(layout.world)):
        raise ShardMismatchError(f"expected the stores of pipelines 0..{layout.world - 1}, got {states}")
    for s in states:
        if s.committed >= 0:
            _check_identity(s, layout, fingerprint)
    top = max(s.committed for s in states)
    if top < 0:
        return Reconciled(-1, initialize=tuple(range(layout.world)))
    leader = next(s for s in states if s.committed == top)
    initialize, commit, skip = [], [], []
    for s in states:
        if s.committed == top:
            if job_meta(s.meta) != job_meta(leader.meta):
                raise ShardMismatchError(
                    f"the stores of pipelines {leader.rank} ({leader.paths[0]}) and {s.rank} ({s.paths[0]}) "
                    f"both hold step {top} but of different runs or inputs: restore the pipelines' stores "
                    "from one checkpoint"
                )
        elif top == 0 and s.committed < 0:
            initialize.append(s.rank)  # the job's initialisation was interrupted
        elif s.committed == top - 1 and "skipped" in leader.meta and s.pending_step is None:
            skip.append(s.rank)
        elif (
            s.committed == top - 1
            and s.pending_step == top
            and set(s.pending_units) == set(range(num_units))
            and s.pending_key == leader.meta.get("step_key")
        ):
            commit.append(s.rank)  # voted in phase 1; its commit did not happen
        else:
            raise ShardMismatchError(
                f"pipeline {s.rank}'s store ({s.paths[0]}) is at step {s.committed} with "
                f"{len(s.pending_units)} of {num_units} units of step {s.pending_step} published, but "
                f"pipeline {leader.rank}'s ({leader.paths[0]}) committed step {top}: the stores were not "
                "committed together (a store emptied, replaced or restored on its own?). Restore every "
                "pipeline's store from the same checkpoint, or start a new run_dir"
            )
    return Reconciled(top, tuple(initialize), tuple(commit), tuple(skip), job_meta(leader.meta))


def _check_identity(s: StoreState, layout: JobLayout, fingerprint: Mapping[str, Any]) -> None:
    shard = s.meta.get("shard")
    want = layout.shard_meta(s.rank)
    if shard != want:
        if not isinstance(shard, Mapping):
            what = "a single-pipeline store" if shard is None else f"an unknown store ({shard!r})"
        elif shard.get("world") != want["world"]:
            what = f"pipeline {shard.get('rank')} of a {shard.get('world')}-pipeline job"
        elif shard.get("run_id") != want["run_id"]:
            what = f"pipeline {shard.get('rank')} of another run ({shard.get('run_id')})"
        elif shard.get("rank") != s.rank:
            what = f"pipeline {shard.get('rank')}'s store"
        else:
            what = f"a store split with another geometry ({shard.get('geometry')})"
        raise ShardMismatchError(
            f"{s.paths[0]} should hold pipeline {s.rank}'s shard of run {layout.run_id} "
            f"({layout.world} pipelines), but holds {what}: put each pipeline's store back in its own "
            "directory (ssd.paths in the order the run started with), or start a new run_dir"
        )
    stored = s.meta.get("fingerprint")
    if stored != fingerprint:
        raise RunStateError(
            f"the store in {s.paths[0]} holds a different model or dtype ({stored}) than this config "
            f"({fingerprint}); use a new run_dir/ssd.paths or the config the run started with"
        )
