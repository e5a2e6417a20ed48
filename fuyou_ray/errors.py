"""Named errors a run can stop with. Each message says what is wrong and how to fix it."""

from __future__ import annotations


class FuyouError(RuntimeError):
    """Base class of fuyou-ray's own errors (the CLI prints these as one line and exits non-zero)."""


class BudgetError(FuyouError):
    """The memory budgets cannot hold what the model needs; the message says how much would."""


class NonFiniteStepError(FuyouError):
    """A step's loss or gradient norm was NaN/inf; the step was discarded, not committed."""


class RunStateError(FuyouError):
    """The run dir or store belongs to a different model/config, or is otherwise unusable."""
