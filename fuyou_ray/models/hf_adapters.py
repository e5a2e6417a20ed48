"""State-dict adapters between Hugging Face checkpoints and fuyou-ray's units.

An adapter knows, for one family of HF architectures: how config.json maps to a `ModelConfig` (refusing
what the model files do not implement, by name), which HF tensor each unit parameter is (and whether it is
stored transposed), and how to write config.json back. Tied embeddings: fuyou-ray streams units
independently, so a tied checkpoint is trained untied - import copies the embedding into the LM head
unit; export writes both tensors and sets `tie_word_embeddings: false`.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fuyou_ray.config import ModelConfig, RopeScalingConfig
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.gpt_neox import ACTIVATIONS as NEOX_ACTIVATIONS


class UnsupportedModelError(ValueError):
    """A checkpoint's architecture or one of its settings is not implemented; the message lists what is."""


@dataclass(frozen=True)
class TensorMap:
    """Unit parameter `unit`/`name` is HF tensor `hf_name` (shape `hf_shape`; transposed if `transpose`)."""

    unit: int
    name: str
    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False


class HFAdapter(abc.ABC):
    """One family of HF causal-LM architectures."""

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def model_config(self, hf: Mapping[str, Any]) -> ModelConfig:
        """The ModelConfig of an HF config.json, or UnsupportedModelError naming the setting."""

    @abc.abstractmethod
    def hf_name(self, unit: int, name: str, cfg: ModelConfig) -> tuple[str, bool]:
        """The HF tensor name of a unit parameter, and whether HF stores it transposed."""

    @abc.abstractmethod
    def new_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """A config.json for a model that did not come from an HF checkpoint."""

    def tied_fallback(self) -> dict[str, str]:
        """HF tensors that a tied checkpoint omits, and the tensor that stands in for each."""
        return {}

    def ignorable(self, hf_name: str) -> bool:
        """Tensors some checkpoints carry that are not weights (cached buffers)."""
        return False

    def tensor_map(self, spec: ModelSpec) -> list[TensorMap]:
        """Every parameter of every unit, in unit and layout order."""
        maps = []
        for unit in spec.units:
            for s in unit.layout.slices:
                hf_name, transpose = self.hf_name(unit.index, s.name, spec.config)
                shape = (s.shape[1], s.shape[0]) if transpose else s.shape
                maps.append(TensorMap(unit.index, s.name, hf_name, tuple(shape), transpose))
        return maps

    def hf_config(self, cfg: ModelConfig, source: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
        """config.json for an export: the source's, untied and in `dtype`, or a new one."""
        out = copy.deepcopy(dict(source)) if source is not None else self.new_hf_config(cfg)
        out["tie_word_embeddings"] = False
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
        for key in keys:  # transformers 5 writes `dtype`, 4.x `torch_dtype`: keep the source's spelling
            out[key] = dtype
        return out


def _get(hf: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UnsupportedModelError(message)


class LlamaFamilyAdapter(HFAdapter):
    """LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM onto `arch: llama`."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    model_types = ("llama", "mistral", "qwen2")

    def model_config(self, hf: Mapping[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        act = hf.get("hidden_act", "silu")
        _require(act == "silu", f"hidden_act {act!r} is not supported (the Llama MLP here is SiLU-gated)")
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(_get(hf, "head_dim", default=d // heads))
        rope = dict(_get(hf, "rope_parameters", default={}) or {})
        legacy = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", legacy.get("rope_type", legacy.get("type"))))
        theta = float(_get(rope, "rope_theta", default=_get(hf, "rope_theta", default=10000.0)))
        params = {**legacy, **rope}
        _require(
            float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) == 1.0,
            "partial_rotary_factor != 1 is not supported",
        )
        scaling: RopeScalingConfig | None = None
        if rope_type in (None, "default"):
            scaling = None
        elif rope_type == "linear":
            scaling = RopeScalingConfig(type="linear", factor=float(params["factor"]))
        elif rope_type == "llama3":
            scaling = RopeScalingConfig(
                type="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", hf["max_position_embeddings"])
                ),
            )
        else:
            raise UnsupportedModelError(
                f"RoPE scaling {rope_type!r} is not supported; supported: default, linear, llama3"
            )
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
        window = 0
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
            layer_types = hf.get("layer_types") or []
            sliding = hf.get("use_sliding_window", False) or "sliding_attention" in layer_types
            _require(
                not sliding or int(hf.get("max_window_layers", 0)) >= int(hf["num_hidden_layers"]),
                "Qwen2 with use_sliding_window (sliding attention on some layers only) is not supported",
            )
        elif model_type == "mistral":
            window = int(hf.get("sliding_window") or 0)
        return ModelConfig(
            arch="llama",
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=heads,
            d_model=d,
            max_seq_len=int(hf["max_position_embeddings"]),
            init_std=float(hf.get("initializer_range", 0.02)),
            intermediate_size=int(hf["intermediate_size"]),
            n_kv_head=int(_get(hf, "num_key_value_heads", default=heads)),
            head_dim=0 if head_dim * heads == d else head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            attn_out_bias=out_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
        )

    def hf_name(self, unit: int, name: str, cfg: ModelConfig) -> tuple[str, bool]:
        if unit == 0:
            return f"model.{name}", False
        if unit == cfg.n_layer + 1:
            return (name if name.startswith("lm_head") else f"model.{name}"), False
        return f"model.layers.{unit - 1}.{name}", False

    def tied_fallback(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"}

    def ignorable(self, hf_name: str) -> bool:
        return hf_name.endswith("rotary_emb.inv_freq")

    def new_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        if cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias and not cfg.sliding_window:
            model_type, arch = "qwen2", "Qwen2ForCausalLM"
        elif cfg.sliding_window and not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias):
            model_type, arch = "mistral", "MistralForCausalLM"
        elif cfg.qkv_bias == cfg.attn_out_bias and not cfg.sliding_window:
            model_type, arch = "llama", "LlamaForCausalLM"
        else:
            raise UnsupportedModelError(
                "no transformers architecture has this combination of qkv_bias, attn_out_bias, mlp_bias "
                "and sliding_window"
            )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling is not None:
            extra = asdict(cfg.rope_scaling)
            rope = {"rope_type": extra.pop("type"), "rope_theta": cfg.rope_theta, **extra}
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.mlp_width,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_size,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None
            if cfg.rope_scaling is None
            else {k: v for k, v in rope.items() if k != "rope_theta"},
            "rope_parameters": rope,
        }
        if model_type == "llama":
            out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if model_type == "mistral":
            out["sliding_window"] = cfg.sliding_window
        if model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        return out


class GPT2Adapter(HFAdapter):
    """GPT2LMHeadModel onto `arch: gpt2` (its own layout); export also takes `arch: gpt` runs, whose
    Linear weights it transposes into Conv1D's (in, out) and declares `gelu_pytorch_tanh`."""

    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
    _conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def model_config(self, hf: Mapping[str, Any]) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        _require(act == "gelu_new", f"activation_function {act!r} is not supported (supported: gelu_new)")
        _require(hf.get("scale_attn_weights", True), "scale_attn_weights: false is not supported")
        _require(
            not hf.get("scale_attn_by_inverse_layer_idx", False),
            "scale_attn_by_inverse_layer_idx: true is not supported",
        )
        _require(not hf.get("add_cross_attention", False), "add_cross_attention: true is not supported")
        return ModelConfig(
            arch="gpt2",
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            d_model=int(hf["n_embd"]),
            max_seq_len=int(hf["n_positions"]),
            init_std=float(hf.get("initializer_range", 0.02)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            intermediate_size=int(hf.get("n_inner") or 0),
        )

    def hf_name(self, unit: int, name: str, cfg: ModelConfig) -> tuple[str, bool]:
        if unit == 0:
            return f"transformer.{name}", False
        if unit == cfg.n_layer + 1:
            return (name if name.startswith("lm_head") else f"transformer.{name}"), False
        # arch gpt keeps Linear's (out, in); arch gpt2 holds GPT-2's own Conv1D (in, out).
        return f"transformer.h.{unit - 1}.{name}", cfg.arch == "gpt" and name in self._conv1d

    def tied_fallback(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"}

    def ignorable(self, hf_name: str) -> bool:
        return hf_name.endswith(("attn.bias", "attn.masked_bias")) and ".h." in hf_name

    def new_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.intermediate_size or None,
            "activation_function": "gelu_pytorch_tanh" if cfg.arch == "gpt" else "gelu_new",
            "layer_norm_epsilon": cfg.layer_norm_eps,
            "initializer_range": cfg.init_std,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }


class GPTNeoXAdapter(HFAdapter):
    """GPTNeoXForCausalLM (Pythia, GPT-NeoX-20B) onto `arch: gpt_neox`, in the checkpoint's own layout
    (fused query_key_value as stored), so import and export are plain copies.

    Reads both config spellings: transformers 4.x (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) and
    5.x (`rope_parameters` with `partial_rotary_factor`, `rope_theta`, `rope_type`). The LM head is
    `embed_out.weight`, the name Hub checkpoints use and transformers 5 still saves and loads."""

    architectures = ("GPTNeoXForCausalLM",)
    model_types = ("gpt_neox",)

    def model_config(self, hf: Mapping[str, Any]) -> ModelConfig:
        act = hf.get("hidden_act", "gelu")
        _require(
            act in NEOX_ACTIVATIONS,
            f"hidden_act {act!r} is not supported for GPT-NeoX; supported: {', '.join(NEOX_ACTIVATIONS)}",
        )
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        _require(d % heads == 0, f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
        rope = dict(hf.get("rope_parameters") or {})
        params = {**dict(hf.get("rope_scaling") or {}), **rope}
        rope_type = params.get("rope_type", params.get("type")) or "default"
        theta = float(
            _get(rope, "rope_theta", default=_get(hf, "rotary_emb_base", "rope_theta", default=10000))
        )
        # transformers' default when neither spelling is given is 0.25 (GPTNeoXConfig's rotary_pct).
        pct = float(
            _get(
                rope,
                "partial_rotary_factor",
                default=_get(hf, "rotary_pct", "partial_rotary_factor", default=0.25),
            )
        )
        _require(0 < pct <= 1, f"rotary_pct {pct} is not supported (must be in (0, 1])")
        rotary = int(d // heads * pct)
        _require(
            rotary % 2 == 0,
            f"rotary_pct {pct} rotates an odd number of dims ({rotary} of head size {d // heads}); "
            "not supported",
        )
        scaling: RopeScalingConfig | None = None
        if rope_type == "linear":
            scaling = RopeScalingConfig(type="linear", factor=float(params["factor"]))
        elif rope_type != "default":
            raise UnsupportedModelError(
                f"RoPE scaling {rope_type!r} (rope_scaling / rope_parameters) is not supported for GPT-NeoX; "
                "supported: default, linear"
            )
        bias = bool(hf.get("attention_bias", True))
        return ModelConfig(
            arch="gpt_neox",
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=heads,
            d_model=d,
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            init_std=float(hf.get("initializer_range", 0.02)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            intermediate_size=int(hf["intermediate_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=bias,
            attn_out_bias=bias,
            rotary_pct=pct,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            hidden_act=act,
        )

    def hf_name(self, unit: int, name: str, cfg: ModelConfig) -> tuple[str, bool]:
        if unit == 0:
            return f"gpt_neox.{name}", False
        if unit == cfg.n_layer + 1:
            return (name if name.startswith("embed_out") else f"gpt_neox.{name}"), False
        return f"gpt_neox.layers.{unit - 1}.{name}", False

    def tied_fallback(self) -> dict[str, str]:
        return {"embed_out.weight": "gpt_neox.embed_in.weight"}

    def ignorable(self, hf_name: str) -> bool:
        # Buffers older checkpoints carry: the causal mask, its fill value, RoPE's inverse frequencies.
        return hf_name.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))

    def new_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_pct,
        }
        if cfg.rope_scaling is not None:
            rope.update(rope_type="linear", factor=cfg.rope_scaling.factor)
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.mlp_width,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "hidden_act": cfg.hidden_act,
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "layer_norm_eps": cfg.layer_norm_eps,
            "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.qkv_bias,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            # transformers 5 reads rope_parameters; 4.x reads the three legacy keys.
            "rope_parameters": rope,
            "rotary_pct": cfg.rotary_pct,
            "rotary_emb_base": cfg.rope_theta,
            "rope_scaling": None
            if cfg.rope_scaling is None
            else {"type": "linear", "factor": cfg.rope_scaling.factor},
        }


ADAPTERS: tuple[HFAdapter, ...] = (LlamaFamilyAdapter(), GPT2Adapter(), GPTNeoXAdapter())


def supported_architectures() -> list[str]:
    return sorted(a for adapter in ADAPTERS for a in adapter.architectures)


def adapter_for(hf: Mapping[str, Any], where: str = "config.json") -> HFAdapter:
    """The adapter of an HF config.json, chosen by `architectures` (else `model_type`)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for adapter in ADAPTERS:
        if any(a in adapter.architectures for a in archs) or (
            not archs and model_type in adapter.model_types
        ):
            return adapter
    raise UnsupportedModelError(
        f"{where}: architecture {', '.join(archs) or '?'} (model_type {model_type!r}) is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )


def adapter_for_model(cfg: ModelConfig) -> HFAdapter:
    """The adapter that exports a run with no HF source config (arch gpt and gpt2 export as GPT-2)."""
    return {"llama": ADAPTERS[0], "gpt_neox": ADAPTERS[2]}.get(cfg.arch, ADAPTERS[1])
