"""The actors of a data-parallel pipeline: the single-pipeline actors specialised, plus the comm actor.

- `DPComputeActor`: the GPU compute actor, dividing the loss by the whole job's micro-batch count;
- `ShardStoreActor`: the SSD I/O actor over a store holding full params and one shard of the optimizer
  state, with the job commit's vote (`prepare`) and the reads the driver reconciles stores with;
- `GradCommActor`: the pipeline's member of the job's gloo process group (reduce-scatter of gradients,
  all-gather of new params, the global gradient norm and loss), and the owner of the pipeline's ring,
  which it creates in /dev/shm of its own node (a pipeline's actors share one node: placement groups).

Plain classes, wrapped with `ray.remote` by fuyou_ray/parallel/executor.py. Like actors/, they meet only
through ring handles and the driver's futures. (They live in this package, beside the data-parallel
schedule they serve; actors/ holds the single-pipeline ones.)
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from actors.gpu_compute import GPUComputeActor
from actors.ssd_io import SSDIOActor
from fuyou_ray.config import ModelConfig, SSDConfig
from fuyou_ray.errors import NonFiniteStepError, RunStateError
from fuyou_ray.memory import MemoryMeter, MemoryReport, setup_logging
from fuyou_ray.models import ModelSpec
from fuyou_ray.optim import clip_coefficient
from fuyou_ray.parallel.shards import ShardGeometry, shard_record
from fuyou_ray.records import OPTIMIZER_STATE, RecordKind, record_name
from fuyou_ray.ring import DTYPES, Ring, RingMapping, RingSpec, SlotHandle, make_spec, remove_stale_segments
from fuyou_ray.store import aligned_buffer
from fuyou_ray.timeline import Span, Timeline

# What a collective is, exchanged before its data (see GradCommActor._agree).
COLLECTIVES = ("reduce_scatter", "clip", "all_gather", "summary")


class CollectiveMismatchError(RunStateError):
    """The pipelines' comm actors were about to run different collectives: a pipeline skipped one because
    its input failed. The step fails (and is replayed) instead of exchanging mismatched data."""


class DPComputeActor(GPUComputeActor):
    """The GPU compute actor of one pipeline (name `fuyou:p<k>:gpu-compute`, one GPU each).

    Differs from GPUComputeActor only in `start_share` (its `start_step`): given `accum`, the loss is
    divided by the job's micro-batch count instead of this pipeline's, so the pipelines' gradients sum to
    the single-pipeline gradient term for term (each micro-batch's contribution is computed exactly as there).
    """

    def start_share(
        self, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int, step: int, accum: int | None
    ) -> int:
        """`start_step` with this pipeline's share of the batch; `accum`: the job's micro-batch count."""
        local = self.start_step(inputs, targets, micro_batch, step)
        if accum is not None:
            self.accum = accum
        return local


class ShardStoreActor(SSDIOActor):
    """The SSD I/O actor of pipeline `rank` (name `fuyou:p<k>:ssd-io`): owns that pipeline's store, which
    holds every unit's full params and the pipeline's element range of its fp32 master weights and Adam
    moments (`u00003.shard1of2.master`; see fuyou_ray/parallel/shards.py). No host cache.

    Lifecycle as SSDIOActor. A step's publications keep every superseded version until the commit (not
    only the params), so that any pipeline can redo any unit of an unfinished step: a data-parallel replay
    re-runs every unit on every pipeline, because the collectives need all of them. Built on SSDIOActor's
    public calls plus its store's write/publish/commit.
    """

    def __init__(self, ssd: SSDConfig, ring: RingSpec, model: ModelConfig, rank: int, world: int) -> None:
        super().__init__(ssd, ring, model)
        self.rank, self.world = rank, world
        self.paths = tuple(ssd.paths)
        self.geometry = ShardGeometry(self.spec, world)

    def _names(self, unit: int) -> list[str]:
        return [record_name(unit, RecordKind.PARAM)] + [
            shard_record(unit, kind, self.rank, self.world) for kind in OPTIMIZER_STATE
        ]

    def initialize_shard(self, seed: int, param_dtype: str, meta: Mapping[str, Any]) -> int:
        """Write a fresh model's full params and this pipeline's shard of W (the same initial weights as a
        single-pipeline store) and zero moments; commit them as step 0. Returns the bytes stored."""
        largest = max(u.numel for u in self.spec.units)
        staging = aligned_buffer(largest * 4)
        stage = torch.frombuffer(staging, dtype=torch.uint8)
        p_dtype = DTYPES[param_dtype]
        for unit in self.spec.units:
            master = self.spec.init_unit(unit.index, seed)
            lo, hi = self.geometry.range(unit.index, self.rank)
            stage[: unit.numel * p_dtype.itemsize].view(p_dtype).copy_(master)
            self.store.write_from(
                record_name(unit.index, RecordKind.PARAM),
                memoryview(staging),
                dtype=param_dtype,
                numel=unit.numel,
                version=0,
            )
            for kind in OPTIMIZER_STATE:
                view = stage[: (hi - lo) * 4].view(torch.float32)
                if kind == RecordKind.MASTER:
                    view.copy_(master[lo:hi])
                else:
                    view.zero_()
                self.store.write_from(
                    shard_record(unit.index, kind, self.rank, self.world),
                    memoryview(staging),
                    dtype="float32",
                    numel=hi - lo,
                    version=0,
                )
            del master
        self.store.commit(0, meta)
        return int(self.stats()["bytes_stored"])

    def publish(self, unit: int, version: int, step_key: str, *after: object) -> int:
        """Make unit `unit`'s new params and optimizer shard durable as part of step `version`; every
        version they supersede stays until the commit (see the class docstring)."""
        names = self._names(unit)
        with self._io():
            self.store.publish(version, names, {"step_key": step_key}, keep_previous=names)
        return unit

    def state(self) -> dict[str, Any]:
        """What the driver reconciles the job's stores with (fuyou_ray/parallel/commit.py: StoreState)."""
        committed, meta = self.committed()
        pending = self.pending()
        return {
            "rank": self.rank,
            "paths": list(self.paths),
            "committed": committed,
            "meta": meta,
            "pending_step": pending[0] if pending else None,
            "pending_units": pending[1] if pending else [],
            "pending_key": pending[2].get("step_key") if pending else None,
        }

    def prepare(self, step: int, step_key: str, summary: Mapping[str, float], *after: object) -> int:
        """Phase 1 of the job's commit: vote that step `step` is whole in this store (every unit published
        under `step_key`) and its loss finite. A non-finite step is discarded, as SSDIOActor.commit does."""
        bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
        committed, _ = self.committed()
        if bad:
            self.store.discard_staged()
            raise NonFiniteStepError(
                f"step {step} produced non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                f"nothing was committed (the run stays at step {committed}). "
                "Lower optimizer.lr or check the data."
            )
        if committed == step:
            return step  # committed already (a repeated vote after the commit)
        pending = self.pending()
        if pending is None or pending[0] != step or pending[2].get("step_key") != step_key:
            raise RunStateError(f"pipeline {self.rank}: step {step} was not published under this step's key")
        if len(pending[1]) != self.spec.num_units:
            raise RunStateError(
                f"pipeline {self.rank}: only units {pending[1]} of step {step} are published; cannot commit"
            )
        return step


