"""GPT-NeoX (Pythia, GPT-NeoX-20B) checkpoints in and out, against transformers itself (tiny random models
saved by save_pretrained, nothing downloaded).

Two variants cover the family's switches: "parallel" (use_parallel_residual, rotary_pct 0.25, exact GELU,
attention bias, untied embed_out: Pythia's shape) and "sequential" (sequential residual, rotary_pct 0.5,
gelu_new, no attention bias, linear RoPE scaling, tied embeddings). For each:
- import gives transformers' logits to 1e-5 (fp32), and greedy generation its tokens;
- K steps of fuyou-ray (driver, local executor) equal the transformers model + torch.optim.AdamW(fused)
  on the same batches to 1e-6 (losses and every weight);
- export loads in transformers, whose logits equal ours to 1e-5.
Plus: import -> export is bit-exact (bf16), the 4.x config spelling and buffers of Hub checkpoints import,
published configs give the published parameter counts, unsupported settings are refused by name, and
`fuyou-ray generate` prints transformers' greedy continuation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import save_file

from fuyou_ray.cli import main
from fuyou_ray.config import NEOX_ONLY_FIELDS, ConfigError, ModelConfig, RunConfig, load_config
from fuyou_ray.driver import TrainResult, model_fingerprint, train
from fuyou_ray.generate import SamplingConfig, generate_ids, run_tokenizer
from fuyou_ray.hf import export_checkpoint, import_checkpoint, read_hf_config
from fuyou_ray.inspect import load_unit_tensors
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.gpt_neox import ACTIVATIONS
from fuyou_ray.models.hf_adapters import GPTNeoXAdapter, UnsupportedModelError, adapter_for
from fuyou_ray.plan import make_plan
from fuyou_ray.records import RecordKind
from fuyou_ray.stored_model import StoredModel
from tests.conftest import tiny_config
from tests.hf_testlib import load_hf, save_tiny_tokenizer, train_hf_reference

LOGIT_TOL = 1e-5
TRAIN_TOL = 1e-6
STEPS = 3
VOCAB = 336

VARIANTS: dict[str, dict[str, Any]] = {
    "parallel": {
        "use_parallel_residual": True,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "hidden_act": "gelu",
        "attention_bias": True,
        "tie_word_embeddings": False,
    },
    "sequential": {
        "use_parallel_residual": False,
        "rotary_pct": 0.5,
        "rotary_emb_base": 1000,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "hidden_act": "gelu_new",
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
}


def neox_config(variant: str) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        initializer_range=0.05,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **VARIANTS[variant],
    )


def save_neox(
    variant: str, directory: Path, dtype: torch.dtype = torch.float32, tokenizer: bool = False
) -> Any:
    """A random tiny GPT-NeoX saved by transformers (as hf_testlib.save_tiny_model saves the others)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(neox_config(variant), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up between tensors shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    model.save_pretrained(directory)
    if tokenizer:
        save_tiny_tokenizer(directory)
    return model


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = f.get_tensor(name)
    return out


def tokens(shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))


