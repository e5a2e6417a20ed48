"""Text generation from a run's committed weights, layer-streamed like training (slow, for a quick look).

Greedy decoding (temperature 0) or nucleus sampling (top-p) with a seeded generator. The prompt is
prefilled in one pass, then each new token runs through every unit with a per-layer key/value cache; unit
weights come from the store, kept resident only within the cache budget (so a model larger than memory
re-reads its layers for every token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyou_ray.hf import HF_SUBDIR
from fuyou_ray.inspect import load_run_config
from fuyou_ray.models import KVCache
from fuyou_ray.stored_model import StoredModel
from fuyou_ray.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token: greedy when temperature is 0, else top-p sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def next_token(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator) -> int:
    """One token from a (vocab,) logit vector."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
    keep[0] = True
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(kept / kept.sum(), 1, generator=gen)
    return int(order[choice])


def generate_ids(
    model: StoredModel, prompt: Sequence[int], sampling: SamplingConfig, eos_id: int | None = None
) -> list[int]:
    """The prompt's continuation (new token ids only), stopping at `eos_id` or max_new_tokens."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.cfg.model.max_seq_len
    if len(prompt) >= limit:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; the model takes at most {limit - 1} plus one new"
        )
    gen = torch.Generator().manual_seed(sampling.seed)
    caches = [KVCache() for _ in range(model.cfg.model.n_layer)]
    logits = model.step_cached(torch.tensor([list(prompt)], dtype=torch.int64), caches, 0)
    out: list[int] = []
    position = len(prompt)
    while len(out) < sampling.max_new_tokens and position < limit:
        token = next_token(logits[0, -1].cpu(), sampling, gen)
        out.append(token)
        if token == eos_id:
            break
        logits = model.step_cached(torch.tensor([[token]], dtype=torch.int64), caches, position)
        position += 1
    return out


def run_tokenizer(run_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """The run's tokenizer: data.tokenizer, else the imported checkpoint's, else bytes."""
    cfg = load_run_config(run_dir)
    if cfg.data.tokenizer is not None:
        return load_tokenizer(cfg.data.tokenizer)
    hf = Path(run_dir) / HF_SUBDIR
    return load_tokenizer(str(hf)) if (hf / "tokenizer.json").is_file() else ByteTokenizer()


def generate_text(
    run_dir: str | Path,
    prompt: str,
    sampling: SamplingConfig,
    chat: bool = False,
    device: str = "cpu",
) -> str:
    """Continue `prompt` (or, with `chat`, answer it as a user turn through the chat template)."""
    tokenizer = run_tokenizer(run_dir)
    if chat:
        if not isinstance(tokenizer, HFTokenizer):
            raise ValueError("--chat needs a tokenizer with a chat template (an imported run has one)")
        text = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with StoredModel(run_dir, device=device, dtype=dtype) as model:
        new = generate_ids(model, ids, sampling, tokenizer.eos_id)
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    return tokenizer.decode(new)
