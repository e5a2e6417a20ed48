"""GPT-NeoX (Pythia, GPT-NeoX-20B) exactly as Hugging Face checkpoints hold it, for layer-wise execution.

Units as for the other families: embedding (`embed_in`), n_layer blocks, final LayerNorm + untied LM head
(`embed_out`); each a plain `nn.Module` built on the `meta` device and run with
`torch.func.functional_call` on views of a streamed flat buffer. Parameter names inside a unit are
transformers' below `gpt_neox.layers.{i}.` (and `gpt_neox.` for the embedding and final norm), so the
checkpoint adapter is a prefix, not a rename table.

The fused `query_key_value` projection is kept as the checkpoint stores it: its 3h output rows are laid
out per head as (heads, 3, head_dim), so the forward splits it exactly as transformers does (view to
(B, S, heads, 3 * head_dim), then chunk into q, k, v). Keeping the checkpoint's layout and arithmetic,
rather than three separate projections, keeps training equal to transformers to float rounding: with
partial rotary, the key bias's pass-through dims have a gradient that is exactly zero in exact arithmetic,
so in floats it is rounding noise that Adam scales up to a full step, and only the same kernels on the
same shapes make the same noise (as for GPT-2's Conv1D, see gpt2.py).

NeoX specifics, all config flags: LayerNorm with bias, partial RoPE (`rotary_pct` of each head's dims,
rotate-half convention, optional linear scaling), parallel residual (`parallel_residual`:
x + attn(ln1(x)) + mlp(ln2(x)), else sequential), the GELU variant named by `hidden_act`, bias on the
attention projections (`qkv_bias` and `attn_out_bias`, equal: HF `attention_bias`). No dropout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fuyou_ray.config import ModelConfig, RopeScalingConfig
from fuyou_ray.models.cache import KVCache
from fuyou_ray.models.gpt2 import gelu_new
from fuyou_ray.models.llama import rotate_half
from fuyou_ray.models.lm_head import LMHead


def _gelu_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# HF `hidden_act` names -> the formula transformers' ACT2FN runs for each, written the same way (the same
# ops in the same order give the same rounding, which the training equivalence needs).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": _gelu_python,
    "gelu_new": gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_accurate": _gelu_accurate,
    "quick_gelu": _quick_gelu,
}


def rotary_dims(cfg: ModelConfig) -> int:
    """How many leading dims of each head RoPE rotates (transformers: int(head_dim * rotary_pct))."""
    return int(cfg.head_size * cfg.rotary_pct)


@functools.lru_cache(maxsize=16)
def _inv_freq_cpu(dim: int, theta: float, scaling: RopeScalingConfig | None) -> torch.Tensor:
    """Inverse frequencies of the rotated dims, on the CPU in fp32, with transformers' formula."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if scaling is not None:  # linear only (the adapter and the config refuse the rest)
        inv_freq = inv_freq / scaling.factor
    return inv_freq


def neox_cos_sin(
    cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (S, rotary_dims) for integer `positions` of shape (S,)."""
    inv_freq = _inv_freq_cpu(rotary_dims(cfg), cfg.rope_theta, cfg.rope_scaling).to(positions.device)
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first cos.shape[-1] dims of q and k (rotate-half); the rest pass through unchanged."""
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


class NeoXEmbedding(nn.Module):
    """Token embedding: tokens (B, S) int64 -> hidden (B, S, h). Positions enter in the blocks (RoPE)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.embed_in(tokens)


class NeoXAttention(nn.Module):
    """Multi-head attention over a fused qkv projection with partial RoPE; `cache` is for generation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_head, self.hd = cfg.n_head, cfg.head_size
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # Output rows are (heads, 3, head_dim): per head, its q, k and v lie side by side.
        qkv = self.query_key_value(x).view(b, s, self.n_head, 3 * self.hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        start = cache.length if cache is not None else 0
        cos, sin = neox_cos_sin(self.cfg, torch.arange(start, start + s, device=x.device), q.dtype)
        q, k = apply_partial_rotary(q, k, cos, sin)
        if cache is not None:
            if cache.length and s > 1:
                raise ValueError("a KV cache holding positions takes one new position at a time")
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=self.hd**-0.5)
        y = y.transpose(1, 2).contiguous()
        return self.dense(y.reshape(b, s, -1).contiguous())


class NeoXMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))), act named by `hidden_act`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.dense_4h_to_h = nn.Linear(cfg.mlp_width, cfg.d_model)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class NeoXBlock(nn.Module):
    """One GPT-NeoX layer, parallel or sequential residual. Submodules in transformers' order, so
    parameters (and their gradient norms, for clipping) come in the same order as in transformers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attention = NeoXAttention(cfg)
        self.mlp = NeoXMLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cache)
        # The sums in transformers' order: float addition is not associative.
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        attn = attn + x
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class NeoXHead(nn.Module):
    """Final LayerNorm + untied LM head (`embed_out`): hidden (B, S, h) -> logits (B, S, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.embed_out = LMHead(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_out(self.final_layer_norm(x))


def build_neox_unit(cfg: ModelConfig, index: int) -> nn.Module:
    """Unit `index`: 0 = embedding, 1..n_layer = layers, n_layer+1 = final norm + head."""
    if index == 0:
        return NeoXEmbedding(cfg)
    if 1 <= index <= cfg.n_layer:
        return NeoXBlock(cfg)
    if index == cfg.n_layer + 1:
        return NeoXHead(cfg)
    raise IndexError(f"GPT-NeoX with {cfg.n_layer} layers has units 0..{cfg.n_layer + 1}, not {index}")


def init_neox_tensor(cfg: ModelConfig, name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """transformers' GPT-NeoX init: N(0, init_std) for weights and embeddings, LayerNorm 1/0, zero biases."""
    if name.endswith("bias"):
        t.zero_()
    elif "norm" in name:
        t.fill_(1.0)
    else:
        t.normal_(0.0, cfg.init_std, generator=gen)
