"""Executors run a `StepSchedule` on the actors: through Ray, or in this process (tests, debugging).

Both create the same actor classes from `actors/` and run the same schedule; only the transport differs.
`RayExecutor` names its actors `fuyou:<role>` (visible on the dashboard), gives them `max_restarts`, and
passes each op's dependencies as ObjectRef arguments, so Ray starts an op when its inputs are ready without
a round trip through the driver. `LocalExecutor` calls the methods directly, in schedule order.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuyou_ray.config import RunConfig
from fuyou_ray.plan import Plan
from fuyou_ray.ring import RingSpec
from fuyou_ray.schedule import Ref, StepSchedule


@dataclass(frozen=True)
class ActorSetup:
    """Everything needed to construct the run's actors."""

    config: RunConfig
    plan: Plan
    ring: RingSpec

    def roles(self) -> list[str]:
        return ["gpu", "ssd"] + [f"opt{k}" for k in range(self.plan.optimizer_actors)]


def construct(role: str, setup: ActorSetup) -> tuple[type, tuple[Any, ...]]:
    """The actor class and constructor arguments of a role."""
    from actors.cpu_optimizer import CPUOptimizerActor
    from actors.gpu_compute import GPUComputeActor
    from actors.ssd_io import SSDIOActor

    cfg, plan = setup.config, setup.plan
    if role == "gpu":
        return GPUComputeActor, (cfg.model, setup.ring, plan.device, plan.param_dtype)
    if role == "ssd":
        return SSDIOActor, (cfg.ssd, setup.ring, cfg.model)
    if role.startswith("opt"):
        return CPUOptimizerActor, (setup.ring, int(role[3:]), plan.optimizer_threads)
    raise ValueError(f"unknown actor role {role!r}")


ROLE_NAMES = {"gpu": "gpu-compute", "ssd": "ssd-io"}

# glibc raises its mmap threshold after large frees, after which unit-sized buffers come from the heap
# and stay resident once freed; a fixed threshold keeps every large buffer mmap'd, so memory goes back to
# the OS when fuyou-ray lets go of it and a long run's RSS does not creep past its budget.
ACTOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def display_name(role: str) -> str:
    return "fuyou:" + ROLE_NAMES.get(role, f"cpu-opt-{role[3:]}" if role.startswith("opt") else role)


class Executor(abc.ABC):
    """Runs actor calls; `call` returns a future (or the value itself in process).

    Owns the run's actors from construction to `shutdown()` (also on `with` exit).
    """

    def __init__(self, setup: ActorSetup) -> None:
        self.setup = setup
        self.ring_spec = setup.ring
        self.roles = setup.roles()

    @abc.abstractmethod
    def call(self, role: str, method: str, *args: Any) -> Any: ...

    @abc.abstractmethod
    def get(self, future: Any, timeout: float | None = None) -> Any: ...

    def run(self, sched: StepSchedule) -> list[Any]:
        """Issue every op of the schedule in order; returns each op's future, indexed by op id."""
        futures: list[Any] = []
        for op in sched.ops:
            args = [futures[a.op] if isinstance(a, Ref) else a for a in op.args]
            deps = [futures[d] for d in op.after]
            futures.append(self.call(op.actor, op.method, *args, *deps))
        return futures

    def call_all(self, roles: Sequence[str], method: str, *args: Any) -> list[Any]:
        return [self.get(self.call(r, method, *args)) for r in roles]

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class LocalExecutor(Executor):
    """All actors as plain objects in this process; calls run immediately, in schedule order."""

    def __init__(self, setup: ActorSetup) -> None:
        super().__init__(setup)
        self.actors: dict[str, Any] = {}
        for role in self.roles:
            cls, args = construct(role, setup)
            self.actors[role] = cls(*args)

    def call(self, role: str, method: str, *args: Any) -> Any:
        return getattr(self.actors[role], method)(*args)

    def get(self, future: Any, timeout: float | None = None) -> Any:
        return future

    def shutdown(self) -> None:
        for actor in self.actors.values():
            actor.shutdown()
        self.actors.clear()


class RayExecutor(Executor):
    """The run's actors as named Ray actors with restarts; calls return ObjectRefs."""

    def __init__(self, setup: ActorSetup, *, ready_timeout_s: float = 300.0) -> None:
        import ray

        super().__init__(setup)
        self.ray = ray
        self.handles: dict[str, Any] = {}
        cfg, plan = setup.config, setup.plan
        # Reserve CPUs for the optimizer pool only when the cluster has them all; otherwise the last actors
        # would wait forever for resources. Threads are set by the actors themselves either way.
        pool_cpus = (
            plan.optimizer_threads
            if _cluster_cpus(ray) >= plan.optimizer_actors * plan.optimizer_threads
            else 0
        )
        for role in self.roles:
            cls, args = construct(role, setup)
            options: dict[str, Any] = {
                "name": display_name(role),
                "max_restarts": cfg.runtime.max_restarts,
                "num_cpus": 0,
                "runtime_env": {"env_vars": dict(ACTOR_ENV)},
            }
            if role == "gpu":
                options["num_gpus"] = 1 if plan.device == "cuda" else 0
            elif role == "ssd":
                options["max_concurrency"] = 4  # reads and writes of different slots run at once
            else:
                # Ray sets OMP_NUM_THREADS from num_cpus; the actor also sets torch's thread count itself.
                options["num_cpus"] = pool_cpus
            self.handles[role] = ray.remote(cls).options(**options).remote(*args)
        # Fail fast (with the actor's own error) if a constructor raised.
        deadline = time.monotonic() + ready_timeout_s
        for handle in self.handles.values():
            ray.get(handle.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
        # Memory is accounted from here: the workers have started their own threads and buffers.
        ray.get([h.reset_memory_baseline.remote() for h in self.handles.values()])

    def call(self, role: str, method: str, *args: Any) -> Any:
        return getattr(self.handles[role], method).remote(*args)

    def get(self, future: Any, timeout: float | None = None) -> Any:
        return self.ray.get(future, timeout=timeout)

    def shutdown(self) -> None:
        for handle in self.handles.values():
            # A dead actor has nothing left to close; kill it regardless.
            with contextlib.suppress(Exception):
                self.ray.get(handle.shutdown.remote(), timeout=30)
            self.ray.kill(handle, no_restart=True)
        self.handles.clear()


def _cluster_cpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("CPU", 0))
