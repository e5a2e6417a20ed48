"""`fuyou-ray generate RUN_DIR --prompt TEXT`: continue a prompt with the run's committed weights."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  fuyou-ray generate runs/demo --prompt "The " --max-new-tokens 100
  fuyou-ray generate runs/llama8b --prompt "Name three rivers." --chat --temperature 0.7 --top-p 0.9
weights stream from the store layer by layer (slow for big models: it is a quick look, not a server)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a run's committed weights",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn (chat template)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.config import ConfigError
    from fuyou_ray.generate import SamplingConfig, generate_text
    from fuyou_ray.hf import checkpoint_errors_as_config_errors

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    with checkpoint_errors_as_config_errors():
        text = generate_text(args.run_dir, args.prompt, sampling, chat=args.chat, device=args.device)
    print(text)
    return 0
