"""Hugging Face checkpoints in and out of a run: `import_checkpoint` and `export_checkpoint`.

Import streams a safetensors checkpoint unit by unit straight into a new run's SSD store - params in the
compute dtype, fp32 master weights, zeroed Adam moments - and commits it as step 0 with the fingerprint the
driver checks, so `fuyou-ray train RUN_DIR/config.yaml` resumes from it. Memory: one staging buffer the
size of the largest unit in fp32 (what a ring slot holds anyway) plus one read chunk, whatever the model
size; the checkpoint is never mapped or loaded whole. The source's config.json and tokenizer files are kept
in RUN_DIR/hf/: data uses that tokenizer, export writes that config back.

Export reads each unit's committed fp32 master weights in turn and writes them, converted to the source's
dtype, as sharded safetensors + index, config.json (`tie_word_embeddings: false`: see hf_adapters) and the
tokenizer files. Do not export a run while it is training: open stores drop another process's staged files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuyou_ray.config import (
    BudgetConfig,
    ConfigError,
    RunConfig,
    Size,
    config_from_dict,
    save_config,
)
from fuyou_ray.costmodel import working_bytes
from fuyou_ray.driver import model_fingerprint
from fuyou_ray.errors import RunStateError
from fuyou_ray.inspect import load_run_config
from fuyou_ray.memory import MemoryMeter
from fuyou_ray.models import ModelSpec
from fuyou_ray.models.hf_adapters import (
    HFAdapter,
    TensorMap,
    UnsupportedModelError,
    adapter_for,
    adapter_for_model,
)
from fuyou_ray.plan import Plan, check_ssd_space, estimate_device_bytes, make_plan
from fuyou_ray.records import RecordKind, record_name
from fuyou_ray.ring import DTYPES
from fuyou_ray.safetensors_io import (
    CheckpointError,
    CheckpointReader,
    PlannedTensor,
    ShardedCheckpointWriter,
)
from fuyou_ray.schedule import MIN_SLOTS
from fuyou_ray.store import SSDTensorStore, align_up, aligned_buffer
from fuyou_ray.tokenizer import TokenizerError

log = logging.getLogger("fuyou.hf")

HF_SUBDIR = "hf"  # RUN_DIR/hf: the source checkpoint's config.json, tokenizer and generation config
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
METADATA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 1000**3


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def source_dtype(hf: dict[str, Any]) -> str:
    """The dtype a checkpoint declares (transformers 5: `dtype`, 4.x: `torch_dtype`), else float32."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in EXPORT_DTYPES else "float32"


