"""`fuyou-ray checkpoint RUN_DIR`: take, list, prune and restore checkpoints of a stopped run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """examples:
  fuyou-ray checkpoint runs/demo                    # checkpoint the last committed step
  fuyou-ray checkpoint runs/demo --list
  fuyou-ray checkpoint runs/demo --restore latest   # then: fuyou-ray train <config> resumes from it
  fuyou-ray checkpoint runs/demo --keep 1           # checkpoint, then delete all but the newest
during a run, checkpoint.every / checkpoint.keep in the config take them automatically."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="take, list or restore checkpoints of a run",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the run's checkpoints")
    what.add_argument("--restore", metavar="NAME", help="make checkpoint NAME ('latest') the committed state")
    p.add_argument(
        "--keep", type=int, default=None, metavar="N", help="then keep the newest N (checkpoint.keep)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray import checkpoint
    from fuyou_ray.errors import SnapshotError
    from fuyou_ray.inspect import load_run_config
    from fuyou_ray.store import SSDTensorStore

    cfg = load_run_config(args.run_dir)
    paths = list(cfg.ssd.paths)
    keep = cfg.checkpoint.keep if args.keep is None else args.keep
    if keep < 1:
        raise SnapshotError("--keep must be >= 1")
    if args.list:
        infos = checkpoint.list_checkpoints(paths)
        print(json.dumps([i.__dict__ for i in infos], indent=2))
        return 0
    if args.restore:
        info = checkpoint.restore(paths, args.restore)
        _truncate_metrics(Path(args.run_dir) / "metrics.jsonl", info.step)
        print(f"restored {info.name}: the run resumes from step {info.step}")
        return 0
    # The store's lock refuses this while the run is training (its driver takes checkpoints itself).
    store = SSDTensorStore(paths, direct_io=cfg.ssd.direct_io)
    try:
        meta = {"data_step": store.committed_step, "seed": cfg.seed, "data_seed": cfg.data.seed}
        info = checkpoint.take(store, meta)
    finally:
        store.close()
    print(f"checkpoint {info.name} of step {info.step} in {Path(paths[0]) / checkpoint.CHECKPOINT_DIR}")
    for name in checkpoint.prune(paths, keep):
        print(f"deleted {name}")
    return 0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (they are re-made when training resumes)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
