"""GPT-2 exactly as Hugging Face checkpoints hold it, written for layer-wise execution (`arch: gpt2`).

The same network as gpt.py, but in GPT-2's own parameter layout and arithmetic: projections are Conv1D
(weight stored (in, out), applied as addmm(bias, x, W)), the MLP uses the "gelu_new" tanh formula, the
attention scale is passed as head_dim**-0.5. Training on the layout and arithmetic the checkpoint was made
with keeps fuyou-ray equal to transformers to float rounding even where Adam magnifies rounding (the key
bias's gradient is exactly zero in exact arithmetic, so in floats it is pure rounding noise that Adam
scales up to a full step): a transposed layout would be the same model, but not the same numbers.
Import and export are then plain copies. Parameter names are transformers' below `transformer.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fuyou_ray.config import ModelConfig
from fuyou_ray.models.cache import KVCache
from fuyou_ray.models.lm_head import LMHead


class Conv1D(nn.Module):
    """GPT-2's projection: weight (in, out), y = addmm(bias, x, weight)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """OpenAI GPT's GELU, written as transformers' NewGELUActivation writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Embedding(nn.Module):
    """Token + learned position embedding: tokens (B, S) int64 -> hidden (B, S, h)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        positions = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)[None]
        return self.wte(tokens) + self.wpe(positions)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.hd = cfg.n_head, cfg.d_model // cfg.n_head
        self.c_attn = Conv1D(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = Conv1D(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        q, k, v = (t.view(*t.shape[:-1], -1, self.hd).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if cache.length and q.shape[2] > 1:
                raise ValueError("a KV cache holding positions takes one new position at a time")
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.hd**-0.5)
        y = y.transpose(1, 2).contiguous()
        return self.c_proj(y.reshape(*y.shape[:-2], -1).contiguous())


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.d_model, cfg.mlp_width)
        self.c_proj = Conv1D(cfg.mlp_width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-LN block; submodules (and so parameters and their clipping norms) in transformers' order."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.attn(self.ln_1(x), cache) + x
        return x + self.mlp(self.ln_2(x))


class GPT2Head(nn.Module):
    """Final LayerNorm + LM head (an ordinary (vocab, h) Linear in GPT-2 too)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def build_gpt2_unit(cfg: ModelConfig, index: int) -> nn.Module:
    """Unit `index`: 0 = embeddings, 1..n_layer = blocks, n_layer+1 = final norm + head."""
    if index == 0:
        return GPT2Embedding(cfg)
    if 1 <= index <= cfg.n_layer:
        return GPT2Block(cfg)
    if index == cfg.n_layer + 1:
        return GPT2Head(cfg)
    raise IndexError(f"GPT-2 with {cfg.n_layer} layers has units 0..{cfg.n_layer + 1}, not {index}")
