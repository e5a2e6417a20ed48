"""Held-out loss every data.eval_every steps, streamed through the pipeline like training."""

from __future__ import annotations

import json
from pathlib import Path

from fuyou_ray.driver import train
from fuyou_ray.evaluate import evaluate_run
from tests.conftest import tiny_config


def test_periodic_eval_matches_the_stored_model(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, steps=4, data={"eval_every": 2, "eval_batches": 2})
    result = train(cfg, executor="local")
    evals = [s.eval_loss for s in result.steps]
    assert evals[0] is None and evals[2] is None
    assert evals[1] is not None and evals[3] is not None
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in rows] == evals
    # The same number as evaluating the committed weights outside the pipeline (fp32 on CPU).
    assert abs(evaluate_run(cfg, record=False).loss - evals[3]) <= 1e-5
