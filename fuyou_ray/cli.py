"""The `fuyou-ray` command line (also `python -m fuyou_ray`). Subcommands live in fuyou_ray/commands/.

Exit codes: 0 success; 2 invalid config or arguments; 3 budgets too small; 4 unusable run dir or store
(wrong model, corruption, SSD path problems); 5 a step produced NaN/inf (nothing committed); 6 actors kept
failing (restart limit, or a restart failed); 1 anything else.
Errors print as one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from fuyou_ray.commands import COMMANDS
from fuyou_ray.config import ConfigError
from fuyou_ray.data import DataError
from fuyou_ray.errors import (
    ActorFailureError,
    BudgetError,
    NonFiniteStepError,
    RestartLimitError,
    RunStateError,
    SnapshotError,
)
from fuyou_ray.ring import RingError
from fuyou_ray.store import StoreError

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, 2),
    (DataError, 2),
    (BudgetError, 3),
    (RingError, 3),
    (RunStateError, 4),
    (StoreError, 4),
    (NonFiniteStepError, 5),
    (SnapshotError, 4),
    (RestartLimitError, 6),
    (ActorFailureError, 6),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuyou-ray",
        description="Fine-tune huge language models on one GPU with NVMe SSDs (Fuyou on Ray).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fuyou_ray.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("fuyou-ray: interrupted; the run resumes from its last committed step", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = _root_cause(exc)
        for cls, code in EXIT_CODES:
            if isinstance(cause, cls):
                print(f"fuyou-ray: error: {cause}", file=sys.stderr)
                return code
        raise


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's task errors to the exception an actor raised."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return _root_cause(cause)
    return exc


if __name__ == "__main__":
    sys.exit(main())
