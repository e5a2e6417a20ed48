"""Read a run back: its config, committed step, metrics, and the stored tensors (outside any Ray job)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fuyou_ray.config import RunConfig, config_from_dict, format_size
from fuyou_ray.errors import RunStateError
from fuyou_ray.models import ModelSpec
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import DTYPES
from fuyou_ray.store import SSDTensorStore, aligned_buffer


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunStateError(f"{run_dir} is not a fuyou-ray run dir (no config.yaml)")
    import yaml

    return config_from_dict(yaml.safe_load(path.read_text()))


def read_record(store: SSDTensorStore, name: str) -> torch.Tensor:
    """The newest durable version of record `name` (see SSDTensorStore.newest)."""
    rec = store.newest(name)
    buf = aligned_buffer(rec.nbytes)
    store.read_into(name, memoryview(buf), rec)
    return torch.frombuffer(buf, dtype=torch.uint8)[: rec.nbytes].view(DTYPES[rec.dtype]).clone()


def load_unit_tensors(cfg: RunConfig, kind: RecordKind = RecordKind.MASTER) -> list[torch.Tensor]:
    """Every unit's record of `kind` as a flat tensor: the committed one, or the one the step in progress
    published when the run stopped mid-step (the committed one is gone then). Do not call while the run
    is active."""
    spec = ModelSpec(cfg.model)
    store = SSDTensorStore(cfg.ssd.paths, direct_io=False)
    try:
        return [read_record(store, record_name(u.index, kind)) for u in spec.units]
    finally:
        store.close()


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    """A summary of a run dir: model size, committed step, last metrics, bytes on SSD."""
    cfg = load_run_config(run_dir)
    spec = ModelSpec(cfg.model)
    manifest_path = Path(cfg.ssd.paths[0]) / "fuyou-store" / "manifest.json"
    manifest: dict[str, Any] = {"step": -1, "records": []}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    metrics_path = Path(run_dir) / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    stored = sum(-(-r["nbytes"] // 4096) * 4096 for r in manifest["records"])
    return {
        "run_dir": str(run_dir),
        "model": (
            f"{cfg.model.arch} {spec.numel:,} params, {cfg.model.n_layer} layers, d_model {cfg.model.d_model}"
        ),
        "committed_step": manifest["step"],
        "target_steps": cfg.steps,
        "records": len(manifest["records"]),
        "bytes_on_ssd": format_size(stored),
        "ssd_paths": list(cfg.ssd.paths),
        "last_metrics": json.loads(lines[-1]) if lines else None,
    }
