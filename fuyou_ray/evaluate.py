"""Held-out loss and perplexity of a run's committed weights, streamed unit by unit from its store.

`evaluate_run` takes the dataset's fixed eval batches (the same every time, so evaluations at different
steps compare), runs them through the committed model layer by layer and appends the result to
RUN_DIR/eval.jsonl. Run it between training segments (`train(cfg, stop_after=...)`), not during one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fuyou_ray.config import RunConfig
from fuyou_ray.data import TokenDataset
from fuyou_ray.inspect import load_run_config
from fuyou_ray.stored_model import StoredModel

EVAL_LOG = "eval.jsonl"


@dataclass
class EvalResult:
    """One evaluation: mean loss per target token over the eval batches, and its perplexity."""

    step: int
    loss: float
    perplexity: float
    tokens: int
    batches: int
    seconds: float


def evaluate_run(
    run: str | Path | RunConfig,
    batches: int | None = None,
    device: str = "cpu",
    record: bool = True,
) -> EvalResult:
    """Evaluate the run's committed weights on `batches` (default data.eval_batches) held-out batches."""
    t0 = time.perf_counter()
    cfg = run if isinstance(run, RunConfig) else load_run_config(run)
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    count = batches or cfg.data.eval_batches
    eval_batches = data.eval_batches(count, cfg.batch.global_batch, cfg.batch.seq_len)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with StoredModel(cfg, device=device, dtype=dtype) as model:
        total, tokens = model.loss_sums(eval_batches, cfg.batch.micro_batch)
        step = model.step
    loss = total / max(tokens, 1)
    result = EvalResult(
        step=step,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        tokens=tokens,
        batches=count,
        seconds=time.perf_counter() - t0,
    )
    if record:
        with open(Path(cfg.run_dir) / EVAL_LOG, "a") as f:
            f.write(json.dumps(asdict(result)) + "\n")
    return result
