"""`fuyou-ray inspect RUN_DIR`: summarise a run dir."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise a run dir",
        epilog="example:\n  fuyou-ray inspect runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.inspect import describe_run

    print(json.dumps(describe_run(args.run_dir), indent=2))
    return 0
