"""Executors run a `StepSchedule` on the actors: through Ray, or in this process (tests, debugging).

Both create the same actor classes from `actors/` and run the same schedule; only the transport differs.
`RayExecutor` names its actors `fuyou:<role>` (visible on the dashboard) and passes each op's dependencies
as ObjectRef arguments, so Ray starts an op when its inputs are ready without a round trip through the
driver. `LocalExecutor` calls the methods directly, in schedule order.

Health (used by fuyou_ray/supervisor.py): Ray restarts a dead actor without limit (`max_restarts=-1`; the
supervisor counts restarts and decides when to stop) and never retries a call (`max_task_retries=0`: the
supervisor replays the whole step instead). `wait_step` watches a step's progress and restarts the actors
of a hung step; `wait_alive` waits for restarted actors and reports one whose restart failed.

Start-up and restarts fail the same way. A constructor (mapping the ring; the SSD actor opening the store)
that raises leaves the actor dead - Ray does not restart it - and its error is raised here under its own
name (`init_error`): a corrupted store stops a Ray run as it stops one in process. A process that dies
while constructing is restarted by Ray; those restarts are counted while waiting (`on_restart`), so an
actor that keeps dying in its constructor stops the run with RestartLimitError instead of looping.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fuyou_ray.config import RunConfig
from fuyou_ray.errors import ActorFailureError, FuyouError, RestartLimitError
from fuyou_ray.plan import Plan
from fuyou_ray.ring import RingSpec
from fuyou_ray.schedule import SSD_ACTOR_CONCURRENCY, Ref, StepSchedule


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
    from fuyou_ray.cache import cache_spec

    cfg, plan = setup.config, setup.plan
    if role == "gpu":
        return GPUComputeActor, (cfg.model, setup.ring, plan.device, plan.param_dtype, plan.parked_inputs)
    if role == "ssd":
        return SSDIOActor, (
            cfg.ssd,
            setup.ring,
            cfg.model,
            cache_spec(plan, setup.ring, cfg.runtime.cache_flush_every, cfg.runtime.cache_threads),
        )
    if role.startswith("opt"):
        return CPUOptimizerActor, (setup.ring, int(role[3:]), plan.optimizer_threads, cfg.runtime.adam_kernel)
    raise ValueError(f"unknown actor role {role!r}")


log = logging.getLogger("fuyou.executor")

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
    def shutdown(self, graceful: bool = True) -> None: ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an error or an interrupt: stop the actors now rather than wait for their calls.
        self.shutdown(graceful=exc_type is None)

    # ------------------------------------------------------------------------------------ health
    # In process, actors cannot die apart from the driver, and a hang is the driver's own.

    def wait_step(self, sched: StepSchedule, futures: list[Any], hang_timeout_s: float) -> None:
        """Return once the step's commit has finished (or failed); restart the actors of a hung step."""
        return None

    def settle(self, futures: list[Any], timeout_s: float) -> None:
        """Wait (at most timeout_s) until every call of a failed step has finished or failed."""
        return None

    def ask(self, role: str, method: str, *args: Any, timeout_s: float = 0.0) -> Any:
        """A control call (not part of a step's schedule) and its answer. Through Ray, an actor that does not
        answer within timeout_s (0 = no limit) is restarted and ActorHungError raised."""
        return self.get(self.call(role, method, *args))

    def is_actor_failure(self, exc: BaseException) -> bool:
        """Whether `exc` means an actor died or hung (the step is replayed) rather than an error raised
        by the actors' own code (the run stops with it)."""
        return False

    def wait_alive(
        self,
        timeout_s: float,
        hang_timeout_s: float = 0.0,
        on_restart: Callable[[list[str]], None] | None = None,
    ) -> None:
        """Wait until every actor answers again; ActorFailureError (or the named error its constructor
        raised) if one cannot be brought back. An actor that is up but does not answer within hang_timeout_s
        (0 = no limit) is restarted. Restarts seen while waiting (an actor dying again in its constructor)
        are passed to `on_restart` as they happen; it may raise to stop the wait."""
        return None

    def restarted_roles(self) -> list[str]:
        """Roles restarted since the last look, here or in `wait_alive` (a role twice if it restarted
        twice); a restarted actor's memory baseline is taken again."""
        return []

    def pids(self) -> dict[str, int]:
        """The process id of each role's actor."""
        import os

        return dict.fromkeys(self.roles, os.getpid())

    def kill(self, role: str) -> None:
        """Kill a role's actor so that it restarts (what a hang or a test's fault injection does)."""
        raise NotImplementedError("in-process actors cannot be killed on their own")


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

    def shutdown(self, graceful: bool = True) -> None:
        for actor in self.actors.values():
            actor.shutdown()
        self.actors.clear()


