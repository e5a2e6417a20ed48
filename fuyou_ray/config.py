"""The run config: typed, validated, loaded from YAML.

A run is described by one `RunConfig`, made of one small frozen dataclass per component (model, data,
optimizer, batch, budgets, ssd, runtime). `load_config` reads YAML, applies `--set a.b=c` overrides, rejects
unknown keys and impossible values with a `ConfigError` that names the file, the key and the fix, and resolves
relative paths against the directory the run was started from. The resolved config is saved in the run dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(value: object, key: str = "size") -> int:
    """Parse a byte count such as 1073741824, '1GiB', '512 MiB' or '1.5GB' into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '8GiB', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ConfigError(f"{key}: expected a size like '8GiB', '512MiB' or a byte count, got {value!r}")


def format_size(nbytes: float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


class Size(int):
    """A byte count that YAML may spell as '8GiB'; stored as int bytes."""


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling of a Llama-family model (HF `rope_scaling` / `rope_parameters`).

    `linear` divides every frequency by `factor`; `llama3` (Llama 3.1+) divides the low frequencies by
    `factor`, keeps the high ones, and interpolates between `low_freq_factor` and `high_freq_factor`.
    """

    type: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train.

    `arch: gpt` is GPT-2/GPT-3 (pre-LayerNorm, GELU MLP, learned positions); `arch: gpt2` is the same
    network in Hugging Face GPT-2's layout and arithmetic (Conv1D, gelu_new). `arch: llama` is the Llama
    family (RMSNorm, RoPE, SwiGLU MLP, grouped-query attention): Llama 2/3, Mistral (`sliding_window`),
    Qwen2 (`qkv_bias`). `arch: gpt_neox` is GPT-NeoX / Pythia (LayerNorm, fused qkv, partial RoPE with
    `rope_theta` / linear `rope_scaling`, `parallel_residual`, a GELU variant, `qkv_bias` = `attn_out_bias`).
    `fuyou-ray import` fills these fields from a Hugging Face config.json. The input
    embedding and the LM head are always separate (untied) units: the pipeline streams units one by one.
    """

    arch: Literal["gpt", "gpt2", "llama", "gpt_neox"] = "gpt"
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    max_seq_len: int = 128
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5  # gpt LayerNorm
    intermediate_size: int = 0  # MLP width; 0 = 4 * d_model (gpt only: llama must give it)
    # Llama family only (a gpt config leaves these at their defaults):
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # 0 = d_model // n_head
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    attn_out_bias: bool = False  # bias on the attention output projection (Llama `attention_bias`: both)
    mlp_bias: bool = False
    sliding_window: int = 0  # attend to the last N positions only (Mistral); 0 = full causal attention
    # GPT-NeoX only (it also reads rope_theta, linear rope_scaling, qkv_bias = attn_out_bias, layer_norm_eps):
    rotary_pct: float = 1.0  # leading fraction of each head's dims that RoPE rotates (Pythia: 0.25)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)); false: the sequential form
    hidden_act: Literal[
        "gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_accurate", "quick_gelu"
    ] = "gelu"  # the MLP activation, by transformers' ACT2FN name

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.d_model


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it becomes batches. `path: null` uses the bundled corpus.

    Formats (`format: auto` picks by extension): `text` (a UTF-8 file), `jsonl` (.jsonl/.json: one object
    per line with `text`, or `prompt` + `completion` - loss on the completion only - or chat `messages`
    rendered with the tokenizer's chat template - loss on assistant turns only), `tokens` (pre-tokenized
    .npy, or raw .bin of `token_dtype`). `tokenizer` is a directory with the model's tokenizer.json (an
    imported run points at its own copy); null means UTF-8 bytes (vocab 256). Tokenized files are cached
    in `cache_dir`. Text and token streams are sampled as random windows per step; JSONL examples are
    packed into rows of seq_len (or one per row, padded, with `pack: false`) and shuffled per epoch. Either
    way the batch of step s depends only on (seed, s), so a resumed run sees exactly the batches it would
    have seen.
    """

    path: str | None = None
    format: Literal["auto", "text", "jsonl", "tokens"] = "auto"
    tokenizer: str | None = None
    seed: int = 0
    eval_fraction: float = 0.05
    eval_path: str | None = None  # a held-out file in the same format; eval_fraction is then unused
    pack: bool = True
    add_eos: bool = True  # end every document / example with the tokenizer's EOS token
    token_dtype: Literal["uint8", "uint16", "uint32", "int32", "int64"] = "uint16"  # raw .bin files
    cache_dir: str | None = None  # tokenized-data cache; null = ~/.cache/fuyou-ray/tokens
    eval_every: int = 0  # held-out loss every N steps (0 = off)
    eval_batches: int = 4  # batches of batch.global_batch sequences per evaluation


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine (or constant) learning rate, and global-norm clipping."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class BatchConfig:
    """Sequences per optimizer step (`global_batch`), split into `micro_batch` chunks inside each layer.

    grad_accum = global_batch / micro_batch; it may be given, and must then agree.
    """

    global_batch: int = 16
    micro_batch: int = 8
    seq_len: int = 128
    grad_accum: int | None = None

    @property
    def accum_steps(self) -> int:
        return self.global_batch // self.micro_batch


@dataclass(frozen=True)
class BudgetConfig:
    """Memory fuyou-ray may use beyond each process's interpreter + torch baseline.

    gpu_mem: the compute device's budget (on the CPU fallback, host memory of the compute actor).
    cpu_mem: pinned ring + caches + working buffers of the host-side actors.
    """

    gpu_mem: Size = Size(2 * 1024**3)
    cpu_mem: Size = Size(1024**3)


@dataclass(frozen=True)
class SSDConfig:
    """Directories on SSDs that hold params, master weights, Adam state and gradient logs, striped."""

    paths: tuple[str, ...] = ("runs/ssd",)
    direct_io: bool = True  # O_DIRECT where the filesystem allows it
    io_threads: int = 8
    verify_checksums: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    """How the pipeline runs: device, pool size, supervision. 0 means 'derive from the machine'.

    A dead actor is restarted and the step in progress replayed; more than `max_restarts` restarts (all
    actors together) within `restart_window_s` stop the run. A step in which no call finishes for
    `hang_timeout_s` counts as hung: its busy actors are restarted. `on_nonfinite` says what a NaN/inf
    loss or gradient does: `stop` the run (exit code 5), or `skip` the step (weights unchanged; needs
    optimizer.max_grad_norm > 0, which checks every gradient before the first update).
    `cpu_cache: auto` keeps in host memory what fits in budgets.cpu_mem beyond the ring (optimizer state,
    then the gradient log, then params: fuyou_ray/plan.py), cutting SSD traffic; `off` keeps everything on
    SSD. Cached records are written back to SSD every `cache_flush_every` commits (and at checkpoints, at
    the end and when stopped); a killed driver resumes from the last flush. `cache_write_through: true`
    writes them to SSD at every step instead (durable at every commit; the cache then saves the reads).
    `cache_threads` copy between the cache and the ring (0: one per core, at most 16; fuyou_ray/cache.py).
    `optimizer_range` (elements): a unit with more is updated range by range, so ring slots need not hold a
    whole unit's fp32 state (a 175B-width block is 7 GB per fp32 record). 0 = only when cpu_mem needs it.
    `lookahead: true` (with exact clipping) runs the next step's forward during this step's optimizer, each
    unit as soon as its new params exist (the optimizer then goes through the units in forward order).
    `adam_kernel: auto` runs AdamW in the host kernel (fuyou_ray/cpu_adam.py: one pass over memory instead
    of three, compiled with the system C compiler and used only where it reproduces torch bit for bit);
    `torch` always takes torch's fused AdamW.
    `lend_copy: true`: the host cache lends cached state to the optimizer as a copy of the version read,
    made by its copy threads while the GPU computes, which the optimizer updates in place. `false` (with
    the host kernel) copies nothing: the optimizer reads the version read and writes the new version's
    file. It moves 24 B/param less, but on the H100 box the step was not faster (1.129 s against 1.073 s):
    writing other memory than it reads costs the optimizer read-for-ownership traffic in its serial phase.
    `data_parallel: N` runs N pipelines, each on 1/N of the global batch (docs: README, Data parallelism).
    `park_block_inputs`: how many blocks' inputs wait for the backward in page-locked host memory instead
    of device memory (the first N blocks; fuyou_ray/activations.py). -1 (auto): as many as budgets.gpu_mem
    needs, none when everything fits; 0: none (a batch too large for gpu_mem is refused).
    """

    device: Literal["auto", "cuda", "cpu"] = "auto"
    executor: Literal["ray", "local"] = "ray"
    optimizer_actors: int = 0
    optimizer_threads: int = 0
    max_restarts: int = 3
    restart_window_s: float = 600.0
    hang_timeout_s: float = 600.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    ray_num_cpus: int = 0
    cpu_cache: Literal["auto", "off"] = "auto"
    cache_write_through: bool = False
    cache_flush_every: int = 50
    cache_threads: int = 0
    optimizer_range: int = 0
    lookahead: bool = True
    adam_kernel: Literal["auto", "torch"] = "auto"
    lend_copy: bool = True
    park_block_inputs: int = -1
    # Pipelines (GPU compute + SSD I/O + optimizer pool each, one per GPU) that split every step's batch;
    # gradients are summed across them and each holds 1/N of the optimizer state (fuyou_ray/parallel/).
    data_parallel: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of the committed state, every `every` steps (0: none during the run; `fuyou-ray
    checkpoint` takes one of a stopped run), keeping the newest `keep`. They hard-link the store's record
    files on the same SSDs: free when taken, then at most the size of the state each."""

    every: int = 0
    keep: int = 2


