"""The actors of N pipelines as one executor: placement, the gloo group, waiting for a step, shutdown.

Pipeline k is a GPU compute actor, an SSD I/O actor, an optimizer pool and a comm actor, named
`fuyou:p<k>:<role>` on the dashboard and `p<k>.<role>` in schedules. Each pipeline is one placement group
of one STRICT_PACK bundle (its GPU when the run uses CUDA, its optimizer pool's CPUs), so all of a
pipeline's actors share a node - they share its ring in /dev/shm - while Ray spreads the pipelines over the
cluster's GPUs and nodes. The comm actor creates the ring the others map (`PipelinesExecutor.__init__`
says when the others wait for it).

Failure policy: no actor is restarted on its own (`max_restarts=0`). After an actor dies or hangs, the
driver tears every pipeline down and builds them again (fuyou_ray/parallel/driver.py): the collectives of
the survivors cannot continue without the dead one, and the step replays on every pipeline anyway.

Health checks, `call`/`get`, `kill` and the failure classification are RayExecutor's; multi-node placement
(several nodes: gloo over the network instead of loopback) is written but has only been run on one node.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fuyou_ray.config import RunConfig
from fuyou_ray.executor import ACTOR_ENV, ActorHungError, RayExecutor, _busy_roles
from fuyou_ray.parallel.schedule import JobSchedule, role
from fuyou_ray.plan import Plan
from fuyou_ray.ring import SHM_DIR, RingSpec, make_spec
from fuyou_ray.schedule import SSD_ACTOR_CONCURRENCY

log = logging.getLogger("fuyou.parallel")

ROLE_NAMES = {"gpu": "gpu-compute", "ssd": "ssd-io", "comm": "grad-comm"}


@dataclass(frozen=True)
class PipelineSetup:
    """What pipeline `rank` is built from: its config (its share of the batch, its SSD paths) and plan."""

    rank: int
    world: int
    config: RunConfig
    plan: Plan

    def roles(self) -> list[str]:
        return ["comm", "gpu", "ssd"] + [f"opt{j}" for j in range(self.plan.optimizer_actors)]


def actor_name(name: str) -> str:
    """`p1.opt0` -> `fuyou:p1:cpu-opt-0` (the dashboard's name of a role)."""
    rank, _, local = name.partition(".")
    tag = ROLE_NAMES.get(local, f"cpu-opt-{local[3:]}" if local.startswith("opt") else local)
    return f"fuyou:{rank}:{tag}"


class PipelinesExecutor(RayExecutor):
    """Owns the actors and placement groups of every pipeline of a data-parallel run.

    Lifecycle: the constructor reserves a placement group per pipeline, creates each pipeline's comm actor
    (which creates the ring), then the other actors, waits until all are ready, and joins the comm actors in
    one gloo group; `shutdown()` (also on `with` exit) stops them - compute and optimizers first, then each
    SSD actor drains its I/O and releases its store, then each comm actor leaves the group and removes its
    ring - kills them and releases the placement groups. Ring segments of a comm actor that could not be
    asked are removed from here when on this node, otherwise by the next start's stale-segment sweep.

    Built on RayExecutor for its health checks; it does not call RayExecutor's constructor.
    """

    def __init__(self, pipelines: list[PipelineSetup], *, ready_timeout_s: float = 300.0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.cpu_optimizer import CPUOptimizerActor
        from fuyou_ray.parallel.actors import DPComputeActor, GradCommActor, ShardStoreActor

        self.ray = ray
        self.pipelines = pipelines
        self.handles: dict[str, Any] = {}
        self.rings: list[RingSpec] = []
        self.groups: list[Any] = []
        self.local = True
        self.roles = [role(p.rank, r) for p in pipelines for r in p.roles()]
        world, plan = len(pipelines), pipelines[0].plan
        # The pool reserves its CPUs only where the cluster has them all (as RayExecutor does).
        total = world * plan.optimizer_actors * plan.optimizer_threads
        pool_cpus = plan.optimizer_threads if ray.cluster_resources().get("CPU", 0) >= total else 0
        deadline = time.monotonic() + ready_timeout_s
        try:
            for p in pipelines:
                bundle: dict[str, float] = {"CPU": max(0.01, p.plan.optimizer_actors * pool_cpus)}
                if p.plan.device == "cuda":
                    bundle["GPU"] = 1
                group = placement_group([bundle], strategy="STRICT_PACK", name=f"fuyou:p{p.rank}")
                self.groups.append(group)
                try:
                    ray.get(group.ready(), timeout=max(1.0, deadline - time.monotonic()))
                except ray.exceptions.GetTimeoutError as exc:
                    raise RuntimeError(
                        f"pipeline {p.rank} cannot be placed: it needs {bundle} on one node and the cluster "
                        f"has {ray.available_resources()} free; lower runtime.data_parallel or add nodes"
                    ) from exc
            strategies = [
                PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=0) for g in self.groups
            ]

            def options(name: str, rank: int, **extra: Any) -> dict[str, Any]:
                return {
                    "name": actor_name(name),
                    "max_restarts": 0,
                    "max_task_retries": 0,
                    "num_cpus": 0,
                    "runtime_env": {"env_vars": dict(ACTOR_ENV)},
                    "scheduling_strategy": strategies[rank],
                    **extra,
                }

            # On one node the driver names the rings (with its pid, as a single-pipeline run does: a dead
            # run's segments are found by that pid) and the other actors start beside the comm actors; on
            # several nodes each comm actor names its ring with its own pid, on its node, first. On CUDA
            # the compute actor pins the ring when it starts, so the ring must exist before it.
            self.local = len([n for n in ray.nodes() if n.get("Alive")]) == 1
            specs = [make_spec(p.plan.slot_bytes, p.plan.num_slots) for p in pipelines] if self.local else []
            comms: list[Any] = [
                ray.remote(GradCommActor)
                .options(**options(role(p.rank, "comm"), p.rank))
                .remote(
                    p.rank,
                    world,
                    p.config.model,
                    p.plan.slot_bytes,
                    p.plan.num_slots,
                    specs[p.rank] if specs else None,
                )
                for p in pipelines
            ]
            self.handles.update({role(p.rank, "comm"): h for p, h in zip(pipelines, comms, strict=True)})
            if self.local and plan.device != "cuda":
                self.rings = specs
            else:
                left = max(1.0, deadline - time.monotonic())
                self.rings = ray.get([h.ring_spec.remote() for h in comms], timeout=left)
            for p, ring in zip(pipelines, self.rings, strict=True):
                cfg, pl = p.config, p.plan
                gpu = role(p.rank, "gpu")
                self.handles[gpu] = (
                    ray.remote(DPComputeActor)
                    .options(**options(gpu, p.rank, num_gpus=1 if pl.device == "cuda" else 0))
                    .remote(cfg.model, ring, pl.device, pl.param_dtype, pl.parked_inputs)
                )
                ssd = role(p.rank, "ssd")
                self.handles[ssd] = (
                    ray.remote(ShardStoreActor)
                    .options(**options(ssd, p.rank, max_concurrency=SSD_ACTOR_CONCURRENCY))
                    .remote(cfg.ssd, ring, cfg.model, p.rank, world)
                )
                for j in range(pl.optimizer_actors):
                    opt = role(p.rank, f"opt{j}")
                    self.handles[opt] = (
                        ray.remote(CPUOptimizerActor)
                        .options(**options(opt, p.rank, num_cpus=pool_cpus))
                        .remote(ring, j, pl.optimizer_threads, cfg.runtime.adam_kernel)
                    )
            for handle in self.handles.values():
                ray.get(handle.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
            self._connect(max(60.0, pipelines[0].config.runtime.hang_timeout_s))
            ray.get([h.reset_memory_baseline.remote() for h in self.handles.values()])
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self._restarts = self._restart_counts()

    def _connect(self, timeout_s: float) -> None:
        """Join the comm actors in one gloo group: rank 0 opens the rendezvous, then all join at once."""
        ray = self.ray
        loopback = self.local
        first = self.handles[role(0, "comm")]
        host = "127.0.0.1" if loopback else ray.get(first.__ray_call__.remote(_node_ip))
        port = ray.get(first.rendezvous.remote(host))
        ray.get(
            [
                self.handles[role(p.rank, "comm")].connect.remote(host, port, timeout_s, loopback)
                for p in self.pipelines
            ],
            timeout=timeout_s,
        )

    # ------------------------------------------------------------------------------------ the step

    def wait_prepared(self, job: JobSchedule, futures: list[Any], hang_timeout_s: float) -> None:
        """Return once every pipeline has voted (phase 1 of the commit). A failed call of any pipeline fails
        the step at once - its partners may wait in a collective that will never complete - with an actor's
        death in preference to the errors it caused elsewhere. A step in which no call finishes for
        hang_timeout_s kills the busy actors (ActorHungError)."""
        ray = self.ray
        index = {ref: i for i, ref in enumerate(futures)}
        targets = set(job.prepares)
        pending, finished = list(futures), set[int]()
        last_progress = time.monotonic()
        while not targets <= finished:
            done, pending = ray.wait(
                pending, num_returns=len(pending), timeout=self.TICK_S, fetch_local=False
            )
            now = time.monotonic()
            if done:
                finished.update(index[ref] for ref in done)
                last_progress = now
                failed = self._first_error(done)
                if failed is not None:
                    # Let the failure reach the other pipelines' calls, then report its root.
                    more, pending = ray.wait(
                        pending, num_returns=len(pending), timeout=2.0, fetch_local=False
                    )
                    raise self._first_error([*done, *more]) or failed
            elif hang_timeout_s > 0 and now - last_progress > hang_timeout_s:
                stuck = _busy_roles(job.sched, finished)
                for name in stuck:
                    self.kill(name)
                raise ActorHungError(
                    f"no call of the step finished for {hang_timeout_s:.0f} s (runtime.hang_timeout_s); "
                    f"killed {', '.join(actor_name(r) for r in stuck)}"
                )

    def _first_error(self, refs: list[Any]) -> BaseException | None:
        """The error of the first failed call among `refs`, an actor failure if there is one."""
        errors = []
        for ref in refs:
            try:
                self.ray.get(ref, timeout=0)
            except Exception as exc:
                errors.append(exc)
        actor = [e for e in errors if self.is_actor_failure(e)]
        return (actor or errors)[0] if errors else None

    def kill(self, role_name: str) -> None:
        log.warning("killing %s", actor_name(role_name))
        self.ray.kill(self.handles[role_name], no_restart=True)

    # ------------------------------------------------------------------------------------ shutdown

    def shutdown(self, graceful: bool = True) -> None:
        ray = self.ray
        order = sorted(self.handles, key=lambda r: (r.endswith(".comm"), r.endswith(".ssd")))
        for name in order:
            handle = self.handles[name]
            if graceful or name.endswith((".ssd", ".comm")):
                # The SSD actors drain their I/O and drop what an unfinished step staged; the comm actors
                # remove their rings - one blocked in a collective does not answer: see below.
                timeout = self.GRACE_S if graceful else (10.0 if name.endswith(".ssd") else 2.0)
                with contextlib.suppress(Exception):
                    ray.get(handle.shutdown.remote(), timeout=timeout)
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.handles.clear()
        for ring in self.rings:
            for segment, _ in ring.segments:
                (SHM_DIR / segment).unlink(missing_ok=True)
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self.groups.clear()

    def remove_rings(self) -> None:
        """Remove the rings' segments from this node at once (SIGTERM: `ray job stop` kills soon after)."""
        for ring in self.rings:
            for segment, _ in ring.segments:
                with contextlib.suppress(OSError):
                    (SHM_DIR / segment).unlink(missing_ok=True)


def _node_ip(actor: object) -> str:
    import ray

    return str(ray.util.get_node_ip_address())