class ActorHungError(FuyouError):
    """No call of a step finished for runtime.hang_timeout_s; the busy actors were restarted."""


class RayExecutor(Executor):
    """The run's actors as named Ray actors, restarted by Ray when they die; calls return ObjectRefs.

    Lifecycle: the constructor creates every actor and waits until each is ready; `shutdown()` (also on
    `with` exit) stops them - gracefully after a normal end (each closes its ring mapping, the SSD actor
    drains its I/O, drops what an unfinished step staged and releases the store), at once after an error
    or an interrupt - and kills them, so no actor outlives the run.
    """

    TICK_S = 0.5  # how often a waiting step looks at its progress
    GRACE_S = 30.0  # a graceful shutdown's wait for each actor

    def __init__(self, setup: ActorSetup, *, ready_timeout_s: float = 300.0) -> None:
        import ray

        super().__init__(setup)
        self.ray = ray
        self.handles: dict[str, Any] = {}
        plan = setup.plan
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
                # Ray restarts a dead actor every time; the supervisor counts restarts and stops the run
                # after runtime.max_restarts in runtime.restart_window_s.
                "max_restarts": -1,
                # Never re-run a call on its own: calls update ring slots in place. The supervisor replays
                # the whole step instead, from state read again from the SSD.
                "max_task_retries": 0,
                "num_cpus": 0,
                "runtime_env": {"env_vars": dict(ACTOR_ENV)},
            }
            if role == "gpu":
                options["num_gpus"] = 1 if plan.device == "cuda" else 0
            elif role == "ssd":
                # reads and writes of different slots run at once
                options["max_concurrency"] = SSD_ACTOR_CONCURRENCY
            else:
                # Ray sets OMP_NUM_THREADS from num_cpus; the actor also sets torch's thread count itself.
                options["num_cpus"] = pool_cpus
            self.handles[role] = ray.remote(cls).options(**options).remote(*args)
        self._restarts = dict.fromkeys(self.handles, 0)  # restarts seen so far, per role
        self._unmeasured: set[str] = set()  # restarted roles whose memory baseline is still to be taken
        self._started = False
        try:
            self._wait_started(ready_timeout_s)
        except BaseException:
            self.shutdown(graceful=False)
            raise
        self._started = True

    def _wait_started(self, timeout_s: float) -> None:
        """Wait until every actor is constructed, then take each one's memory baseline. A process that
        dies while starting is restarted by Ray up to runtime.max_restarts times in all; one more stops
        the start with RestartLimitError (nothing has been written to the store yet)."""
        limit = self.setup.config.runtime.max_restarts
        died: list[str] = []

        def count(roles: list[str]) -> None:
            died.extend(roles)
            if len(died) > limit:
                who = ", ".join(sorted({display_name(r) for r in died}))
                raise RestartLimitError(
                    f"{len(died)} actor restarts while starting the run ({who}), more than "
                    f"runtime.max_restarts = {limit}: the process dies in its constructor (importing torch, "
                    "mapping the ring, opening the store; out of memory?). The store is untouched: see the "
                    "actor's log in the Ray session's logs dir, fix the cause and re-run"
                )

        deadline = time.monotonic() + timeout_s
        while True:
            self.wait_alive(max(1.0, deadline - time.monotonic()), on_restart=count)
            try:
                # Memory is accounted from here: the workers have started their own threads and buffers.
                refs = [h.reset_memory_baseline.remote() for h in self.handles.values()]
                self.ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
            except self.ray.exceptions.RayActorError:
                continue  # one died just after starting: wait for its restart
            except self.ray.exceptions.GetTimeoutError as exc:
                raise ActorFailureError(f"the run's actors did not start within {timeout_s:.0f} s") from exc
            if new := self._new_restarts():
                count(new)
                continue
            self._unmeasured.clear()
            return

    def call(self, role: str, method: str, *args: Any) -> Any:
        return getattr(self.handles[role], method).remote(*args)

    def get(self, future: Any, timeout: float | None = None) -> Any:
        return self.ray.get(future, timeout=timeout)

    # ------------------------------------------------------------------------------------ health

    def wait_step(self, sched: StepSchedule, futures: list[Any], hang_timeout_s: float) -> None:
        ray = self.ray
        target = [futures[sched.commit]]
        index = {ref: i for i, ref in enumerate(futures)}
        pending, finished = list(futures), set[int]()
        last_progress = time.monotonic()
        while True:
            ready, _ = ray.wait(target, timeout=self.TICK_S, fetch_local=False)
            if ready:
                return
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            now = time.monotonic()
            if done:
                finished.update(index[ref] for ref in done)
                last_progress = now
            elif hang_timeout_s > 0 and now - last_progress > hang_timeout_s:
                stuck = _busy_roles(sched, finished)
                for role in stuck:
                    self.kill(role)
                raise ActorHungError(
                    f"no call of the step finished for {hang_timeout_s:.0f} s (runtime.hang_timeout_s); "
                    f"restarted {', '.join(display_name(r) for r in stuck)}"
                )

    def ask(self, role: str, method: str, *args: Any, timeout_s: float = 0.0) -> Any:
        from ray.exceptions import GetTimeoutError

        try:
            return self.ray.get(self.call(role, method, *args), timeout=timeout_s or None)
        except GetTimeoutError as exc:
            self.kill(role)
            raise ActorHungError(
                f"{display_name(role)} did not answer {method} within {timeout_s:.0f} s "
                "(runtime.hang_timeout_s); restarted it"
            ) from exc

    def settle(self, futures: list[Any], timeout_s: float) -> None:
        if futures:
            self.ray.wait(futures, num_returns=len(futures), timeout=timeout_s, fetch_local=False)

    def is_actor_failure(self, exc: BaseException) -> bool:
        from ray import exceptions as rex

        transient = (
            rex.RayActorError,  # died, or unreachable while it restarts (ActorUnavailableError)
            rex.WorkerCrashedError,
            rex.ObjectLostError,  # a result lost with the process that held it
            rex.OwnerDiedError,
            ActorHungError,
        )
        final = tuple(_named_errors().values())
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            if isinstance(current, transient):
                return True
            if isinstance(current, final) and not isinstance(current, rex.RayError):
                # fuyou-ray's own verdict, e.g. the error a constructor raised, chained to the Ray error
                # that carried it: final, not a failure to recover from.
                return False
            seen.add(id(current))
            wrapped = getattr(current, "cause", None)
            current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
        return False

    def wait_alive(
        self,
        timeout_s: float,
        hang_timeout_s: float = 0.0,
        on_restart: Callable[[list[str]], None] | None = None,
    ) -> None:
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout_s
        for role, handle in self.handles.items():
            ready, since = handle.__ray_ready__.remote(), time.monotonic()
            while True:
                if on_restart is not None and (new := self._new_restarts()):
                    on_restart(new)
                now = time.monotonic()
                if now >= deadline:
                    what = "came up" if self._started else "started"
                    raise ActorFailureError(f"{display_name(role)} never {what} within {timeout_s:.0f} s")
                done, _ = self.ray.wait([ready], timeout=min(self.TICK_S, deadline - now), fetch_local=False)
                if done:
                    try:
                        self.ray.get(ready)
                        break
                    except RayActorError as exc:
                        # A constructor that raised, or a death Ray will not restart, is final; otherwise
                        # the actor died again while we waited and Ray is restarting it.
                        if exc.actor_init_failed or self._actor_info(role).get("State") == "DEAD":
                            raise init_error(role, exc, restart=self._started) from exc
                        time.sleep(0.2)
                        ready, since = handle.__ray_ready__.remote(), time.monotonic()
                        continue
                # Restarting (importing, opening the store) takes its time; alive but silent is a hang.
                stuck = hang_timeout_s > 0 and time.monotonic() - since > hang_timeout_s
                if stuck and self._actor_info(role).get("State") == "ALIVE":
                    self.kill(role)
                    ready, since = handle.__ray_ready__.remote(), time.monotonic()

    def restarted_roles(self) -> list[str]:
        restarted = self._new_restarts()
        for role in sorted(self._unmeasured):
            # A restarted process measures its memory from its own start; warm its I/O threads first.
            with contextlib.suppress(Exception):
                self.ray.get(self.handles[role].reset_memory_baseline.remote(), timeout=60)
        self._unmeasured.clear()
        return restarted

    def _new_restarts(self) -> list[str]:
        """Roles restarted since the last look (a role twice if it restarted twice)."""
        new = []
        for role, n in self._restart_counts().items():
            seen = self._restarts.get(role, 0)
            new += [role] * max(0, n - seen)
            self._restarts[role] = max(n, seen)  # an unanswered query reads 0: never count twice
        self._unmeasured.update(new)
        return new

    def _actor_info(self, role: str) -> dict[str, Any]:
        """The GCS's record of a role's actor (state, pid, restarts)."""
        from ray._private import state

        try:
            return dict(state.actors(actor_id=self.handles[role]._actor_id.hex()) or {})
        except Exception:  # a private API: degrade to "unknown" rather than fail the run
            return {}

    def _restart_counts(self) -> dict[str, int]:
        return {role: int(self._actor_info(role).get("NumRestarts", 0)) for role in self.handles}

    def pids(self) -> dict[str, int]:
        out = {}
        for role, handle in self.handles.items():
            pid = self._actor_info(role).get("Pid")
            if not pid:
                pid = self.ray.get(handle.__ray_call__.remote(_getpid), timeout=60)
            out[role] = int(pid)
        return out

    def kill(self, role: str) -> None:
        log.warning("killing %s so that Ray restarts it", display_name(role))
        self.ray.kill(self.handles[role], no_restart=False)

    # ------------------------------------------------------------------------------------ shutdown

    def shutdown(self, graceful: bool = True) -> None:
        ray = self.ray
        # The SSD actor goes last: the others stop producing first, then it drains what is in flight,
        # drops what an unfinished step staged, and releases the store.
        order = [r for r in self.handles if r != "ssd"] + (["ssd"] if "ssd" in self.handles else [])
        for role in order:
            handle = self.handles[role]
            if graceful or role == "ssd":
                # A dead actor has nothing left to close; it is killed regardless.
                with contextlib.suppress(Exception):
                    ray.get(handle.shutdown.remote(), timeout=self.GRACE_S if graceful else 10.0)
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.handles.clear()