@dataclass(frozen=True)
class RunConfig:
    """A whole training run. `run_dir` receives the resolved config, metrics and the committed manifest."""

    run_dir: str = "runs/demo"
    # Where relative run_dir and ssd.paths (the run's outputs) resolve. null: the current directory, except
    # inside a `ray job submit --working-dir` job, whose current directory is Ray's temporary copy of the
    # working dir (deleted with the job): there, ~/fuyou-ray. Relative data paths (inputs) always resolve
    # against the current directory, so data shipped with --working-dir is found.
    base_dir: str | None = None
    steps: int = 10
    seed: int = 0
    log_every: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    ssd: SSDConfig = field(default_factory=SSDConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Size):
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------- parsing


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Size:
        return Size(parse_size(value, key))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], key)
    if origin is Literal:
        if isinstance(value, bool) and "off" in args:
            # YAML 1.1 reads a bare `off` (and `no`, `false`) as False: `cpu_cache: off` means "off".
            value = "off" if value is False else value
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            section = getattr(tp, "__name__", tp)
            raise ConfigError(f"{key}: expected a mapping of {section} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads exponents without a dot, such as 1e-4, as strings.
            with contextlib.suppress(ValueError):
                number = float(value)
                if math.isfinite(number):
                    return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key '{where}{unknown[0]}'; valid keys{' under ' + prefix if prefix else ''}: "
            + ", ".join(names)
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set optimizer.lr=1e-4")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def _validate(cfg: RunConfig) -> None:
    m, b, o, bud = cfg.model, cfg.batch, cfg.optimizer, cfg.budgets

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    require(cfg.steps >= 1, "steps", f"must be >= 1, got {cfg.steps}")
    require(cfg.log_every >= 1, "log_every", "must be >= 1")
    require(m.vocab_size >= 2, "model.vocab_size", "must be >= 2")
    require(m.n_layer >= 1, "model.n_layer", "must be >= 1")
    require(m.n_head >= 1, "model.n_head", "must be >= 1")
    require(
        m.d_model >= 1 and (m.head_dim > 0 or m.d_model % m.n_head == 0),
        "model.d_model",
        f"must be a positive multiple of model.n_head ({m.n_head}), got {m.d_model}",
    )
    require(m.max_seq_len >= 1, "model.max_seq_len", "must be >= 1")
    require(m.init_std > 0, "model.init_std", "must be > 0")
    require(m.layer_norm_eps > 0, "model.layer_norm_eps", "must be > 0")
    require(m.intermediate_size >= 0, "model.intermediate_size", "must be >= 0 (0 = 4 * d_model)")
    _validate_model_family(m, require)
    _validate_data(cfg.data, require)
    require(b.seq_len >= 1, "batch.seq_len", "must be >= 1")
    require(
        b.seq_len <= m.max_seq_len,
        "batch.seq_len",
        f"{b.seq_len} exceeds model.max_seq_len {m.max_seq_len}; lower it or raise max_seq_len",
    )
    require(b.micro_batch >= 1, "batch.micro_batch", "must be >= 1")
    require(
        b.global_batch >= b.micro_batch and b.global_batch % b.micro_batch == 0,
        "batch.global_batch",
        f"must be a multiple of batch.micro_batch ({b.micro_batch}), got {b.global_batch}",
    )
    if b.grad_accum is not None:
        require(
            b.grad_accum == b.accum_steps,
            "batch.grad_accum",
            f"{b.grad_accum} disagrees with global_batch/micro_batch = {b.accum_steps}; drop it or fix one",
        )
    require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    require(all(0 <= x < 1 for x in o.betas), "optimizer.betas", f"each must be in [0, 1), got {o.betas}")
    require(o.eps > 0, "optimizer.eps", "must be > 0")
    require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    require(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    require(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
    require(o.max_grad_norm >= 0, "optimizer.max_grad_norm", "must be >= 0 (0 disables clipping)")
    require(bud.gpu_mem > 0, "budgets.gpu_mem", "must be > 0")
    require(bud.cpu_mem > 0, "budgets.cpu_mem", "must be > 0")
    require(len(cfg.ssd.paths) >= 1, "ssd.paths", "give at least one directory")
    require(len(set(cfg.ssd.paths)) == len(cfg.ssd.paths), "ssd.paths", "lists the same directory twice")
    require(cfg.ssd.io_threads >= 1, "ssd.io_threads", "must be >= 1")
    require(cfg.runtime.optimizer_actors >= 0, "runtime.optimizer_actors", "must be >= 0 (0 = auto)")
    require(cfg.runtime.optimizer_range >= 0, "runtime.optimizer_range", "must be >= 0 (0 = auto)")
    require(cfg.runtime.optimizer_threads >= 0, "runtime.optimizer_threads", "must be >= 0 (0 = auto)")
    require(
        cfg.runtime.park_block_inputs >= -1,
        "runtime.park_block_inputs",
        "must be -1 (auto: as gpu_mem needs), 0 (none) or a number of blocks",
    )
    _validate_data_parallel(cfg, require)
    require(cfg.runtime.max_restarts >= 0, "runtime.max_restarts", "must be >= 0")
    require(cfg.runtime.restart_window_s > 0, "runtime.restart_window_s", "must be > 0 seconds")
    require(cfg.runtime.hang_timeout_s >= 0, "runtime.hang_timeout_s", "must be >= 0 seconds (0 = never)")
    require(
        cfg.runtime.cache_flush_every >= 0,
        "runtime.cache_flush_every",
        "must be >= 0 steps (0 = flush the host cache only at checkpoints, the end and stops)",
    )
    require(
        cfg.runtime.on_nonfinite == "stop" or o.max_grad_norm > 0,
        "runtime.on_nonfinite",
        "'skip' needs optimizer.max_grad_norm > 0: without clipping the optimizer updates each layer as "
        "soon as its gradient exists, before a later layer's NaN could be seen, so the step cannot be "
        "skipped whole; use 'stop' or enable clipping",
    )
    require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = no checkpoints during the run)")
    require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")


NEOX_ONLY_FIELDS = ("rotary_pct", "parallel_residual", "hidden_act")


def _validate_data_parallel(cfg: RunConfig, require: Callable[[bool, str, str], None]) -> None:
    n, b = cfg.runtime.data_parallel, cfg.batch
    require(n >= 1, "runtime.data_parallel", f"must be >= 1 (pipelines), got {n}")
    if n == 1:
        return
    require(
        b.global_batch % (n * b.micro_batch) == 0,
        "batch.global_batch",
        f"{b.global_batch} must split into runtime.data_parallel = {n} equal parts of whole micro-batches "
        f"(batch.micro_batch = {b.micro_batch}): make it a multiple of {n * b.micro_batch}",
    )
    require(
        cfg.runtime.executor == "ray",
        "runtime.executor",
        "'local' runs one pipeline in one process; runtime.data_parallel > 1 needs 'ray'",
    )


def _validate_model_family(m: ModelConfig, require: Callable[[bool, str, str], None]) -> None:
    defaults = ModelConfig()
    llama_only = ["n_kv_head", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "qkv_bias"]
    llama_only += ["attn_out_bias", "mlp_bias", "sliding_window"]
    if m.arch == "gpt_neox":
        _validate_neox(m, require)
        return
    for name in NEOX_ONLY_FIELDS:
        require(
            getattr(m, name) == getattr(defaults, name),
            f"model.{name}",
            "applies to arch 'gpt_neox' only; remove it or set model.arch: gpt_neox",
        )
    if m.arch != "llama":
        for name in llama_only:
            require(
                getattr(m, name) == getattr(defaults, name),
                f"model.{name}",
                "applies to arch 'llama' only; remove it or set model.arch: llama",
            )
        return
    require(m.intermediate_size > 0, "model.intermediate_size", "arch 'llama' needs the MLP width (> 0)")
    require(m.n_kv_head >= 0, "model.n_kv_head", "must be >= 0 (0 = n_head)")
    require(
        m.n_head % m.kv_heads == 0,
        "model.n_kv_head",
        f"must divide model.n_head ({m.n_head}), got {m.kv_heads}",
    )
    require(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0 = d_model / n_head)")
    require(m.head_size % 2 == 0, "model.head_dim", f"RoPE needs an even head size, got {m.head_size}")
    require(m.rms_norm_eps > 0, "model.rms_norm_eps", "must be > 0")
    require(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    require(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0 = full causal attention)")
    r = m.rope_scaling
    if r is not None:
        require(r.factor > 0, "model.rope_scaling.factor", "must be > 0")
        if r.type == "llama3":
            require(
                r.high_freq_factor > r.low_freq_factor > 0,
                "model.rope_scaling.high_freq_factor",
                "must exceed low_freq_factor, which must be > 0",
            )
            require(
                r.original_max_position_embeddings >= 1,
                "model.rope_scaling.original_max_position_embeddings",
                "must be >= 1",
            )


def _validate_neox(m: ModelConfig, require: Callable[[bool, str, str], None]) -> None:
    defaults = ModelConfig()
    for name in ("n_kv_head", "head_dim", "rms_norm_eps", "mlp_bias", "sliding_window"):
        require(
            getattr(m, name) == getattr(defaults, name),
            f"model.{name}",
            "does not apply to arch 'gpt_neox'; remove it",
        )
    require(
        m.qkv_bias == m.attn_out_bias,
        "model.attn_out_bias",
        "arch 'gpt_neox' has one attention bias (HF attention_bias): set qkv_bias and attn_out_bias alike",
    )
    require(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    require(0 < m.rotary_pct <= 1, "model.rotary_pct", f"must be in (0, 1], got {m.rotary_pct}")
    rotary = int(m.head_size * m.rotary_pct)
    require(
        rotary % 2 == 0,
        "model.rotary_pct",
        f"RoPE needs an even number of rotated dims; head size {m.head_size} x {m.rotary_pct} gives {rotary}",
    )
    r = m.rope_scaling
    if r is not None:
        require(r.type == "linear", "model.rope_scaling.type", "arch 'gpt_neox' supports 'linear' only")
        require(r.factor > 0, "model.rope_scaling.factor", "must be > 0")


def _validate_data(d: DataConfig, require: Callable[[bool, str, str], None]) -> None:
    require(0 <= d.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
    require(d.eval_every >= 0, "data.eval_every", "must be >= 0 (0 = no periodic evaluation)")
    require(d.eval_batches >= 1, "data.eval_batches", "must be >= 1")
    require(
        d.path is not None or d.eval_path is None,
        "data.eval_path",
        "needs data.path too (the bundled corpus has its own held-out part)",
    )


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    def absolute(p: str) -> str:
        path = Path(os.path.expanduser(p))
        return str(path if path.is_absolute() else (base / path).resolve())

    data = cfg.data
    paths: dict[str, Any] = {
        key: absolute(getattr(data, key))
        for key in ("path", "eval_path", "tokenizer", "cache_dir")
        if getattr(data, key) is not None
    }
    data = dataclasses.replace(data, **paths)
    outputs = output_base(cfg.base_dir, base)

    def output(p: str) -> str:
        path = Path(os.path.expanduser(p))
        return str(path if path.is_absolute() else (outputs / path).resolve())

    ssd = dataclasses.replace(cfg.ssd, paths=tuple(output(p) for p in cfg.ssd.paths))
    if len(set(ssd.paths)) != len(ssd.paths):
        # Checked again after resolution: 'ssd' and './ssd' are the same directory.
        raise ConfigError(f"ssd.paths: lists the same directory twice once resolved: {list(ssd.paths)}")
    return dataclasses.replace(cfg, run_dir=output(cfg.run_dir), base_dir=str(outputs), data=data, ssd=ssd)


def in_ray_job_working_dir() -> bool:
    """True inside a `ray job submit` entrypoint that runs in Ray's temporary copy of --working-dir."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return False
    return bool(runtime_env.get("working_dir"))


def output_base(base_dir: str | None, cwd: Path) -> Path:
    if base_dir is not None:
        return Path(os.path.expanduser(base_dir)).resolve()
    if in_ray_job_working_dir():
        return Path.home() / "fuyou-ray"
    return cwd


def config_from_dict(
    tree: Mapping[str, Any], overrides: Sequence[str] = (), base_dir: str | os.PathLike[str] | None = None
) -> RunConfig:
    """Build a validated RunConfig from a mapping (as read from YAML) plus `key=value` overrides."""
    tree = _deep_copy(tree)
    for assignment in overrides:
        _apply_override(tree, assignment)
    cfg = _build(RunConfig, tree, "")
    _validate(cfg)
    return _resolve_paths(cfg, Path(base_dir) if base_dir is not None else Path.cwd())


def _deep_copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config; relative paths inside it resolve against the current directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, batch:, ...)")
    try:
        return config_from_dict(tree, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def save_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
