"""`fuyou-ray import / train / eval / generate / export` end to end on a tiny checkpoint, and generation
and evaluation checked against transformers (greedy decoding, held-out loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fuyou_ray.cli import main
from fuyou_ray.config import load_config
from fuyou_ray.data import TokenDataset
from fuyou_ray.evaluate import evaluate_run
from fuyou_ray.generate import SamplingConfig, generate_ids, next_token
from fuyou_ray.hf import import_checkpoint
from fuyou_ray.models import IGNORE_INDEX
from fuyou_ray.stored_model import StoredModel
from tests.conftest import tiny_config
from tests.hf_testlib import load_hf, save_tiny_model


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One imported run per family (no training), for read-only checks."""
    root = tmp_path_factory.mktemp("imported")
    runs = {}
    for family in ("llama", "mistral", "gpt2"):
        save_tiny_model(family, root / f"{family}-src", tokenizer=family == "llama")
        base = tiny_config(root / family, data={"cache_dir": str(root / "cache")})
        import_checkpoint(root / f"{family}-src", root / family / "run", base=base)
        runs[family] = root / family
    return runs


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_greedy_generation_equals_transformers(family: str, imported: dict[str, Path]) -> None:
    hf = load_hf(imported[family].parent / f"{family}-src")
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64]  # with 12 new tokens, Mistral's window (8) slides
    with StoredModel(imported[family] / "run") as model:
        ours = generate_ids(model, prompt, SamplingConfig(max_new_tokens=12))
    expected = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert ours == expected


def test_top_p_sampling_is_seeded_and_narrows_to_greedy() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    pick = [
        next_token(logits, SamplingConfig(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    again = [
        next_token(logits, SamplingConfig(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    assert pick == again and len(set(pick)) > 1
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((torch.cumsum(probs[order], 0) < 0.9).sum()) + 1].tolist())
    assert set(pick) <= nucleus
    narrow = SamplingConfig(temperature=1.0, top_p=1e-6)
    assert next_token(logits, narrow, torch.Generator().manual_seed(0)) == int(logits.argmax())


def test_eval_loss_equals_transformers_on_the_held_out_batches(imported: dict[str, Path]) -> None:
    run = imported["gpt2"] / "run"
    result = evaluate_run(run, batches=2)
    cfg = load_config(run / "config.yaml")
    hf = load_hf(imported["gpt2"].parent / "gpt2-src")
    data = TokenDataset.from_config(cfg.data, cfg.model.vocab_size)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in data.eval_batches(2, cfg.batch.global_batch, cfg.batch.seq_len):
            logits = hf(input_ids=b.inputs).logits
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.targets.reshape(-1), reduction="sum")
            )
            count += int((b.targets != IGNORE_INDEX).sum())
    assert result.tokens == count and result.step == 0
    assert abs(result.loss - total / count) <= 1e-5 and math.isclose(result.perplexity, math.exp(result.loss))
    line = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert line["loss"] == result.loss


def test_cli_import_train_eval_generate_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_tiny_model("llama", tmp_path / "src", dtype=torch.bfloat16, tokenizer=True)
    rows = [{"prompt": f"Q{i}: name a river. ", "completion": "The Danube."} for i in range(30)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg_path = tmp_path / "base.yaml"
    base = tiny_config(
        tmp_path, steps=2, data={"path": str(tmp_path / "sft.jsonl"), "cache_dir": str(tmp_path / "c")}
    )
    cfg_path.write_text(json.dumps(base.to_dict()))  # JSON is YAML
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "src"), str(run), "--config", str(cfg_path)]) == 0
    out: Any = capsys.readouterr().out
    assert f"fuyou-ray train {run / 'config.yaml'}" in out
    assert main(["train", str(run / "config.yaml"), "--executor", "local"]) == 0
    assert "committed step 2/2" in capsys.readouterr().out
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["generate", str(run), "--prompt", "Q1: name a river.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert (
        main(["generate", str(run), "--prompt", "hi", "--chat", "--temperature", "0.8", "--top-p", "0.9"])
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["step"] == 2 and exported["dtype"] == "bfloat16"
    assert load_hf(tmp_path / "out").config.tie_word_embeddings is False
    # Bad input: one line on stderr, exit code 2, nothing written.
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "MambaForCausalLM" in err
    assert "supported: GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM" in err
    assert not (tmp_path / "run2").exists()
    assert main(["export", str(run), str(tmp_path / "out")]) == 4  # not empty: refused
    assert "not empty" in capsys.readouterr().err
