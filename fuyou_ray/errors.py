"""Named errors a run can stop with. Each message says what is wrong and how to fix it."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class FuyouError(RuntimeError):
    """Base class of fuyou-ray's own errors (the CLI prints these as one line and exits non-zero)."""


class BudgetError(FuyouError):
    """The memory budgets cannot hold what the model needs; the message says how much would."""


class NonFiniteStepError(FuyouError):
    """A step's loss or gradient norm was NaN/inf; the step was discarded, not committed."""


class RunStateError(FuyouError):
    """The run dir or store belongs to a different model/config, or is otherwise unusable."""


class ActorFailureError(FuyouError):
    """An actor died and could not be brought back (its restart failed); the message carries its error."""


class RestartLimitError(FuyouError):
    """Actors kept dying: more restarts in the window than runtime.max_restarts allows."""


class ForwardLostError(FuyouError):
    """The GPU actor no longer holds the forward pass the previous step ran ahead for this one (it was
    restarted between the steps); the driver runs the step again with its own forward."""


class SnapshotError(FuyouError):
    """A run checkpoint (fuyou_ray/checkpoint.py) cannot be taken, listed or restored: missing, damaged, or
    of another model. (Hugging Face checkpoints have their own error in safetensors_io.)"""


def find_cause(exc: BaseException, cls: type[E]) -> E | None:
    """The innermost exception of type `cls` in `exc`'s chain, or None. Ray's task errors keep the error an
    actor raised as `cause` (and are themselves subclasses of it); Python chains keep `__cause__`."""
    seen: set[int] = set()
    found: E | None = None
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, cls):
            found = current
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
    return found
