"""Import -> export is bit-exact (bf16 and fp32 sources, tied and untied); the imported store is what the
driver resumes; bad checkpoints are refused by name before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open

from fuyou_ray.config import load_config
from fuyou_ray.driver import model_fingerprint
from fuyou_ray.errors import RunStateError
from fuyou_ray.hf import export_checkpoint, import_checkpoint
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.hf_adapters import LlamaFamilyAdapter, UnsupportedModelError
from fuyou_ray.plan import make_plan
from fuyou_ray.records import RecordKind
from fuyou_ray.safetensors_io import CheckpointError
from fuyou_ray.store import SSDTensorStore
from tests.conftest import tiny_config
from tests.hf_testlib import save_tiny_model


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize(
    ("family", "dtype"),
    [
        ("llama", torch.bfloat16),
        ("qwen2", torch.bfloat16),
        ("gpt2", torch.float32),
        ("mistral", torch.float16),
    ],
)
def test_import_export_round_trip_is_bit_exact(family: str, dtype: torch.dtype, tmp_path: Path) -> None:
    save_tiny_model(family, tmp_path / "src", dtype=dtype, tokenizer=family == "llama")
    import_checkpoint(tmp_path / "src", tmp_path / "run", base=tiny_config(tmp_path))
    result = export_checkpoint(tmp_path / "run", tmp_path / "out", max_shard_bytes=50_000)
    assert result.step == 0 and result.shards > 1
    source, exported = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    for name, t in source.items():
        assert exported[name].dtype == t.dtype and torch.equal(
            exported[name].view(torch.uint8), t.view(torch.uint8)
        ), name
    tied = {"qwen2": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}
    if family in tied:  # the tied head comes back as its own tensor, equal to the embedding
        assert "lm_head.weight" not in source
        assert torch.equal(exported["lm_head.weight"], source[tied[family]])
    assert set(exported) - set(source) <= {"lm_head.weight"}
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["tie_word_embeddings"] is False
    assert {k: v for k, v in out_cfg.items() if k != "tie_word_embeddings"} == {
        k: v for k, v in src_cfg.items() if k != "tie_word_embeddings"
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tmp_path / "src" / name).exists():
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name


def test_imported_store_is_what_the_driver_resumes(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path / "src", dtype=torch.bfloat16, tokenizer=True)
    result = import_checkpoint(tmp_path / "src", tmp_path / "run", base=tiny_config(tmp_path))
    cfg = load_config(result.config_path)
    assert cfg.run_dir == str((tmp_path / "run").resolve())
    assert cfg.data.tokenizer == str((tmp_path / "run" / "hf").resolve())
    spec = ModelSpec(cfg.model)
    store = SSDTensorStore(cfg.ssd.paths)
    try:
        assert store.committed_step == 0
        assert store.manifest.meta["fingerprint"] == model_fingerprint(cfg, make_plan(cfg, spec))
    finally:
        store.close()
    for kind in (RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ):
        assert all(not bool(t.any()) for t in load_unit_tensors(cfg, kind))  # zeroed Adam state
    masters = load_unit_tensors(cfg, RecordKind.MASTER)
    params = load_unit_tensors(cfg, RecordKind.PARAM)  # on CPU: fp32, equal to the master copy
    assert all(torch.equal(p, m) for p, m in zip(params, masters, strict=True))
    with pytest.raises(RunStateError, match="already holds a run"):
        import_checkpoint(tmp_path / "src", tmp_path / "run", base=tiny_config(tmp_path))


def test_import_for_a_gpu_run_writes_bf16_params_anywhere(tmp_path: Path) -> None:
    model = save_tiny_model("llama", tmp_path / "src", dtype=torch.bfloat16)
    base = tiny_config(tmp_path, runtime={"device": "cuda", "optimizer_actors": 1, "optimizer_threads": 1})
    result = import_checkpoint(tmp_path / "src", tmp_path / "run", base=base)
    assert result.param_dtype == "bfloat16"
    cfg = load_config(result.config_path)
    embed = load_unit_tensors(cfg, RecordKind.PARAM)[0]
    assert embed.dtype == torch.bfloat16
    named = ModelSpec(cfg.model).units[0].layout.unflatten(embed)
    assert torch.equal(named["embed_tokens.weight"], model.model.embed_tokens.weight.detach())


def test_unknown_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as info:
        import_checkpoint(tmp_path / "src", tmp_path / "run")
    message = str(info.value)
    assert "FalconForCausalLM" in message
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unsupported_settings_and_legacy_rope_config() -> None:
    adapter = LlamaFamilyAdapter()
    llama31 = {  # Llama 3.1 8B as published (transformers 4.x spelling: rope_theta + rope_scaling)
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "vocab_size": 128256,
        "hidden_act": "silu",
    }
    m = adapter.model_config(llama31)
    assert (m.n_kv_head, m.rope_theta, m.head_size, m.mlp_width) == (8, 500000.0, 128, 14336)
    assert m.rope_scaling is not None and m.rope_scaling.original_max_position_embeddings == 8192
    assert ModelSpec(m).numel == 8_030_261_248  # Llama 3.1 8B's published parameter count
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn' is not supported"):
        adapter.model_config({**llama31, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        adapter.model_config({**llama31, "hidden_act": "gelu"})
    qwen_sliding = {**llama31, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 28}
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        adapter.model_config(qwen_sliding)


def test_bad_checkpoints_are_refused_by_name(tmp_path: Path) -> None:
    save_tiny_model("llama", tmp_path / "src")
    src = tmp_path / "src"
    # Missing tensor: drop one from the header by writing a checkpoint without it.
    from safetensors.torch import save_file

    weights = tensors(src)
    for f in src.glob("*.safetensors*"):
        f.unlink()
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        import_checkpoint(src, tmp_path / "run")
    # Extra tensors of an architecture variant the model does not have.
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not use .*q_norm"):
        import_checkpoint(src, tmp_path / "run")
    # Pickled weights only: refused, never unpickled.
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        import_checkpoint(src, tmp_path / "run")
    # A corrupt header.
    (src / "pytorch_model.bin").unlink()
    (src / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="header length"):
        import_checkpoint(src, tmp_path / "run")
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
