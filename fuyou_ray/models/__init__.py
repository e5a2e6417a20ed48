"""Model specs: a network as a list of units with flat layouts, and its in-memory reference.

`ModelSpec` is what the pipeline needs to know about a model: how many units, each unit's flat layout, how
to build a weightless unit module, and how to initialise a unit's weights deterministically (unit by unit,
so a model larger than RAM is initialised straight into the store). It knows nothing of where weights live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fuyou_ray.config import ModelConfig
from fuyou_ray.models.gpt import build_gpt_unit, lm_loss
from fuyou_ray.models.layout import FlatLayout, ParamSlice

__all__ = ["FlatLayout", "ModelSpec", "ParamSlice", "ReferenceModel", "UnitSpec", "lm_loss"]

_BUILDERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"gpt": build_gpt_unit}


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
        if cfg.arch not in _BUILDERS:
            raise ValueError(f"model.arch {cfg.arch!r} is not supported; choose one of {sorted(_BUILDERS)}")
        self.config = cfg
        self._builder = _BUILDERS[cfg.arch]
        units = []
        for index in range(cfg.n_layer + 2):
            with torch.device("meta"):
                module = self._builder(cfg, index)
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
            return self._builder(self.config, index)

    def init_unit(self, index: int, seed: int) -> torch.Tensor:
        """Deterministic fp32 initial weights of one unit as a flat buffer (GPT-2 init)."""
        unit = self.units[index]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        flat = torch.empty(unit.numel, dtype=torch.float32)
        named = unit.layout.unflatten(flat)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream stays O(1).
        proj_std = self.config.init_std / (2 * self.config.n_layer) ** 0.5
        for s in unit.layout.slices:
            t = named[s.name]
            if s.name.endswith("bias"):
                t.zero_()
            elif "ln" in s.name:
                t.fill_(1.0)
            else:
                std = proj_std if s.name.endswith("c_proj.weight") else self.config.init_std
                t.normal_(0.0, std, generator=gen)
        return flat

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 6 x params, plus attention scores)."""
        cfg = self.config
        return 6.0 * self.numel + 12.0 * cfg.n_layer * cfg.d_model * seq_len


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
