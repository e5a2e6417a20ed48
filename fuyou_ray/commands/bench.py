"""`fuyou-ray bench CONFIG`: component rates, N pipeline steps, and efficiency against the bound."""

from __future__ import annotations

import argparse
from typing import Any

from fuyou_ray.commands.common import add_config_args
from fuyou_ray.config import load_config

EPILOG = """examples:
  fuyou-ray bench configs/bench/gpt3-1.3b.yaml
  fuyou-ray bench configs/bench/gpt3-13b-width.yaml --steps 3 --set ssd.paths=[/mnt/nvme0/fy,/mnt/nvme1/fy]
writes bench.json and timeline.png to the run dir."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure the machine and the pipeline against its hardware bound",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps run before measuring (default 1; 2 with a host cache, whose first two steps after a "
        "start read cold records from SSD and fill fresh /dev/shm pages)",
    )
    p.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.bench import format_table, run_bench

    cfg = load_config(args.config, args.overrides)
    result = run_bench(cfg, warmup=args.warmup, steps=args.steps)
    print(format_table(result))
    print(f"wrote {cfg.run_dir}/bench.json and timeline.png")
    return 0