def base_config(tmp: Path) -> RunConfig:
    return tiny_config(
        tmp,
        steps=STEPS,
        data={"cache_dir": str(tmp / "cache")},
        batch={"global_batch": 4, "micro_batch": 2, "seq_len": 16},
        optimizer={"lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 0.5, "weight_decay": 0.1},
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("neox")
    for variant in VARIANTS:
        save_neox(variant, root / variant, tokenizer=variant == "parallel")
    return {variant: root / variant for variant in VARIANTS}


@dataclass
class TrainedRun:
    variant: str
    cfg: RunConfig
    result: TrainResult
    reference: Any  # the transformers model trained alongside
    reference_losses: list[float]
    tmp: Path


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> TrainedRun:
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"train-{variant}")
    imported = import_checkpoint(checkpoints[variant], tmp / "run", base=base_config(tmp))
    cfg = load_config(imported.config_path)
    result = train(cfg, executor="local")
    reference = load_hf(checkpoints[variant])
    losses = train_hf_reference(reference, cfg, STEPS)
    return TrainedRun(variant, cfg, result, reference, losses, tmp)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_gives_transformers_logits_and_tokens(
    variant: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    result = import_checkpoint(checkpoints[variant], tmp_path / "run", base=tiny_config(tmp_path))
    hf = load_hf(checkpoints[variant])
    tied = VARIANTS[variant]["tie_word_embeddings"]
    assert result.params == sum(p.numel() for p in hf.parameters()) + (64 * VOCAB if tied else 0)
    cfg = load_config(result.config_path).model
    assert (cfg.arch, cfg.parallel_residual, cfg.rotary_pct) == (
        "gpt_neox",
        VARIANTS[variant]["use_parallel_residual"],
        VARIANTS[variant]["rotary_pct"],
    )
    x = tokens()
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64]
    with torch.no_grad(), StoredModel(tmp_path / "run") as model:
        diff = (model.logits(x) - hf(input_ids=x).logits).abs().max().item()
        ours = generate_ids(model, prompt, SamplingConfig(max_new_tokens=12))
    assert diff <= LOGIT_TOL, f"{variant}: max |logits - transformers| = {diff:.2e}"
    expected = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert ours == expected  # the KV-cache path: RoPE positions continue past the prompt


def test_training_equals_transformers_with_adamw(trained: TrainedRun) -> None:
    ours = [s.loss for s in trained.result.steps]
    assert trained.result.start_step == 0 and trained.result.final_step == STEPS
    for step, (a, b) in enumerate(zip(ours, trained.reference_losses, strict=True)):
        assert abs(a - b) <= TRAIN_TOL, f"{trained.variant} step {step + 1}: loss {a} != transformers {b}"
    assert trained.reference_losses[-1] < trained.reference_losses[0]  # it really trained
    spec = ModelSpec(trained.cfg.model)
    hf_params = dict(trained.reference.named_parameters())
    hf_params["embed_out.weight"] = hf_params.pop("lm_head.weight")  # the checkpoint's name for the head
    adapter = adapter_for(read_hf_config(Path(trained.cfg.run_dir) / "hf"))
    masters = load_unit_tensors(trained.cfg, RecordKind.MASTER)
    maps = adapter.tensor_map(spec)
    assert {m.hf_name for m in maps} == set(hf_params)
    worst = 0.0
    for m in maps:
        ours_t = spec.units[m.unit].layout.unflatten(masters[m.unit])[m.name]
        worst = max(worst, (ours_t - hf_params[m.hf_name].detach()).abs().max().item())
    assert worst <= TRAIN_TOL, f"{trained.variant}: max |W - W_transformers| = {worst:.2e}"


def test_export_loads_in_transformers_with_our_logits(trained: TrainedRun) -> None:
    out = trained.tmp / "export"
    result = export_checkpoint(trained.cfg.run_dir, out, max_shard_bytes=100_000)
    assert result.step == STEPS and result.shards > 1
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert "embed_out.weight" in tensors(out)  # a tied source comes back with its own head
    exported = load_hf(out)
    assert exported.config.use_parallel_residual == VARIANTS[trained.variant]["use_parallel_residual"]
    x = tokens()
    with torch.no_grad(), StoredModel(trained.cfg) as model:
        diff = (model.logits(x) - exported(input_ids=x).logits).abs().max().item()
    assert diff <= LOGIT_TOL, f"{trained.variant}: exported logits differ by {diff:.2e}"


def test_import_export_round_trip_is_bit_exact(tmp_path: Path) -> None:
    save_neox("parallel", tmp_path / "src", dtype=torch.bfloat16, tokenizer=True)
    import_checkpoint(tmp_path / "src", tmp_path / "run", base=tiny_config(tmp_path))
    result = export_checkpoint(tmp_path / "run", tmp_path / "out", max_shard_bytes=50_000)
    assert result.step == 0 and result.shards > 1 and result.dtype == "bfloat16"
    source, exported = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    assert set(exported) == set(source)
    for name, t in source.items():
        assert exported[name].dtype == t.dtype and torch.equal(
            exported[name].view(torch.uint8), t.view(torch.uint8)
        ), name
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg == src_cfg  # untied already: nothing to change
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tmp_path / "src" / name).exists():
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name


