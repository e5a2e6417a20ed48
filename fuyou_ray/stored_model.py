"""A committed run's model, run unit by unit on weights read from its SSD store (eval and generation).

Like training, it never holds more of the model than it must: a unit's weights are read from the store
when the unit runs, and kept afterwards only while the resident units fit `cache_bytes` (the whole of a
small model, nothing of a 70B one, where each forward re-streams every layer). Outside any Ray job: open
it only when the run is not training (opening a store drops the files an in-flight step has staged).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fuyou_ray.config import RunConfig
from fuyou_ray.data import Batch
from fuyou_ray.inspect import load_run_config
from fuyou_ray.models import IGNORE_INDEX, KVCache, ModelSpec
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import DTYPES
from fuyou_ray.store import SSDTensorStore, aligned_buffer


class StoredModel:
    """The units of a run's committed model with weights streamed from its store.

    Lifecycle: opening reads the run config and opens the store; `unit_params(i)` reads unit i (or takes
    it from the cache); `logits`, `loss_sums` and `step_cached` run units in order; `close()` (or leaving
    the `with` block) closes the store.
    """

    def __init__(
        self,
        run: str | Path | RunConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        kind: RecordKind = RecordKind.PARAM,
        cache_bytes: int | None = None,
    ) -> None:
        self.cfg = run if isinstance(run, RunConfig) else load_run_config(run)
        self.spec = ModelSpec(self.cfg.model)
        self.device, self.dtype, self.kind = torch.device(device), dtype, kind
        self.cache_bytes = int(self.cfg.budgets.cpu_mem if cache_bytes is None else cache_bytes)
        self.modules = [self.spec.build_unit(u.index, "meta") for u in self.spec.units]
        self.store = SSDTensorStore(self.cfg.ssd.paths, direct_io=self.cfg.ssd.direct_io)
        if self.store.committed_step < 0:
            self.store.close()
            raise ValueError(f"{self.cfg.run_dir}: the store holds no committed weights yet")
        self.step = self.store.committed_step
        self._buffer = aligned_buffer(max(u.numel for u in self.spec.units) * 4)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.bytes_read = 0

    def __enter__(self) -> StoredModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cache.clear()
        self.store.close()

    def unit_params(self, index: int) -> dict[str, torch.Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        unit = self.spec.units[index]
        rec = self.store.read_into(record_name(index, self.kind), memoryview(self._buffer))
        self.bytes_read += rec.padded_nbytes
        flat = torch.frombuffer(self._buffer, dtype=DTYPES[rec.dtype], count=unit.numel)
        flat = flat.to(self.device, self.dtype, copy=True)
        params = unit.layout.unflatten(flat)
        nbytes = flat.numel() * flat.element_size()
        if nbytes <= self.cache_bytes:
            self._cache[index] = params
            while (
                sum(p.numel() * p.element_size() for c in self._cache.values() for p in c.values())
                > self.cache_bytes
            ):
                self._cache.popitem(last=False)
        return params

    def run_unit(self, index: int, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return functional_call(self.modules[index], self.unit_params(index), (x,), kwargs)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a (B, S) token batch, unit by unit (each unit's weights read once)."""
        x = tokens.to(self.device)
        for unit in self.spec.units:
            x = self.run_unit(unit.index, x)
        return x

    @torch.no_grad()
    def loss_sums(self, batches: list[Batch], micro_batch: int) -> tuple[float, int]:
        """Summed next-token cross entropy and the number of targets that take loss, over `batches`.

        Layer-outer like training: every micro-batch goes through unit i before unit i + 1 is read, so each
        unit is read once per call, whatever the number of batches.
        """
        xs = [x.to(self.device) for b in batches for x, _ in b.micro_batches(micro_batch)]
        ys = [y.to(self.device) for b in batches for _, y in b.micro_batches(micro_batch)]
        for unit in self.spec.units[:-1]:
            xs = [self.run_unit(unit.index, x) for x in xs]
        head = self.spec.units[-1].index
        total, count = 0.0, 0
        for x, y in zip(xs, ys, strict=True):
            logits = self.run_unit(head, x).float()
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            )
            count += int((y != IGNORE_INDEX).sum())
        return total, count

    @torch.no_grad()
    def step_cached(self, tokens: torch.Tensor, caches: list[KVCache], start_pos: int) -> torch.Tensor:
        """Logits of new positions `tokens` (B, S) given the keys/values of earlier ones in `caches`."""
        x = self.run_unit(0, tokens.to(self.device), start_pos=start_pos)
        for unit, cache in zip(self.spec.units[1:-1], caches, strict=True):
            x = self.run_unit(unit.index, x, cache=cache)
        return self.run_unit(self.spec.units[-1].index, x)
