"""`fuyou-ray train CONFIG`: train or resume a run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fuyou_ray.commands.common import add_config_args
from fuyou_ray.config import load_config

EPILOG = """examples:
  fuyou-ray train configs/demo.yaml
  fuyou-ray train configs/demo.yaml --set steps=100 --set optimizer.lr=1e-3
  RAY_ADDRESS=auto fuyou-ray train configs/demo.yaml           # join a running `ray start --head`
  ray job submit --working-dir . -- fuyou-ray train configs/demo.yaml
re-running the same command resumes from the last committed step."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train or resume a run",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.driver import train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from fuyou_ray.models import ModelSpec
        from fuyou_ray.plan import make_plan

        # Planned for the configured device, so a GPU run can be planned on a machine without the GPU.
        device = "cuda" if cfg.runtime.device == "cuda" else None
        plan = make_plan(cfg, ModelSpec(cfg.model), device=device)
        print(json.dumps({"config": cfg.to_dict(), "plan": plan.to_dict()}, indent=2))
        return 0
    result = train(cfg, stop_after=args.stop_after, executor=args.executor)
    last = result.steps[-1] if result.steps else None
    loss = f", loss {last.loss:.4f}" if last else ""
    print(f"done: committed step {result.final_step}/{cfg.steps}{loss}; run dir {result.run_dir}")
    return 0
