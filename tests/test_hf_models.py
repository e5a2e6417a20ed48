"""Hugging Face checkpoints in and out, against transformers itself (tiny random models, nothing downloaded).

For Llama (GQA, llama3 RoPE scaling), Mistral (GQA, sliding window shorter than the sequence), Qwen2 (qkv
bias, tied embeddings) and GPT-2 (Conv1D, tied embeddings), each saved by transformers' save_pretrained:
- import gives transformers' logits to 1e-5 (fp32);
- K steps of fuyou-ray (driver, local executor) equal the transformers model + torch.optim.AdamW(fused)
  on the same batches to 1e-6 (losses and every weight);
- export loads in transformers, whose logits equal ours to 1e-5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from fuyou_ray.config import RunConfig, load_config
from fuyou_ray.driver import TrainResult, train
from fuyou_ray.hf import export_checkpoint, import_checkpoint, read_hf_config
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.hf_adapters import adapter_for
from fuyou_ray.records import RecordKind
from fuyou_ray.stored_model import StoredModel
from tests.conftest import tiny_config
from tests.hf_testlib import FAMILIES, load_hf, save_tiny_model, train_hf_reference

LOGIT_TOL = 1e-5
TRAIN_TOL = 1e-6
STEPS = 3


def write_sft_jsonl(path: Path) -> None:
    """Mixed records: plain text, prompt/completion (loss on the completion), chat (loss on the assistant)."""
    words = ["the", "river", "runs", "past", "the", "mill", "and", "the", "miller", "counts", "his", "grain"]
    rows: list[dict[str, Any]] = []
    for i in range(40):
        a, b = words[i % len(words)], words[(3 * i) % len(words)]
        if i % 3 == 0:
            rows.append({"prompt": f"Say {a} and {b}: ", "completion": f"{a} {b} {a}."})
        elif i % 3 == 1:
            rows.append(
                {"messages": [{"role": "user", "content": f"echo {b}"}, {"role": "assistant", "content": b}]}
            )
        else:
            rows.append({"text": " ".join(words[i % 5 :] + words[: i % 5])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def base_config(tmp: Path, family: str) -> RunConfig:
    data: dict[str, Any] = {"cache_dir": str(tmp / "cache")}
    if family == "llama":  # the tokenizer + JSONL path, with ignored targets
        write_sft_jsonl(tmp / "sft.jsonl")
        data.update(path=str(tmp / "sft.jsonl"), eval_fraction=0.1)
    return tiny_config(
        tmp,
        steps=STEPS,
        data=data,
        batch={"global_batch": 4, "micro_batch": 2, "seq_len": 16},
        optimizer={"lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 0.5, "weight_decay": 0.1},
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        save_tiny_model(family, root / family, tokenizer=family == "llama")
        out[family] = root / family
    return out


def tokens(vocab: int, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits(family: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = import_checkpoint(checkpoints[family], tmp_path / "run", base=base_config(tmp_path, family))
    assert result.params == sum(p.numel() for p in load_hf(checkpoints[family]).parameters()) + (
        64 * 336 if family in ("qwen2", "gpt2") else 0  # the untied copy of the embedding
    )
    hf = load_hf(checkpoints[family])
    x = tokens(hf.config.vocab_size)
    with torch.no_grad(), StoredModel(tmp_path / "run") as model:
        diff = (model.logits(x) - hf(input_ids=x).logits).abs().max().item()
    assert diff <= LOGIT_TOL, f"{family}: max |logits - transformers| = {diff:.2e}"


@dataclass
class TrainedRun:
    family: str
    cfg: RunConfig
    result: TrainResult
    reference: Any  # the transformers model trained alongside
    reference_losses: list[float]
    tmp: Path


@pytest.fixture(scope="module", params=FAMILIES)
def trained(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> TrainedRun:
    family = request.param
    tmp = tmp_path_factory.mktemp(f"train-{family}")
    imported = import_checkpoint(checkpoints[family], tmp / "run", base=base_config(tmp, family))
    cfg = load_config(imported.config_path)
    result = train(cfg, executor="local")
    reference = load_hf(checkpoints[family])
    losses = train_hf_reference(reference, cfg, STEPS)
    return TrainedRun(family, cfg, result, reference, losses, tmp)


def test_training_equals_transformers_with_adamw(trained: TrainedRun) -> None:
    ours = [s.loss for s in trained.result.steps]
    assert trained.result.start_step == 0 and trained.result.final_step == STEPS
    for step, (a, b) in enumerate(zip(ours, trained.reference_losses, strict=True)):
        assert abs(a - b) <= TRAIN_TOL, f"{trained.family} step {step + 1}: loss {a} != transformers {b}"
    assert trained.reference_losses[-1] < trained.reference_losses[0]  # it really trained
    spec = ModelSpec(trained.cfg.model)
    hf_params = dict(trained.reference.named_parameters())
    adapter = adapter_for(read_hf_config(Path(trained.cfg.run_dir) / "hf"))
    masters = load_unit_tensors(trained.cfg, RecordKind.MASTER)
    worst = 0.0
    for m in adapter.tensor_map(spec):
        ours_t = spec.units[m.unit].layout.unflatten(masters[m.unit])[m.name]
        theirs = hf_params[m.hf_name].detach()
        worst = max(worst, (ours_t - (theirs.t() if m.transpose else theirs)).abs().max().item())
    assert worst <= TRAIN_TOL, f"{trained.family}: max |W - W_transformers| = {worst:.2e}"


def test_export_loads_in_transformers_with_our_logits(trained: TrainedRun) -> None:
    out = trained.tmp / "export"
    result = export_checkpoint(trained.cfg.run_dir, out, max_shard_bytes=100_000)
    assert result.step == STEPS and result.shards > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == result.shards
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    exported = load_hf(out)
    x = tokens(exported.config.vocab_size)
    with torch.no_grad(), StoredModel(trained.cfg) as model:
        diff = (model.logits(x) - exported(input_ids=x).logits).abs().max().item()
    assert diff <= LOGIT_TOL, f"{trained.family}: exported logits differ by {diff:.2e}"
    if trained.family == "llama":  # tokenizer files travel with the export
        assert (out / "tokenizer.json").read_bytes() == (
            Path(trained.cfg.run_dir) / "hf" / "tokenizer.json"
        ).read_bytes()
