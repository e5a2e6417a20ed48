"""Import a Hugging Face model, fine-tune it on a JSONL file with held-out evaluation, export it back.

    python examples/finetune_hf.py HF_DIR RUN_DIR --data train.jsonl --out OUT_DIR \
        [--config configs/llama3-8b-24gb.yaml] [--steps 200] [--eval-every 50] [--executor ray|local]
    python examples/finetune_hf.py --demo     # a tiny random Llama + generated JSONL on the CPU, ~1 minute

The same as the CLI steps:
    fuyou-ray import HF_DIR RUN_DIR --config C --set data.path=train.jsonl
    fuyou-ray train RUN_DIR/config.yaml --stop-after 50 ; fuyou-ray eval RUN_DIR ; (repeat)
    fuyou-ray export RUN_DIR OUT
Evaluation runs between training segments (`train(cfg, stop_after=...)` commits and returns; a later call
resumes from the committed step), on the fixed held-out batches, and is appended to RUN_DIR/eval.jsonl.
JSONL records: {"prompt": ..., "completion": ...} (loss on the completion), {"messages": [...]} (chat
template, loss on assistant turns) or {"text": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fuyou_ray.config import RunConfig, load_config
from fuyou_ray.driver import train
from fuyou_ray.evaluate import evaluate_run
from fuyou_ray.generate import SamplingConfig, generate_text
from fuyou_ray.hf import export_checkpoint, import_checkpoint


def finetune(
    hf_dir: Path,
    run_dir: Path,
    data: Path,
    out_dir: Path,
    config: Path | None,
    steps: int,
    eval_every: int,
    executor: str,
    overrides: list[str],
) -> None:
    base = load_config(config) if config else None
    settings = [f"data.path={data}", f"steps={steps}", f"data.eval_every={eval_every}", *overrides]
    imported = import_checkpoint(hf_dir, run_dir, base=base, overrides=settings)
    print(f"imported {imported.architecture}: {imported.params:,} params in {imported.seconds:.1f}s")
    cfg: RunConfig = load_config(imported.config_path)
    report("before training", evaluate_run(cfg))
    for stop in [*range(eval_every, steps, eval_every), steps]:
        result = train(cfg, stop_after=stop, executor=executor)
        last = result.steps[-1] if result.steps else None
        print(f"trained to step {result.final_step}" + (f", loss {last.loss:.4f}" if last else ""))
        report(f"step {result.final_step}", evaluate_run(cfg))
    exported = export_checkpoint(run_dir, out_dir)
    print(f"exported step {exported.step} to {exported.out_dir} ({exported.shards} shards, {exported.dtype})")
    sample = generate_text(run_dir, "Name a river.", SamplingConfig(max_new_tokens=16), chat=True)
    print(f"sample answer: {sample!r}")


def report(label: str, result: object) -> None:
    print(f"eval {label}: {json.dumps(result.__dict__)}")


def demo(root: Path) -> None:
    """A tiny random Llama with its own tokenizer and a generated SFT file: the whole flow on a CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.hf_testlib import save_tiny_model  # transformers builds the random checkpoint

    save_tiny_model("llama", root / "hf", tokenizer=True)
    rivers = ["Danube", "Rhine", "Loire", "Volga", "Thames", "Elbe", "Oder", "Seine"]
    rows = []
    for i in range(200):
        river = rivers[i % len(rivers)]
        if i % 2:
            rows.append({"prompt": f"Name river number {i % 8}: ", "completion": f"The {river}."})
        else:
            chat = [
                {"role": "user", "content": "Name a river."},
                {"role": "assistant", "content": f"The {river}."},
            ]
            rows.append({"messages": chat})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "runtime.device=cpu",
        "batch.global_batch=8",
        "batch.micro_batch=4",
        "batch.seq_len=32",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=2",
        f"data.cache_dir={root / 'cache'}",
    ]
    finetune(root / "hf", root / "run", root / "train.jsonl", root / "out", None, 20, 10, "local", overrides)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", nargs="?", type=Path)
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--data", type=Path, help="JSONL training file")
    p.add_argument("--out", type=Path, help="where to export the fine-tuned model")
    p.add_argument("--config", type=Path, default=None, help="run config with budgets, batch, SSD paths")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--demo", action="store_true", help="run the whole flow on a tiny random model")
    args = p.parse_args()
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="fuyou-hf-demo-") as tmp:
            demo(Path(tmp))
        return 0
    if not (args.hf_dir and args.run_dir and args.data and args.out):
        p.error("give HF_DIR RUN_DIR --data FILE --out DIR (or --demo)")
    finetune(
        args.hf_dir,
        args.run_dir,
        args.data,
        args.out,
        args.config,
        args.steps,
        args.eval_every,
        args.executor,
        args.overrides,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