def test_hub_spelling_with_buffers_imports(tmp_path: Path) -> None:
    """Pythia / GPT-NeoX-20B as published: transformers 4.x config keys and the attention buffers."""
    hf = save_neox("parallel", tmp_path / "src")
    src = tmp_path / "src"
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    cfg["rope_scaling"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    weights = tensors(src)
    for f in src.glob("*.safetensors*"):
        f.unlink()
    for i in range(2):
        weights[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[
            None, None
        ]
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert load_hf(src).config.rope_parameters["partial_rotary_factor"] == 0.25  # transformers reads it too
    result = import_checkpoint(src, tmp_path / "run", base=tiny_config(tmp_path))
    model_cfg = load_config(result.config_path).model
    assert (model_cfg.rotary_pct, model_cfg.rope_theta) == (0.25, 10000.0)
    x = tokens()
    with torch.no_grad(), StoredModel(tmp_path / "run") as model:
        assert (model.logits(x) - hf(input_ids=x).logits).abs().max().item() <= LOGIT_TOL


def test_a_new_neox_run_exports_to_transformers(tmp_path: Path) -> None:
    """A run started from a YAML `arch: gpt_neox` (no HF source): init, train, and a config.json written
    from scratch that transformers loads with the same arithmetic."""
    model = {
        "arch": "gpt_neox",
        "vocab_size": 256,
        "n_layer": 2,
        "n_head": 2,
        "d_model": 32,
        "max_seq_len": 32,
        "intermediate_size": 48,
        "rotary_pct": 0.5,
        "rope_theta": 500.0,
        "parallel_residual": True,
        "hidden_act": "gelu_fast",
        "qkv_bias": True,
        "attn_out_bias": True,
    }
    cfg = tiny_config(tmp_path, steps=1, model=model)
    train(cfg, executor="local")
    export_checkpoint(cfg.run_dir, tmp_path / "out")
    exported = load_hf(tmp_path / "out")
    assert exported.config.hidden_act == "gelu_fast"
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), StoredModel(cfg) as ours:
        assert (ours.logits(x) - exported(input_ids=x).logits).abs().max().item() <= LOGIT_TOL


def test_cli_generate_prints_transformers_greedy_text(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    base = tiny_config(tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    import_checkpoint(checkpoints["parallel"], run, base=base)
    prompt = "The river runs past the mill"
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    tok = run_tokenizer(run)
    ids = tok.encode(prompt, add_special_tokens=True)
    x = torch.tensor([ids])
    hf = load_hf(checkpoints["parallel"])
    # BOS is id 0: pass the mask, or generate takes it for padding (pad_token_id 0) and shifts positions.
    out = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id
    )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] == tok.eos_id:
        new = new[:-1]
    assert printed == tok.decode(new) + "\n"


def test_published_configs_give_published_sizes() -> None:
    adapter = GPTNeoXAdapter()
    pythia_160m = {  # EleutherAI/pythia-160m config.json (transformers 4.x spelling)
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_act": "gelu",
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "gpt_neox",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
        "vocab_size": 50304,
    }
    m = adapter.model_config(pythia_160m)
    assert (m.rotary_pct, m.rope_theta, m.parallel_residual, m.qkv_bias, m.attn_out_bias) == (
        0.25,
        10000.0,
        True,
        True,
        True,
    )
    assert ModelSpec(m).numel == 162_322_944  # Pythia-160M's published total (embed_out untied)
    neox_20b = {
        **pythia_160m,
        "hidden_act": "gelu_fast",
        "hidden_size": 6144,
        "intermediate_size": 24576,
        "num_attention_heads": 64,
        "num_hidden_layers": 44,
        "vocab_size": 50432,
    }
    m20 = adapter.model_config(neox_20b)
    assert m20.hidden_act == "gelu_fast" and ModelSpec(m20).numel == 20_554_567_680  # GPT-NeoX-20B


def test_unsupported_settings_are_refused_by_name(tmp_path: Path) -> None:
    adapter = GPTNeoXAdapter()
    base = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": VOCAB,
        "rotary_pct": 0.25,
    }
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'dynamic'"):
        adapter.model_config({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn'"):
        adapter.model_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'relu'"):
        adapter.model_config({**base, "hidden_act": "relu"})
    with pytest.raises(UnsupportedModelError, match=r"rotary_pct 0\.1875 rotates an odd number"):
        adapter.model_config({**base, "rotary_pct": 0.1875})  # 3 of 16 dims
    # The config refuses what the model file cannot run, naming the field.
    neox = adapter.model_config(base)
    with pytest.raises(ConfigError, match=r"model\.attn_out_bias"):
        tiny_config(tmp_path, model={**dataclasses.asdict(neox), "attn_out_bias": False})
    with pytest.raises(ConfigError, match=r"model\.rotary_pct: applies to arch 'gpt_neox' only"):
        tiny_config(tmp_path, model={"rotary_pct": 0.5})


def test_activations_are_transformers_formulas() -> None:
    from transformers.activations import ACT2FN

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    for name, fn in ACTIVATIONS.items():
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = fn(a), ACT2FN[name](b)
        ours.sum().backward()
        theirs.sum().backward()
        assert torch.equal(ours, theirs) and torch.equal(a.grad, b.grad), name  # type: ignore[arg-type]


def test_fingerprint_of_other_archs_is_unchanged_by_the_neox_fields(tmp_path: Path) -> None:
    """Stores committed before the NeoX fields existed hold fingerprints without them: still resumable."""
    cfg = tiny_config(tmp_path)
    fingerprint = model_fingerprint(cfg, make_plan(cfg, ModelSpec(cfg.model)))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(fingerprint["model"]) == fields - set(NEOX_ONLY_FIELDS)
    neox = tiny_config(tmp_path, model={"arch": "gpt_neox", "rotary_pct": 0.5, "parallel_residual": True})
    assert set(model_fingerprint(neox, make_plan(neox, ModelSpec(neox.model)))["model"]) == fields - {
        "hidden_act"  # at its default, left out like the others
    }
