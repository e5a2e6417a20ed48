"""Who holds what in a data-parallel job: element ranges, shard records, per-pipeline paths and configs.

A job of N pipelines (`runtime.data_parallel: N`) splits every unit's flat element range [0, numel) into N
contiguous ranges, one per pipeline (`ShardGeometry`). Pipeline k's store holds the full compute-dtype
params P of every unit (each pipeline's forward reads whole units) and only range k of each unit's fp32
master weights and Adam moments, as records named `u00003.shard1of2.master` (distinct from a single-pipeline
store's `u00003.master`, so a tool that expects whole units fails loudly instead of reading a shard).

Each pipeline's store lives in a directory of its own, `<ssd path>/pipeline-<k>`: with as many SSD paths as
pipelines (or a multiple) each pipeline gets its own group of SSDs, otherwise every pipeline stripes over
all of them. `data_parallel.json` in the run dir records the job's layout (pipelines, their paths, a run id,
the geometry's digest); every shard store's manifest carries the same, so a resume with another pipeline
count, or with one pipeline's store swapped for another's, is refused with `ShardMismatchError`.

Core code: no Ray, no actors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.errors import RunStateError
from fuyou_ray.models import ModelSpec
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.store import align_up

SHARD_ALIGN = 1024  # shard boundaries fall on 4 KiB of fp32 where the unit is large enough
LAYOUT_FILE = "data_parallel.json"


class ShardMismatchError(RunStateError):
    """The shard stores of a data-parallel run do not belong together: another pipeline count, another
    run, another shard geometry, or committed steps that cannot be reconciled. Nothing was changed."""


def shard_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """Split [0, numel) into `world` non-empty contiguous ranges, boundaries multiples of SHARD_ALIGN
    elements when every range still gets some (else as even as possible)."""
    if world < 1 or numel < world:
        raise ValueError(f"cannot split {numel} elements into {world} non-empty shards")
    per = -(-numel // world)
    aligned = -(-per // SHARD_ALIGN) * SHARD_ALIGN
    if aligned * (world - 1) < numel:
        cuts = [min(numel, k * aligned) for k in range(world)] + [numel]
    else:
        cuts = [numel * k // world for k in range(world + 1)]
    return list(itertools.pairwise(cuts))


class ShardGeometry:
    """Every unit's split into `world` element ranges. Immutable; the same on every pipeline."""

    def __init__(self, spec: ModelSpec, world: int) -> None:
        self.world = world
        self.numels = tuple(u.numel for u in spec.units)
        self.bounds = tuple(tuple(shard_bounds(n, world)) for n in self.numels)

    def range(self, unit: int, rank: int) -> tuple[int, int]:
        return self.bounds[unit][rank]

    def size(self, unit: int, rank: int) -> int:
        lo, hi = self.bounds[unit][rank]
        return hi - lo

    def digest(self) -> str:
        """Identifies the geometry: stores written with another split refuse to resume."""
        return hashlib.sha256(repr((self.world, self.bounds)).encode()).hexdigest()[:16]

    def state_bytes(self, rank: int, param_bytes: int) -> int:
        """Bytes of pipeline `rank`'s committed store: full params plus its shard of W, m, v."""
        return sum(
            align_up(n * param_bytes) + 3 * align_up(self.size(u, rank) * 4)
            for u, n in enumerate(self.numels)
        )

    def scratch_bytes(self, rank: int, param_bytes: int, clipping: bool) -> int:
        """SSD bytes pipeline `rank` needs during a step beyond its committed state. A data-parallel step
        keeps every superseded version until the commit (so a replay on any pipeline can recompute any
        unit), hence the whole new version of the shard's state and params, plus its gradient log."""
        grads = sum(align_up(self.size(u, rank) * 4) for u in range(len(self.numels))) if clipping else 0
        return self.state_bytes(rank, param_bytes) + grads


def shard_record(unit: int, kind: RecordKind, rank: int, world: int) -> str:
    """The record of pipeline `rank`'s range of a unit's fp32 tensor (master, moments, gradient log):
    `u00003.shard1of2.master`. Like a whole unit's record it starts with the unit and ends with the kind."""
    return f"u{unit:05d}.shard{rank}of{world}.{kind.value}"


def pipeline_paths(paths: Sequence[str], world: int) -> list[tuple[str, ...]]:
    """Each pipeline's SSD directories: with a multiple of `world` paths, consecutive groups (pipeline k
    gets paths[k*m:(k+1)*m]); otherwise every pipeline stripes over all paths. Always a `pipeline-<k>`
    subdirectory, so shard stores never meet a single-pipeline store in the same directory."""
    if len(paths) % world == 0:
        m = len(paths) // world
        groups = [tuple(paths[k * m : (k + 1) * m]) for k in range(world)]
    else:
        groups = [tuple(paths)] * world
    return [tuple(str(Path(p) / f"pipeline-{k}") for p in g) for k, g in enumerate(groups)]


