"""Data formats: JSONL text / prompt+completion / chat, plain text, pre-tokenized files; the local tokenizer
against transformers'; the tokenization cache; packing, padding and step-addressed epoch shuffling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fuyou_ray.config import ConfigError, DataConfig, ModelConfig
from fuyou_ray.data import DataError, ExampleDataset, TokenDataset, bundled_corpus_text
from fuyou_ray.models import IGNORE_INDEX, lm_loss
from fuyou_ray.tokenizer import HFTokenizer
from tests.conftest import tiny_config
from tests.hf_testlib import save_tiny_tokenizer

VOCAB = 336


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(tmp: Path, path: Path | None, tok: Path | None, **kw: Any) -> DataConfig:
    return DataConfig(
        path=str(path) if path else None,
        tokenizer=str(tok) if tok else None,
        cache_dir=str(tmp / "cache"),
        **kw,
    )


# ---------------------------------------------------------------------------------------------- tokenizer


def test_local_tokenizer_matches_transformers(tok_dir: Path, hf_tok: Any) -> None:
    ours = HFTokenizer(tok_dir)
    text = bundled_corpus_text()[:2000]
    assert ours.encode(text) == hf_tok(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ours.bos_id == hf_tok.bos_token_id and ours.eos_id == hf_tok.eos_token_id
    assert ours.decode(ours.encode(text)) == text


def test_chat_template_renders_as_transformers(tok_dir: Path, hf_tok: Any) -> None:
    ours = HFTokenizer(tok_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "Another?"},
    ]
    for gen in (False, True):
        assert ours.render_chat(msgs, add_generation_prompt=gen) == hf_tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen
        )


# ---------------------------------------------------------------------------------------------- JSONL


def test_prompt_completion_trains_on_the_completion_only(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Question: why? ", "completion": "Because."}] * 4)
    ds = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, pack=False, eval_fraction=0.0), VOCAB)
    assert isinstance(ds, ExampleDataset)
    prompt = hf_tok("Question: why? ")["input_ids"]
    completion = hf_tok("Because.", add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
    batch = ds.batch(0, 2, 24)
    row = prompt + completion
    n = len(row)
    assert batch.inputs[0, : n - 1].tolist() == row[:-1]
    targets = batch.targets[0].tolist()
    # Target j is token j + 1: prompt tokens (after the first) take no loss; completion + EOS do.
    assert targets[: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)
    assert targets[len(prompt) - 1 : n - 1] == completion
    assert targets[n - 1 :] == [IGNORE_INDEX] * (24 - n + 1)  # padding


def test_chat_messages_train_on_assistant_turns(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    ds = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_fraction=0.0), VOCAB)
    assert isinstance(ds, ExampleDataset)
    expected = hf_tok.apply_chat_template(msgs, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else list(expected)
    assert ds.train.tolist() == expected
    trained = [t for t, keep in zip(ds.train.tolist(), ds.examples.loss.tolist(), strict=True) if keep]
    eos = hf_tok.eos_token_id
    assistant = [hf_tok(m["content"], add_special_tokens=False)["input_ids"] + [eos] for m in msgs[1::2]]
    assert trained == assistant[0] + assistant[1]


def test_text_records_pack_into_full_rows_shuffled_per_epoch(tmp_path: Path, tok_dir: Path) -> None:
    corpus = bundled_corpus_text()
    rows = [{"text": corpus[i * 300 : (i + 1) * 300]} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_fraction=0.0), VOCAB)
    assert isinstance(ds, ExampleDataset)
    seq = 16
    n_rows = ds.rows(ds.examples, seq)
    # One epoch = n_rows consecutive row draws: every row exactly once (in some order).
    drawn = sorted(tuple(ds.batch(s, 1, seq).inputs[0].tolist()) for s in range(n_rows))
    every = sorted(tuple(ds.row(ds.examples, r, seq)[0].tolist()) for r in range(n_rows))
    assert drawn == every
    again = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_fraction=0.0), VOCAB)
    assert torch.equal(again.batch(5, 4, seq).inputs, ds.batch(5, 4, seq).inputs)  # a pure function of step
    assert not torch.equal(ds.batch(0, 4, seq).inputs, ds.batch(n_rows, 4, seq).inputs)
    # Every target is the next token, and nothing of a text record is ignored.
    b = ds.batch(3, 4, seq)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1]) and bool((b.targets >= 0).all())


def test_example_eval_split_is_held_out(tmp_path: Path, tok_dir: Path) -> None:
    rows = [{"text": f"record number {i} " * 5} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_fraction=0.25), VOCAB)
    assert isinstance(ds, ExampleDataset)
    assert ds.eval_examples.count == 10 and ds.examples.count == 30
    eval_path = write_jsonl(tmp_path / "e.jsonl", rows[:3])
    explicit = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_path=eval_path), VOCAB)
    assert isinstance(explicit, ExampleDataset)
    assert explicit.eval_examples.count == 3 and explicit.examples.count == 40
    assert torch.equal(explicit.eval_batch(0, 2, 8).inputs, explicit.eval_batch(0, 2, 8).inputs)


def test_jsonl_errors_name_the_line(tmp_path: Path, tok_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        TokenDataset.from_config(data_cfg(tmp_path, bad, tok_dir), VOCAB)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: .*`text`, `prompt` \+ `completion`, or `messages`"):
        TokenDataset.from_config(data_cfg(tmp_path, odd, tok_dir), VOCAB)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"need data\.tokenizer"):
        TokenDataset.from_config(data_cfg(tmp_path, chat, None), 256)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "only a prompt", "completion": ""}] * 3)
    with pytest.raises(DataError, match="no token of the training examples takes loss"):
        TokenDataset.from_config(data_cfg(tmp_path, prompts, None, add_eos=False, eval_fraction=0.0), 256)


# ---------------------------------------------------------------------------------------------- streams


def test_plain_text_with_the_model_tokenizer(tmp_path: Path, tok_dir: Path, hf_tok: Any) -> None:
    text = bundled_corpus_text()[:5000]
    path = tmp_path / "t.txt"
    path.write_text(text)
    ds = TokenDataset.from_config(data_cfg(tmp_path, path, tok_dir, eval_fraction=0.0), VOCAB)
    assert type(ds) is TokenDataset
    assert ds.train.tolist() == hf_tok(text)["input_ids"] + [hf_tok.eos_token_id]


def test_pretokenized_npy_and_bin(tmp_path: Path) -> None:
    ids = (np.arange(5000) * 7 % 300).astype(np.uint16)
    np.save(tmp_path / "t.npy", ids)
    ids.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        ds = TokenDataset.from_config(data_cfg(tmp_path, tmp_path / name, None, eval_fraction=0.1), VOCAB)
        assert np.array_equal(np.concatenate([ds.train, ds.eval]), ids)
        b = ds.batch(2, 4, 32)
        assert b.inputs.dtype == torch.int64 and torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="token_dtype"):
        TokenDataset.from_config(data_cfg(tmp_path, tmp_path / "odd.bin", None), VOCAB)
    with pytest.raises(DataError, match=r"token id 299 >= model\.vocab_size 256"):
        TokenDataset.from_config(data_cfg(tmp_path, tmp_path / "t.npy", None), 256)


def test_tokenization_is_cached(tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a b c ", "completion": "d e"}] * 10)
    cfg = data_cfg(tmp_path, path, tok_dir, eval_fraction=0.0)
    first = TokenDataset.from_config(cfg, VOCAB)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(HFTokenizer, "encode", refuse)
    second = TokenDataset.from_config(cfg, VOCAB)
    assert torch.equal(first.batch(1, 2, 8).targets, second.batch(1, 2, 8).targets)
    monkeypatch.undo()
    path.write_text(path.read_text() + json.dumps({"text": "new"}) + "\n")  # changed file: new entry
    TokenDataset.from_config(cfg, VOCAB)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


# ---------------------------------------------------------------------------------------------- loss, config


def test_all_ignored_targets_give_zero_loss_not_nan() -> None:
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    loss = lm_loss(logits, targets)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None and not bool(logits.grad.any())
    targets[0, 2] = 4
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3].float(), torch.tensor([4]))
    assert torch.allclose(lm_loss(logits, targets), expected)


def test_config_validates_the_new_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.n_kv_head: applies to arch 'llama' only"):
        tiny_config(tmp_path, model={"n_kv_head": 2})
    with pytest.raises(ConfigError, match=r"model\.intermediate_size: arch 'llama' needs"):
        tiny_config(tmp_path, model={"arch": "llama", "n_head": 2, "d_model": 32})
    with pytest.raises(ConfigError, match=r"model\.n_kv_head: must divide"):
        tiny_config(tmp_path, model={"arch": "llama", "intermediate_size": 64, "n_head": 4, "n_kv_head": 3})
    with pytest.raises(ConfigError, match=r"data\.eval_every"):
        tiny_config(tmp_path, data={"eval_every": -1})
    cfg = tiny_config(
        tmp_path,
        model={
            "arch": "llama",
            "intermediate_size": 64,
            "n_kv_head": 1,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16},
        },
        data={"tokenizer": "tok", "cache_dir": "c"},
    )
    assert cfg.model.rope_scaling is not None and cfg.model.rope_scaling.factor == 8.0
    assert Path(str(cfg.data.tokenizer)).is_absolute() and Path(str(cfg.data.cache_dir)).is_absolute()
    assert ModelConfig().mlp_width == 4 * ModelConfig().d_model
