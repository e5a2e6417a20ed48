"""`fuyou-ray export RUN_DIR OUT_DIR`: the run's committed weights as a Hugging Face model directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

EPILOG = """examples:
  fuyou-ray export runs/llama8b out/llama8b-ft
  fuyou-ray export runs/llama8b out/llama8b-ft --dtype float32 --max-shard-size 2GB
the result loads with transformers: AutoModelForCausalLM.from_pretrained("out/llama8b-ft").
Do not export while the run is training (export reads the last committed step)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's weights as a Hugging Face model directory",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the written weights (default: the imported checkpoint's, else float32)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB or 500MiB")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.config import parse_size
    from fuyou_ray.hf import checkpoint_errors_as_config_errors, export_checkpoint

    with checkpoint_errors_as_config_errors():
        result = export_checkpoint(
            args.run_dir,
            args.out_dir,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"),
            overwrite=args.overwrite,
        )
    print(json.dumps(asdict(result), indent=2))
    return 0
