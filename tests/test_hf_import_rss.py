"""Import streams: the peak RSS of an import (in its own process) stays near one unit's size, far below the
checkpoint's, on a 24-layer model whose checkpoint is several times the memory the import may use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fuyou_ray.config import ModelConfig
from fuyou_ray.models import ModelSpec
from tests.conftest import REPO

LAYERS, HIDDEN, FFN, VOCAB = 24, 384, 1024, 4096
BUDGET = 32 * 1024**2  # what the import may use above its interpreter + torch baseline


def write_checkpoint(directory: Path, shards: int = 8) -> int:
    """A bf16 Llama checkpoint, written layer by layer (never whole in memory); returns its bytes."""
    directory.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    kv = HIDDEN // 6 * 2

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    layers_per_shard = -(-LAYERS // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part: dict[str, torch.Tensor] = {}
        if s == 0:
            part["model.embed_tokens.weight"] = rnd(VOCAB, HIDDEN)
        for i in range(s * layers_per_shard, min(LAYERS, (s + 1) * layers_per_shard)):
            p = f"model.layers.{i}."
            part.update(
                {
                    p + "self_attn.q_proj.weight": rnd(HIDDEN, HIDDEN),
                    p + "self_attn.k_proj.weight": rnd(kv, HIDDEN),
                    p + "self_attn.v_proj.weight": rnd(kv, HIDDEN),
                    p + "self_attn.o_proj.weight": rnd(HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": rnd(FFN, HIDDEN),
                    p + "mlp.up_proj.weight": rnd(FFN, HIDDEN),
                    p + "mlp.down_proj.weight": rnd(HIDDEN, FFN),
                    p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                }
            )
        if s == shards - 1:
            part["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            part["lm_head.weight"] = rnd(VOCAB, HIDDEN)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_import_peak_rss_is_bounded_by_a_unit_not_the_model(tmp_path: Path) -> None:
    checkpoint_bytes = write_checkpoint(tmp_path / "src")
    script = (
        "import json, sys; from dataclasses import asdict; from fuyou_ray.hf import import_checkpoint; "
        "r = import_checkpoint(sys.argv[1], sys.argv[2]); print(json.dumps(asdict(r)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    spec = ModelSpec(
        ModelConfig(
            arch="llama",
            vocab_size=VOCAB,
            n_layer=LAYERS,
            n_head=6,
            n_kv_head=2,
            d_model=HIDDEN,
            intermediate_size=FFN,
            max_seq_len=256,
        )
    )
    assert result["params"] == spec.numel == checkpoint_bytes // 2
    largest_unit_fp32 = max(u.numel for u in spec.units) * 4
    peak = result["peak_rss_above_baseline"]
    mib = 2**20
    print(
        f"checkpoint {checkpoint_bytes / mib:.0f} MiB, "
        f"store written {result['bytes_written'] / mib:.0f} MiB, "
        f"largest unit (fp32) {largest_unit_fp32 / mib:.1f} MiB, "
        f"peak RSS above baseline {peak / mib:.1f} MiB (whole process {result['peak_rss'] / mib:.0f} MiB)"
    )
    assert checkpoint_bytes > 2 * BUDGET  # the model really is larger than the budget
    assert result["bytes_written"] > 8 * checkpoint_bytes  # params + master + 2 moments, fp32, all written
    assert peak <= BUDGET, f"import used {peak / mib:.1f} MiB above baseline (budget {BUDGET / mib:.0f})"
    # The bound is a unit, not the model: one fp32 staging buffer plus a read chunk and small change.
    assert peak <= 2 * largest_unit_fp32 + 8 * mib
