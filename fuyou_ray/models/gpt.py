"""GPT (GPT-2 / GPT-3 architecture) written for layer-wise execution.

The network is a sequence of units - embedding, n_layer transformer blocks, final norm + LM head - and each
unit is a plain `nn.Module` whose weights may be absent between uses: the pipeline builds units on the
`meta` device and runs them with `torch.func.functional_call`, handing in views of a flat buffer that was
streamed from SSD. `GPT` assembles the same units with real weights, as the in-memory reference.
Pre-LayerNorm blocks, GELU (tanh) MLP of width 4h (or `intermediate_size`), learned absolute positions,
untied LM head, no dropout (fine-tuning runs are deterministic, so a replayed step reproduces bit for bit).
Parameter names are GPT-2's (below `transformer.h.{i}.`), but Linear weights are (out, in) where GPT-2's
Conv1D stores (in, out): the Hugging Face adapter transposes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuyou_ray.config import ModelConfig
from fuyou_ray.models.cache import KVCache
from fuyou_ray.models.lm_head import LMHead


class GPTEmbedding(nn.Module):
    """Token + position embedding: tokens (B, S) int64 -> hidden (B, S, h)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        positions = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)


class GPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.c_attn(x).split(h, dim=2)
        # (B, S, h) -> (B, heads, S, h/heads)
        q, k, v = (t.view(b, s, self.n_head, h // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # Generation: prefill (empty cache, causal) or one new position attending to all before it.
            if cache.length and s > 1:
                raise ValueError("a KV cache holding positions takes one new position at a time")
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, h))


class GPTMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPTBlock(nn.Module):
    """One pre-LN transformer block: x + attn(ln(x)), then + mlp(ln(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = GPTAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = GPTMLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPTHead(nn.Module):
    """Final LayerNorm + LM head: hidden (B, S, h) -> logits (B, S, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def build_gpt_unit(cfg: ModelConfig, index: int) -> nn.Module:
    """Unit `index` of the layer-wise GPT: 0 = embedding, 1..n_layer = blocks, n_layer+1 = head."""
    if index == 0:
        return GPTEmbedding(cfg)
    if 1 <= index <= cfg.n_layer:
        return GPTBlock(cfg)
    if index == cfg.n_layer + 1:
        return GPTHead(cfg)
    raise IndexError(f"GPT with {cfg.n_layer} layers has units 0..{cfg.n_layer + 1}, not {index}")


IGNORE_INDEX = -100  # a target that takes no loss (prompt tokens, padding): cross_entropy's default


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over the targets that are not IGNORE_INDEX.

    Written as sum / count rather than reduction='mean' so that a micro-batch whose targets are all
    ignored (a row of prompt only) contributes 0 with zero gradient instead of NaN.
    """
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)
