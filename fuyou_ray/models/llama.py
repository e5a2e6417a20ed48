"""The Llama family (Llama 2/3, Mistral, Qwen2) written for layer-wise execution.

Units as for GPT: embedding, n_layer decoder blocks, final norm + LM head; each a plain `nn.Module` built
on the `meta` device and run with `torch.func.functional_call` on views of a streamed flat buffer.
Parameter names inside a unit are the Hugging Face names below `model.layers.{i}.` (and `model.` for the
embedding and final norm), so the checkpoint adapter is a prefix, not a rename table.

The arithmetic follows transformers' LlamaForCausalLM step for step (RMSNorm in fp32 then cast back, the
same inverse-frequency formula for RoPE, rotate_half, SiLU-gated MLP, SDPA with scale head_dim**-0.5), so
an imported checkpoint gives transformers' logits to float rounding. Differences by family are config
flags: grouped-query attention (`n_kv_head`), Qwen2's q/k/v bias (`qkv_bias`), Mistral's sliding window
(`sliding_window`), Llama 3.1's RoPE scaling (`rope_scaling`). No dropout: replayed steps are bit-exact.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fuyou_ray.config import ModelConfig, RopeScalingConfig
from fuyou_ray.models.cache import KVCache
from fuyou_ray.models.lm_head import LMHead


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the scale (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq_cpu(head_size: int, theta: float, scaling: RopeScalingConfig | None) -> torch.Tensor:
    """RoPE inverse frequencies, computed on the CPU in fp32 exactly as transformers computes them."""
    exponent = torch.arange(0, head_size, 2, dtype=torch.int64).to(dtype=torch.float) / head_size
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (S, head_size) for integer `positions` of shape (S,)."""
    inv_freq = _inv_freq_cpu(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(positions.device)
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor | None:
    """A boolean (q_len, k_len) mask, or None where plain causal SDPA (or no mask) is exact.

    Queries are the last q_len positions of k_len. With a sliding window, key j is visible to query i
    when i - window < j <= i (transformers' sliding-window convention).
    """
    if (window == 0 or k_len <= window) and (q_len == k_len or q_len == 1):
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed


class LlamaEmbedding(nn.Module):
    """Token embedding: tokens (B, S) int64 -> hidden (B, S, h). Positions enter in the blocks (RoPE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.embed_tokens(tokens)


class LlamaAttention(nn.Module):
    """Grouped-query attention with RoPE; `cache` (generation only) holds earlier keys and values."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.hd).transpose(1, 2)
        start = cache.length if cache is not None else 0
        cos, sin = rope_cos_sin(self.cfg, torch.arange(start, start + s, device=x.device), q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(k, v)
        mask = attention_mask(s, k.shape[2], self.cfg.sliding_window, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and s > 1,
            scale=self.hd**-0.5,
            enable_gqa=self.n_kv != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_head * self.hd))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One decoder layer: x + attn(norm(x)), then + mlp(norm(.)). Submodules in transformers' order, so
    parameters (and their gradient norms, for clipping) come in the same order as in transformers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaHead(nn.Module):
    """Final RMSNorm + LM head: hidden (B, S, h) -> logits (B, S, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def build_llama_unit(cfg: ModelConfig, index: int) -> nn.Module:
    """Unit `index`: 0 = embedding, 1..n_layer = decoder layers, n_layer+1 = norm + head."""
    if index == 0:
        return LlamaEmbedding(cfg)
    if 1 <= index <= cfg.n_layer:
        return LlamaBlock(cfg)
    if index == cfg.n_layer + 1:
        return LlamaHead(cfg)
    raise IndexError(f"Llama with {cfg.n_layer} layers has units 0..{cfg.n_layer + 1}, not {index}")


def init_llama_tensor(cfg: ModelConfig, name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """transformers' Llama init: N(0, init_std) for weights and embeddings, ones for norms, zero biases."""
    if name.endswith("bias"):
        t.zero_()
    elif "norm" in name:
        t.fill_(1.0)
    else:
        t.normal_(0.0, cfg.init_std, generator=gen)
