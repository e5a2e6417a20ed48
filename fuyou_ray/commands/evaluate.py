"""`fuyou-ray eval RUN_DIR`: held-out loss and perplexity of the run's committed weights."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

EPILOG = """examples:
  fuyou-ray eval runs/llama8b
  fuyou-ray eval runs/llama8b --batches 16
appends the result to RUN_DIR/eval.jsonl. Not while the run is training."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss / perplexity of a run's committed weights",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=None, help="eval batches (default: data.eval_batches)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.evaluate import evaluate_run

    print(json.dumps(asdict(evaluate_run(args.run_dir, args.batches, args.device)), indent=2))
    return 0