class GradCommActor:
    """Pipeline `rank`'s member of the job's gloo group (name `fuyou:p<k>:grad-comm`); owns its ring.

    Lifecycle: the constructor removes ring segments left by dead processes on this node and creates the
    pipeline's ring in /dev/shm, under the name the driver chose or one of its own (the other actors of the
    pipeline map it); `rendezvous` (rank 0) opens the
    group's TCP store and `connect` (every rank, at once) joins the group; per step, `start_step`, then
    `reduce_scatter` per unit as its gradient leaves the device, `clip_coefficient` once (with exact
    clipping), `all_gather` per updated unit and `step_summary` - in the same order on every pipeline, which
    the schedule guarantees. `shutdown` leaves the group and removes the ring. Collectives block, so this
    actor runs one call at a time, in order; it is never restarted on its own (the driver rebuilds every
    pipeline after a failure).
    """

    def __init__(
        self,
        rank: int,
        world: int,
        model: ModelConfig,
        slot_bytes: int,
        num_slots: int,
        ring: RingSpec | None = None,
    ) -> None:
        self.log = setup_logging(f"grad-comm-{rank}")
        self.memory = MemoryMeter(f"grad-comm-{rank}")
        self.rank, self.world = rank, world
        self.geometry = ShardGeometry(ModelSpec(model), world)
        remove_stale_segments()  # of dead runs on this node (segment names carry their creator's pid)
        # The ring the driver named, else one named after this process.
        self.ring_owner = Ring(ring or make_spec(slot_bytes, num_slots))
        self.ring = RingMapping(self.ring_owner.spec)
        self.timeline = Timeline()
        largest = max(self.geometry.size(u, rank) for u in range(len(self.geometry.numels)))
        self._out = torch.empty(largest, dtype=torch.float32)  # the reduce-scatter's landing buffer
        self._store: Any = None
        self._connected = False
        self._step = -1
        self._sumsq: dict[int, float] = {}
        self._norm: float | None = None

    def ring_spec(self) -> RingSpec:
        return self.ring_owner.spec

    # ------------------------------------------------------------------------------ the group

    def rendezvous(self, host: str) -> int:
        """(rank 0) Open the group's TCP store on a free port of `host`; returns the port."""
        import torch.distributed as dist

        self._store = dist.TCPStore(host, 0, self.world, True, wait_for_workers=False)
        return int(self._store.port)

    def connect(self, host: str, port: int, timeout_s: float, loopback: bool) -> int:
        """Join the job's gloo group (blocks until every pipeline has joined). `loopback`: every pipeline
        is on this node, so gloo talks over the loopback interface only."""
        import torch.distributed as dist

        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if self._store is None:
            self._store = dist.TCPStore(host, port, self.world, False, timeout=timeout)
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore("fuyou-dp", self._store),
            rank=self.rank,
            world_size=self.world,
            timeout=timeout,
        )
        self._connected = True
        self.log.info("joined the gloo group as pipeline %d of %d", self.rank, self.world)
        return self.rank

    # ------------------------------------------------------------------------------ the step

    def start_step(self, step: int, *after: object) -> int:
        self._step = step
        self._sumsq = {}
        self._norm = None
        return step

    def _agree(self, kind: str, unit: int) -> None:
        """Check that every pipeline is at the same collective (step, kind, unit) before exchanging data.

        Collectives match by their order alone; a pipeline whose call failed upstream skips it, and the
        next data exchanged would belong to different collectives - wrong data that a unit could publish.
        This small all-gather costs one round trip per collective and makes that a named error."""
        import torch.distributed as dist

        mine = torch.tensor([self._step, COLLECTIVES.index(kind), unit], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if any(not torch.equal(t, mine) for t in every):
            seen = [tuple(int(x) for x in t) for t in every]
            raise CollectiveMismatchError(
                f"pipeline {self.rank} is at collective {(self._step, kind, unit)} but the pipelines are at "
                f"{seen} (step, kind, unit): a pipeline's step failed; the step is abandoned"
            )

    def reduce_scatter(self, unit: int, grad: SlotHandle, *after: object) -> SlotHandle:
        """Sum this unit's gradient over the pipelines, keeping this pipeline's range: on return the slot
        holds that range (fp32) from its start, under the shard's gradient record name."""
        import torch.distributed as dist

        full = self.ring.tensor(grad)
        lo, hi = self.geometry.range(unit, self.rank)
        out = self._out[: hi - lo]
        self._agree("reduce_scatter", unit)
        with self.timeline.span("comm", f"reduce-scatter {unit}", grad.nbytes):
            dist.reduce_scatter(out, [full[a:b] for a, b in self.geometry.bounds[unit]])
            full[: hi - lo].copy_(out)
        # The global norm is the root of the sum over units and pipelines of each range's squared norm.
        self._sumsq[unit] = float(torch.linalg.vector_norm(out)) ** 2
        return grad.carrying(
            shard_record(unit, RecordKind.GRAD, self.rank, self.world), "float32", hi - lo, grad.version
        )

    def clip_coefficient(self, max_norm: float, *after: object) -> float:
        """clip_grad_norm_'s coefficient from the global norm of the summed gradients (call after every
        unit's reduce_scatter)."""
        return clip_coefficient(max_norm, torch.tensor(self._global_norm(), dtype=torch.float32))

    def all_gather(self, unit: int, params: SlotHandle, *after: object) -> SlotHandle:
        """Fill in the other pipelines' ranges of a unit's new params (this pipeline's range is in the
        slot already): a broadcast from each pipeline, in place, since gloo gathers equal sizes only."""
        import torch.distributed as dist

        raw = self.ring.raw(params)
        size = DTYPES[params.dtype].itemsize
        self._agree("all_gather", unit)
        with self.timeline.span("comm", f"all-gather {unit}", params.nbytes):
            for k, (a, b) in enumerate(self.geometry.bounds[unit]):
                dist.broadcast(raw[a * size : b * size], src=k)
        return params

    def step_summary(self, local: Mapping[str, float], *after: object) -> dict[str, float]:
        """The job's loss (sum of the pipelines' parts) and global gradient norm."""
        import torch.distributed as dist

        # fp32, as the compute actor sums micro-batch losses: with 2 pipelines and no accumulation inside
        # them, the job's loss is the single pipeline's bit for bit.
        loss = torch.tensor([float(local["loss"])], dtype=torch.float32)
        self._agree("summary", -1)
        dist.all_reduce(loss)
        return {"loss": float(loss[0]), "grad_norm": self._global_norm()}

    def _global_norm(self) -> float:
        if self._norm is None:
            import torch.distributed as dist

            total = torch.tensor([math.fsum(self._sumsq.values())], dtype=torch.float64)
            self._agree("clip", -1)
            dist.all_reduce(total)
            self._norm = math.sqrt(float(total[0]))
        return self._norm

    # ------------------------------------------------------------------------------ the rest

    def pid(self) -> int:
        return os.getpid()

    def drain_timeline(self) -> list[Span]:
        return self.timeline.drain()

    def memory_report(self) -> MemoryReport:
        return self.memory.report()

    def reset_memory_baseline(self) -> None:
        self.memory.reset()

    def shutdown(self) -> None:
        """Leave the group, unmap and remove the ring."""
        if self._connected:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._connected = False
        self.ring.close()
        self.ring_owner.close()