@contextlib.contextmanager
def checkpoint_errors_as_config_errors() -> Iterator[None]:
    """For the CLI: a bad checkpoint, tokenizer or prompt is bad input (one line, exit code 2)."""
    try:
        yield
    except (CheckpointError, UnsupportedModelError, TokenizerError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What an import wrote, and its memory high-water mark above the process's baseline."""

    run_dir: str
    config_path: str
    architecture: str
    params: int
    param_dtype: str
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_above_baseline: int  # the streaming's own memory: staging buffer, read chunk, store work
    peak_rss: int  # the whole process (interpreter + torch included)


def import_config(
    hf_dir: str | Path,
    run_dir: str | Path,
    base: RunConfig | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> RunConfig:
    """The run config of an import: `base` (or defaults) with the checkpoint's model, run_dir, tokenizer."""
    hf = read_hf_config(hf_dir)
    model = adapter_for(hf, str(Path(hf_dir) / "config.json")).model_config(hf)
    run_dir = Path(run_dir).resolve()
    if base is not None:
        tree = base.to_dict()
        if base.model != model and base.model != RunConfig().model:
            diff = [
                f.name
                for f in dataclasses.fields(model)
                if getattr(model, f.name) != getattr(base.model, f.name)
            ]
            log.warning(
                "the base config's model section differs from %s in %s: using the checkpoint's", hf_dir, diff
            )
    else:
        tree = RunConfig().to_dict()
        tree["ssd"]["paths"] = [str(run_dir / "ssd")]
    tree["run_dir"] = str(run_dir)
    tree["model"] = dataclasses.asdict(model)
    if tree["data"].get("tokenizer") is None and (Path(hf_dir) / "tokenizer.json").is_file():
        tree["data"]["tokenizer"] = str(run_dir / HF_SUBDIR)
    tree["batch"]["seq_len"] = min(tree["batch"]["seq_len"], model.max_seq_len)
    cfg = config_from_dict(tree, overrides)
    if base is None and not any(o.strip().startswith("budgets.") for o in overrides):
        cfg = dataclasses.replace(cfg, budgets=_fitting_budgets(cfg))
    return cfg


def _fitting_budgets(cfg: RunConfig) -> BudgetConfig:
    """Budgets that hold the model with the default batch, for an import given no config of its own."""
    spec = ModelSpec(cfg.model)
    slot = align_up(max(u.numel for u in spec.units) * 4)
    cpu = max(cfg.budgets.cpu_mem, (MIN_SLOTS + 3) * slot + working_bytes(spec))
    gpu = max(cfg.budgets.gpu_mem, int(estimate_device_bytes(cfg, spec, 2) * 1.25))
    return BudgetConfig(gpu_mem=Size(gpu), cpu_mem=Size(cpu))


def plan_for_import(cfg: RunConfig, spec: ModelSpec) -> Plan:
    """The plan the training run will make. An import may run where the training GPU is absent: with
    runtime.device 'cuda' it writes params in the GPU's compute dtype (bf16) all the same, and checks the
    device budget at that dtype (the CPU fallback's fp32 estimate would refuse a model the GPU can hold)."""
    return make_plan(cfg, spec, device="cuda" if cfg.runtime.device == "cuda" else None)


def resolve_sources(adapter: HFAdapter, spec: ModelSpec, reader: CheckpointReader, where: str) -> list[str]:
    """The checkpoint tensor feeding each entry of adapter.tensor_map(spec), checked before any write."""
    maps = adapter.tensor_map(spec)
    fallback = adapter.tied_fallback()
    sources, missing = [], []
    for m in maps:
        name = m.hf_name if m.hf_name in reader.entries else fallback.get(m.hf_name, m.hf_name)
        if name not in reader.entries:
            missing.append(m.hf_name)
            continue
        if reader.entries[name].shape != m.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {reader.entries[name].shape}, but config.json implies "
                f"{m.hf_shape}"
            )
        sources.append(name)
    if missing:
        raise CheckpointError(
            f"{where}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    used = set(sources)
    unexpected = [n for n in reader.names() if n not in used and not adapter.ignorable(n)]
    if unexpected:
        raise CheckpointError(
            f"{where}: tensors the model does not use (another architecture variant?): "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    return sources


def import_checkpoint(
    hf_dir: str | Path,
    run_dir: str | Path,
    base: RunConfig | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> ImportResult:
    """Create run `run_dir` from the HF checkpoint in `hf_dir`, committed as step 0 of its store."""
    meter = MemoryMeter("import")
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    adapter = adapter_for(hf, str(hf_dir / "config.json"))
    cfg = import_config(hf_dir, run_dir, base, overrides)
    spec = ModelSpec(cfg.model)
    plan = plan_for_import(cfg, spec)
    reader = CheckpointReader(hf_dir)
    sources = resolve_sources(adapter, spec, reader, str(hf_dir))
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_ssd_space(cfg, plan)
    store = SSDTensorStore(
        cfg.ssd.paths, direct_io=cfg.ssd.direct_io, io_threads=cfg.ssd.io_threads, verify_checksums=True
    )
    try:
        # Memory is measured from here: what came before (interpreter, torch and its lazy imports, the
        # store's threads) does not grow with the model; what follows is the streaming itself.
        store.warm_up()
        meter.reset()
        if store.committed_step >= 0:
            raise RunStateError(
                f"the store in {cfg.ssd.paths[0]} already holds a run (committed step "
                f"{store.committed_step}); import into a new run dir (or other ssd.paths)"
            )
        _copy_metadata(hf_dir, out / HF_SUBDIR)
        _write_units(store, spec, plan.param_dtype, reader, adapter.tensor_map(spec), sources)
        fingerprint = model_fingerprint(cfg, plan)
        store.commit(0, {"fingerprint": fingerprint, "imported_from": str(hf_dir.resolve())})
        written = store.bytes_written
    finally:
        store.close()
    # Last: a run dir with a config.yaml is one `fuyou-ray train` may start; only a committed import is.
    save_config(cfg, out / "config.yaml")
    memory = meter.report()
    return ImportResult(
        run_dir=str(out),
        config_path=str(out / "config.yaml"),
        architecture=", ".join(hf.get("architectures") or [str(hf.get("model_type"))]),
        params=spec.numel,
        param_dtype=plan.param_dtype,
        bytes_read=reader.bytes_read,
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        peak_rss_above_baseline=memory.peak_above_baseline,
        peak_rss=memory.peak_rss,
    )


def _write_units(
    store: SSDTensorStore,
    spec: ModelSpec,
    param_dtype: str,
    reader: CheckpointReader,
    maps: list[TensorMap],
    sources: list[str],
) -> None:
    """Per unit: params (compute dtype), fp32 master, zeroed Adam moments - through one staging buffer."""
    staging = aligned_buffer(max(u.numel for u in spec.units) * 4)
    raw = torch.frombuffer(staging, dtype=torch.uint8)
    by_unit: dict[int, list[tuple[TensorMap, str]]] = {}
    for m, src in zip(maps, sources, strict=True):
        by_unit.setdefault(m.unit, []).append((m, src))
    for unit in spec.units:
        n = unit.numel

        def write(kind: RecordKind, dtype: str, unit_index: int = unit.index, numel: int = n) -> None:
            name = record_name(unit_index, kind)
            store.write_from(name, memoryview(staging), dtype=dtype, numel=numel, version=0)

        def fill(dtype: str, unit_layout: Any = unit.layout, numel: int = n, index: int = unit.index) -> None:
            flat = raw[: numel * DTYPES[dtype].itemsize].view(DTYPES[dtype])
            named = unit_layout.unflatten(flat)
            for m, src in by_unit[index]:
                reader.read_into(src, named[m.name], transpose=m.transpose)

        # Params are read straight from the source in their own dtype (bf16 stays bit-exact); the master
        # copy is read again in fp32 rather than widened in place, which the staging buffer cannot hold.
        fill(param_dtype)
        write(RecordKind.PARAM, param_dtype)
        if param_dtype != "float32":
            fill("float32")
        write(RecordKind.MASTER, "float32")
        raw[: n * 4].zero_()
        write(RecordKind.EXP_AVG, "float32")
        write(RecordKind.EXP_AVG_SQ, "float32")
        log.info("imported unit %d/%d (%s, %s params)", unit.index + 1, spec.num_units, unit.name, f"{n:,}")


def _copy_metadata(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in METADATA_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    out_dir: str
    step: int
    dtype: str
    shards: int
    bytes_written: int
    seconds: float


def export_checkpoint(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> ExportResult:
    """Write the run's committed weights as a Hugging Face model directory, unit by unit."""
    t0 = time.perf_counter()
    cfg = load_run_config(run_dir)
    spec = ModelSpec(cfg.model)
    meta_dir = Path(run_dir) / HF_SUBDIR
    source = read_hf_config(meta_dir) if (meta_dir / "config.json").is_file() else None
    adapter = adapter_for(source) if source is not None else adapter_for_model(cfg.model)
    dtype = dtype or (source_dtype(source) if source is not None else "float32")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunStateError(f"{out} exists and is not empty: choose a new directory (or overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = EXPORT_DTYPES[dtype]
    maps = adapter.tensor_map(spec)
    writer = ShardedCheckpointWriter(
        out, [PlannedTensor(m.hf_name, torch_dtype, m.hf_shape) for m in maps], max_shard_bytes
    )
    store = SSDTensorStore(cfg.ssd.paths, direct_io=cfg.ssd.direct_io, io_threads=cfg.ssd.io_threads)
    try:
        step = store.committed_step
        if step < 0:
            raise RunStateError(f"{run_dir}: the store holds no committed weights yet; train or import first")
        buffer = aligned_buffer(max(u.numel for u in spec.units) * 4)
        for unit in spec.units:
            store.read_into(record_name(unit.index, RecordKind.MASTER), memoryview(buffer))
            flat = torch.frombuffer(buffer, dtype=torch.float32, count=unit.numel)
            named = unit.layout.unflatten(flat)
            for m in maps:
                if m.unit == unit.index:
                    t = named[m.name].t() if m.transpose else named[m.name]
                    writer.write(m.hf_name, t.to(torch_dtype))
    finally:
        store.close()
    writer.close()
    config = adapter.hf_config(cfg.model, source, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_src = (
        meta_dir if meta_dir.is_dir() else (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    )
    if tokenizer_src is not None:
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (tokenizer_src / name).is_file():
                shutil.copyfile(tokenizer_src / name, out / name)
    return ExportResult(
        out_dir=str(out),
        step=step,
        dtype=dtype,
        shards=len(writer.shards),
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - t0,
    )
