"""Key/value cache of one attention layer, for incremental decoding (generation only, never training)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values seen so far by one attention layer, (B, kv_heads, T, head_size) each.

    Lifecycle: created empty per layer when a generation starts; each forward of the layer appends the
    new positions and attends over everything held; dropped when the generation ends.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; returns all keys and values held."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v
