"""Flat layouts: how a unit's named parameters pack into one contiguous buffer.

Every stored record (params, master weights, Adam moments, gradients) of a unit is one flat 1-D buffer in
the same element order, so I/O is one request per record and AdamW runs over plain element ranges. Tensors
that take weight decay come first, so the optimizer needs one boundary (`decay_numel`), not a mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSlice:
    """One named parameter inside a flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    decay: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatLayout:
    """The ordered slices of a unit; `decay_numel` elements at the front take weight decay."""

    slices: tuple[ParamSlice, ...]
    numel: int
    decay_numel: int

    @staticmethod
    def build(named_shapes: Iterable[tuple[str, tuple[int, ...], bool]]) -> FlatLayout:
        entries = list(named_shapes)
        ordered = [e for e in entries if e[2]] + [e for e in entries if not e[2]]
        slices, offset, decay_numel = [], 0, 0
        for name, shape, decay in ordered:
            s = ParamSlice(name, tuple(shape), offset, decay)
            slices.append(s)
            offset += s.numel
            if decay:
                decay_numel += s.numel
        return FlatLayout(tuple(slices), offset, decay_numel)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into `flat` (no copies); gradients of the views flow back into `flat`."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slices}

    def flatten(self, named: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pack named tensors into a new flat buffer in layout order."""
        flat = torch.empty(self.numel, dtype=dtype)
        for s in self.slices:
            flat[s.offset : s.offset + s.numel].copy_(named[s.name].reshape(-1))
        return flat
