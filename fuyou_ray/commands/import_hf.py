"""`fuyou-ray import HF_DIR RUN_DIR`: a new run from a Hugging Face checkpoint, committed as step 0."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

EPILOG = """examples:
  fuyou-ray import ~/models/Llama-3.1-8B runs/llama8b --config configs/llama3-8b-24gb.yaml
  fuyou-ray import ~/models/Qwen2.5-0.5B runs/qwen --set data.path=data/train.jsonl --set steps=200
  fuyou-ray train runs/llama8b/config.yaml          # then fine-tune: it resumes from the imported step 0
supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel (safetensors only).
The model section comes from HF_DIR/config.json; everything else from --config (or defaults, with budgets
sized to the model). Tied embeddings are trained untied (export writes both and tie_word_embeddings false).
With runtime.device cuda the params are written in bf16 even on a machine without a GPU."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="create a run from a Hugging Face checkpoint directory",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors and tokenizer files")
    p.add_argument("run_dir", help="the new run's directory (config.yaml, hf/, and by default ssd/)")
    p.add_argument("--config", default=None, help="YAML run config to take budgets, data, batch, ssd from")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set ssd.paths=[/mnt/nvme0/run] (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.config import load_config
    from fuyou_ray.hf import checkpoint_errors_as_config_errors, import_checkpoint

    base = load_config(args.config) if args.config else None
    with checkpoint_errors_as_config_errors():
        result = import_checkpoint(args.hf_dir, args.run_dir, base=base, overrides=args.overrides)
    print(json.dumps(asdict(result), indent=2))
    print(f"imported; fine-tune with: fuyou-ray train {result.config_path}")
    return 0