def pipeline_config(cfg: RunConfig, rank: int) -> RunConfig:
    """The config one pipeline runs with: 1/N of the global batch, its own SSD directories, and no host
    cache (the shard stores keep everything on SSD; the cache of fuyou_ray/cache.py is single-pipeline)."""
    world = cfg.runtime.data_parallel
    batch = dataclasses.replace(cfg.batch, global_batch=cfg.batch.global_batch // world, grad_accum=None)
    ssd = dataclasses.replace(cfg.ssd, paths=pipeline_paths(cfg.ssd.paths, world)[rank])
    runtime = dataclasses.replace(cfg.runtime, cpu_cache="off")
    return dataclasses.replace(cfg, batch=batch, ssd=ssd, runtime=runtime)


# ---------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class JobLayout:
    """The run dir's record of a data-parallel job (`data_parallel.json`), written when its stores are
    created and checked on every resume."""

    world: int
    run_id: str
    geometry: str
    pipelines: tuple[tuple[str, ...], ...]

    def shard_meta(self, rank: int) -> dict[str, Any]:
        """What pipeline `rank`'s store records about itself in its manifest."""
        return {"rank": rank, "world": self.world, "run_id": self.run_id, "geometry": self.geometry}

    @staticmethod
    def new(cfg: RunConfig, geometry: ShardGeometry) -> JobLayout:
        paths = pipeline_paths(cfg.ssd.paths, cfg.runtime.data_parallel)
        return JobLayout(cfg.runtime.data_parallel, uuid.uuid4().hex[:16], geometry.digest(), tuple(paths))


def read_layout(run_dir: str | os.PathLike[str]) -> JobLayout | None:
    path = Path(run_dir) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return JobLayout(
            int(d["world"]), str(d["run_id"]), str(d["geometry"]), tuple(tuple(p) for p in d["pipelines"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardMismatchError(f"{path}: unreadable ({exc}); restore it or start a new run_dir") from exc


def write_layout(run_dir: str | os.PathLike[str], layout: JobLayout) -> None:
    path = Path(run_dir) / LAYOUT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(layout), indent=2))
    os.replace(tmp, path)


def check_layout(cfg: RunConfig, run_dir: str | os.PathLike[str], geometry: ShardGeometry | None) -> None:
    """Refuse to resume a run dir whose stores were written with another pipeline count or geometry.

    `geometry` is None for a single-pipeline run (which must not resume a data-parallel run's dir)."""
    layout = read_layout(run_dir)
    world = cfg.runtime.data_parallel
    if layout is None:
        metrics = Path(run_dir) / "metrics.jsonl"
        if world > 1 and metrics.is_file() and metrics.stat().st_size > 0:
            raise ShardMismatchError(
                f"{run_dir} holds a single-pipeline run (no {LAYOUT_FILE}), but runtime.data_parallel is "
                f"{world}: resume it with runtime.data_parallel: 1, or use a new run_dir"
            )
        return
    if layout.world != world:
        raise ShardMismatchError(
            f"{run_dir} was trained with runtime.data_parallel: {layout.world} (its optimizer state is "
            f"split over {layout.world} pipeline stores: {', '.join(p[0] for p in layout.pipelines)}), "
            f"but the config asks for {world}: set runtime.data_parallel back to {layout.world}, or use a "
            "new run_dir"
        )
    if geometry is not None and layout.geometry != geometry.digest():
        raise ShardMismatchError(
            f"{run_dir}: the stores were split with another shard geometry ({layout.geometry}) than this "
            f"version computes ({geometry.digest()}); resume with the fuyou-ray version that started the run"
        )
    expected = tuple(pipeline_paths(cfg.ssd.paths, world))
    if layout.pipelines != expected:
        raise ShardMismatchError(
            f"{run_dir}: the pipelines' stores are in {[list(p) for p in layout.pipelines]}, but ssd.paths "
            f"now puts them in {[list(p) for p in expected]}: give the same ssd.paths in the same order"
        )


def gather_unit_tensors(cfg: RunConfig, kind: RecordKind = RecordKind.MASTER) -> list[torch.Tensor]:
    """Every unit's committed record of `kind`, whole, from a stopped data-parallel run's stores: fp32
    state concatenated from the pipelines' shards, params from pipeline 0's store (each holds them all)."""
    from fuyou_ray.inspect import read_record
    from fuyou_ray.store import SSDTensorStore

    spec = ModelSpec(cfg.model)
    world = cfg.runtime.data_parallel
    stores = [SSDTensorStore(paths, direct_io=False) for paths in pipeline_paths(cfg.ssd.paths, world)]
    try:
        if kind == RecordKind.PARAM:
            return [read_record(stores[0], record_name(u.index, kind)) for u in spec.units]
        return [
            torch.cat([read_record(s, shard_record(u.index, kind, k, world)) for k, s in enumerate(stores)])
            for u in spec.units
        ]
    finally:
        for s in stores:
            s.close()
