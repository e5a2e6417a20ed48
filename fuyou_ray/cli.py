"""The `fuyou-ray` command line (also `python -m fuyou_ray`).

Exit codes: 0 success; 2 invalid config or arguments; 3 budgets too small; 4 unusable run dir or store
(wrong model, corruption, SSD path problems); 5 a step produced NaN/inf (nothing committed); 1 anything else.
Errors print as one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from fuyou_ray.config import ConfigError, load_config
from fuyou_ray.data import DataError
from fuyou_ray.errors import BudgetError, NonFiniteStepError, RunStateError
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
]

EPILOG_TRAIN = """examples:
  fuyou-ray train configs/demo.yaml
  fuyou-ray train configs/demo.yaml --set steps=100 --set optimizer.lr=1e-3
  RAY_ADDRESS=auto fuyou-ray train configs/gpt3-13b-4090.yaml      # join a running `ray start --head`
  ray job submit --working-dir . -- fuyou-ray train configs/demo.yaml
re-running the same command resumes from the last committed step."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set batch.global_batch=32 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from fuyou_ray.driver import train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from fuyou_ray.models import ModelSpec
        from fuyou_ray.plan import make_plan

        plan = make_plan(cfg, ModelSpec(cfg.model))
        print(json.dumps({"config": cfg.to_dict(), "plan": plan.to_dict()}, indent=2))
        return 0
    result = train(cfg, stop_after=args.stop_after, executor=args.executor)
    last = result.steps[-1] if result.steps else None
    loss = f", loss {last.loss:.4f}" if last else ""
    print(f"done: committed step {result.final_step}/{cfg.steps}{loss}; run dir {result.run_dir}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fuyou_ray.inspect import describe_run

    print(json.dumps(describe_run(args.run_dir), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuyou-ray",
        description="Fine-tune huge language models on one GPU with NVMe SSDs (Fuyou on Ray).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train or resume a run",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop once step N is committed")
    p.add_argument(
        "--executor",
        choices=["ray", "local"],
        default=None,
        help="ray (default): actors in Ray; local: everything in this process (debugging)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the config, print the plan, start nothing"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "inspect",
        help="summarise a run dir",
        epilog="example:\n  fuyou-ray inspect runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_inspect)
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
