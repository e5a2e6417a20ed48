"""Model specs: a network as a list of units with flat layouts, and its in-memory reference.

`ModelSpec` is what the pipeline needs to know about a model: how many units, each unit's flat layout, how
to build a weightless unit module, and how to initialise a unit's weights deterministically (unit by unit,
so a model larger than RAM is initialised straight into the store). It knows nothing of where weights live.
Architectures are registered in `ARCHITECTURES` (one model file each: gpt.py, gpt2.py, llama.py,
gpt_neox.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fuyou_ray.config import ModelConfig
from fuyou_ray.models.cache import KVCache
from fuyou_ray.models.gpt import IGNORE_INDEX, build_gpt_unit, lm_loss
from fuyou_ray.models.gpt2 import build_gpt2_unit
from fuyou_ray.models.gpt_neox import build_neox_unit, init_neox_tensor
from fuyou_ray.models.layout import FlatLayout, ParamSlice
from fuyou_ray.models.llama import build_llama_unit, init_llama_tensor

__all__ = [
    "ARCHITECTURES",
    "IGNORE_INDEX",
    "FlatLayout",
    "KVCache",
    "ModelSpec",
    "ParamSlice",
    "ReferenceModel",
    "UnitSpec",
    "lm_loss",
]

InitTensor = Callable[[ModelConfig, str, torch.Tensor, torch.Generator], None]


def _init_gpt_tensor(cfg: ModelConfig, name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream stays O(1)."""
    if name.endswith("bias"):
        t.zero_()
    elif "ln" in name:
        t.fill_(1.0)
    else:
        std = cfg.init_std / (2 * cfg.n_layer) ** 0.5 if name.endswith("c_proj.weight") else cfg.init_std
        t.normal_(0.0, std, generator=gen)


@dataclass(frozen=True)
class Architecture:
    """How to build unit `i` of an architecture on the current default device, and how to initialise it."""

    build: Callable[[ModelConfig, int], nn.Module]
    init_tensor: InitTensor


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": Architecture(build_gpt_unit, _init_gpt_tensor),
    "gpt2": Architecture(build_gpt2_unit, _init_gpt_tensor),
    "llama": Architecture(build_llama_unit, init_llama_tensor),
    "gpt_neox": Architecture(build_neox_unit, init_neox_tensor),
}


@dataclass(frozen=True)
class UnitSpec:
    """One unit of a layer-wise model: its position, a readable name and its flat layout."""

    index: int
    name: str
    layout: FlatLayout

    @property
    def numel(self) -> int:
        return self.layout.numel


class ModelSpec:
    """The units of a model and how to build and initialise each one. Immutable after construction."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.arch not in ARCHITECTURES:
            raise ValueError(
                f"model.arch {cfg.arch!r} is not supported; choose one of {sorted(ARCHITECTURES)}"
            )
        self.config = cfg
        self.arch = ARCHITECTURES[cfg.arch]
        units = []
        for index in range(cfg.n_layer + 2):
            with torch.device("meta"):
                module = self.arch.build(cfg, index)
            layout = FlatLayout.build((n, tuple(p.shape), p.dim() >= 2) for n, p in module.named_parameters())
            units.append(UnitSpec(index, _unit_name(index, cfg.n_layer), layout))
        self.units: tuple[UnitSpec, ...] = tuple(units)

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    def build_unit(self, index: int, device: str | torch.device = "meta") -> nn.Module:
        """A unit module; on `meta` it holds no weights and runs through functional_call."""
        with torch.device(device):
            return self.arch.build(self.config, index)

    def init_unit(self, index: int, seed: int) -> torch.Tensor:
        """Deterministic fp32 initial weights of one unit as a flat buffer (the architecture's init)."""
        unit = self.units[index]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        flat = torch.empty(unit.numel, dtype=torch.float32)
        named = unit.layout.unflatten(flat)
        for s in unit.layout.slices:
            self.arch.init_tensor(self.config, s.name, named[s.name], gen)
        return flat

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 6 x params, plus attention scores)."""
        cfg = self.config
        return 6.0 * self.numel + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_size * seq_len


def _unit_name(index: int, n_layer: int) -> str:
    if index == 0:
        return "embed"
    if index == n_layer + 1:
        return "head"
    return f"block.{index - 1}"


class ReferenceModel(nn.Module):
    """The same units with real, resident weights: the plain model fuyou-ray must agree with."""

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        super().__init__()
        self.spec = spec
        self.units = nn.ModuleList(spec.build_unit(i, "cpu") for i in range(spec.num_units))
        with torch.no_grad():
            for unit, module in zip(spec.units, self.units, strict=True):
                for name, value in unit.layout.unflatten(spec.init_unit(unit.index, seed)).items():
                    module.get_parameter(name).copy_(value)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for module in self.units:
            x = module(x)
        return x

    def flat_unit(self, index: int) -> torch.Tensor:
        """Unit `index`'s weights as a flat fp32 buffer in layout order."""
        layout = self.spec.units[index].layout
        named = dict(self.units[index].named_parameters())
        return layout.flatten({k: v.detach() for k, v in named.items()})