def _busy_roles(sched: StepSchedule, finished: set[int]) -> list[str]:
    """Roles of the unfinished calls whose inputs are all there: the ones that should be running."""
    busy = []
    for op in sched.ops:
        if op.id in finished:
            continue
        deps = [a.op for a in op.args if isinstance(a, Ref)] + list(op.after)
        if all(d in finished for d in deps) and op.actor not in busy:
            busy.append(op.actor)
    return busy or sorted({op.actor for op in sched.ops if op.id not in finished})


def init_error(role: str, exc: BaseException, *, restart: bool) -> Exception:
    """The error that ended an actor's constructor, raised in the driver. Ray keeps only its text; where its
    class is one of fuyou-ray's named errors (a corrupted or busy store, a missing ring segment ...), the
    same class is raised here, so the run stops as it would in process (and the CLI exits with the same
    code); otherwise ActorFailureError with the error's last line."""
    line = _last_error_line(exc)
    what = f"{display_name(role)} {'could not be restarted' if restart else 'could not start'}"
    name, sep, message = line.partition(": ")
    cls = _named_errors().get(name.rsplit(".", 1)[-1]) if sep and " " not in name else None
    if cls is not None:
        with contextlib.suppress(Exception):
            return cls(f"{what}: {message}")
    return ActorFailureError(f"{what}: {line}")


def _named_errors() -> dict[str, type[Exception]]:
    """fuyou-ray's named error classes by name (those the CLI maps to an exit code, and their subclasses)."""
    from fuyou_ray.config import ConfigError
    from fuyou_ray.ring import RingError
    from fuyou_ray.store import StoreError

    found: dict[str, type[Exception]] = {}
    stack: list[type[Exception]] = [FuyouError, StoreError, RingError, ConfigError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return found


def _last_error_line(exc: BaseException) -> str:
    """The `SomeError: message` line of a Ray error that carries a remote traceback as text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _getpid(actor: object) -> int:
    import os

    return os.getpid()


def _cluster_cpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("CPU", 0))
