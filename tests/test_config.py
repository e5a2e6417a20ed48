"""The run config: YAML and dict loading, sizes, overrides, unknown keys, impossible values, paths, saving."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fuyou_ray.config import (
    ConfigError,
    RunConfig,
    Size,
    config_from_dict,
    format_size,
    load_config,
    parse_size,
    save_config,
)
from tests.conftest import REPO, tiny_config


def write_yaml(path: Path, tree: Any) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def raises_naming(key: str, tree: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    """Build `tree` + `overrides`, expect a ConfigError whose message names `key`; return the message."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree, overrides, base_dir="/base")
    message = str(info.value)
    assert key in message, f"error does not name {key!r}: {message}"
    return message


# ---------------------------------------------------------------------------------------------- loading


def test_defaults_from_empty_mapping() -> None:
    cfg = config_from_dict({}, base_dir="/base")
    assert cfg.model == RunConfig().model
    assert cfg.batch.accum_steps == RunConfig().batch.global_batch // RunConfig().batch.micro_batch
    assert cfg.run_dir == "/base/runs/demo"
    assert cfg.ssd.paths == ("/base/runs/ssd",)


def test_load_from_yaml_file_equals_dict(tmp_path: Path) -> None:
    tree = {
        "run_dir": str(tmp_path / "run"),
        "steps": 7,
        "model": {"n_layer": 3, "d_model": 48, "n_head": 3},
        "optimizer": {"lr": 1.5e-3, "betas": [0.8, 0.9], "schedule": "constant"},
        "batch": {"global_batch": 12, "micro_batch": 4, "seq_len": 64, "grad_accum": 3},
        "budgets": {"gpu_mem": "3GiB", "cpu_mem": 123456},
        "ssd": {"paths": [str(tmp_path / "a"), str(tmp_path / "b")], "direct_io": False},
        "runtime": {"device": "cpu", "executor": "local"},
    }
    from_file = load_config(write_yaml(tmp_path / "run.yaml", tree))
    from_dict = config_from_dict(tree)
    assert from_file == from_dict
    assert from_file.steps == 7
    assert from_file.model.n_layer == 3 and from_file.model.d_model == 48
    assert from_file.optimizer.betas == (0.8, 0.9)
    assert isinstance(from_file.optimizer.betas, tuple)
    assert from_file.optimizer.schedule == "constant"
    assert from_file.batch.accum_steps == 3
    assert from_file.budgets.gpu_mem == 3 * 1024**3 and isinstance(from_file.budgets.gpu_mem, Size)
    assert from_file.budgets.cpu_mem == 123456
    assert from_file.ssd.paths == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert from_file.ssd.direct_io is False
    assert from_file.runtime.executor == "local"


def test_bundled_demo_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.arch == "gpt"
    assert cfg.batch.seq_len <= cfg.model.max_seq_len


def test_missing_file_and_bad_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*not valid YAML"):
        load_config(bad)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top_list)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).model == RunConfig().model


def test_errors_from_a_file_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "typo.yaml", {"model": {"n_layers": 4}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "typo.yaml" in str(info.value) and "model.n_layers" in str(info.value)


def test_input_mapping_is_not_mutated_by_overrides() -> None:
    tree = {"model": {"n_layer": 2}}
    config_from_dict(tree, ["model.n_layer=3"], base_dir="/base")
    assert tree == {"model": {"n_layer": 2}}


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16MiB", 16 * 1024**2),
        (1024, 1024),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("512 MiB", 512 * 1024**2),
        (" 2 gib ", 2 * 1024**3),
        ("4k", 4000),
        ("4KiB", 4096),
        ("1TiB", 1024**4),
        ("123", 123),
        ("7b", 7),
        (2048.0, 2048),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["16 MeB", "GiB", "", "-1GiB", "1..5GB", True, 1.5, None, [1]])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"the\.key"):
        parse_size(bad, "the.key")


def test_size_fields_accept_all_spellings() -> None:
    cfg = config_from_dict({"budgets": {"gpu_mem": "1.5GB", "cpu_mem": 1024}}, base_dir="/base")
    assert cfg.budgets.gpu_mem == 1_500_000_000
    assert cfg.budgets.cpu_mem == 1024
    raises_naming("budgets.cpu_mem", {"budgets": {"cpu_mem": "lots"}})
    raises_naming("budgets.gpu_mem", {"budgets": {"gpu_mem": 0}})
    raises_naming("budgets.gpu_mem", {"budgets": {"gpu_mem": -5}})


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(3 * 1024**3) == "3.00 GiB"
    assert format_size(5 * 1024**5) == "5120.00 TiB"


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_set_nested_values_with_yaml_literals() -> None:
    cfg = config_from_dict(
        {"model": {"n_layer": 2}},
        [
            "model.n_layer=6",
            "optimizer.lr=0.001",
            "optimizer.betas=[0.5, 0.6]",
            "ssd.direct_io=false",
            "budgets.cpu_mem=256MiB",
            "runtime.device=cpu",
            "data.path=null",
            "steps=3",
        ],
        base_dir="/base",
    )
    assert cfg.model.n_layer == 6
    assert cfg.optimizer.lr == 0.001
    assert cfg.optimizer.betas == (0.5, 0.6)
    assert cfg.ssd.direct_io is False
    assert cfg.budgets.cpu_mem == 256 * 1024**2
    assert cfg.runtime.device == "cpu"
    assert cfg.data.path is None
    assert cfg.steps == 3


def test_override_list_of_paths(tmp_path: Path) -> None:
    cfg = config_from_dict({}, ["ssd.paths=[a,b]"], base_dir=tmp_path)
    assert cfg.ssd.paths == (str(tmp_path / "a"), str(tmp_path / "b"))
    single = config_from_dict({}, ["ssd.paths=only"], base_dir=tmp_path)
    assert single.ssd.paths == (str(tmp_path / "only"),)


def test_override_wins_over_file_and_later_override_wins(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"steps": 5, "model": {"n_layer": 2}})
    cfg = load_config(path, ["steps=9", "model.n_layer=3", "steps=11"])
    assert cfg.steps == 11 and cfg.model.n_layer == 3


def test_exponent_floats_without_a_dot() -> None:
    # PyYAML (YAML 1.1) reads `1e-4` as a string; the error message itself suggests `--set optimizer.lr=1e-4`.
    cfg = config_from_dict({"optimizer": {"eps": "1e-6"}}, ["optimizer.lr=1e-4"], base_dir="/base")
    assert cfg.optimizer.lr == 1e-4
    assert cfg.optimizer.eps == 1e-6
    raises_naming("optimizer.lr", {}, ("optimizer.lr=fast",))
    raises_naming("optimizer.lr", {}, ("optimizer.lr=nan",))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("noequals", "noequals"),
        ("steps.sub=1", "steps"),
        ("model=4", "model"),
        ("runtime.device=gpu", "runtime.device"),
        ("optimizer.schedule=linear", "optimizer.schedule"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("optimizer.betas=[0.9, x]", "optimizer.betas[1]"),
        ("ssd.direct_io=maybe", "ssd.direct_io"),
        ("steps=2.5", "steps"),
        ("steps=true", "steps"),
        ("run_dir=[a]", "run_dir"),
        ("batch.seq_len=abc", "batch.seq_len"),
    ],
)
def test_bad_overrides_name_the_key(override: str, key: str) -> None:
    raises_naming(key, {}, (override,))


def test_override_into_a_scalar_is_refused() -> None:
    message = raises_naming("steps", {"steps": 3}, ("steps.x=1",))
    assert "not a section" in message


# ---------------------------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key() -> None:
    message = raises_naming("'modle'", {"modle": {"n_layer": 2}})
    assert "valid keys" in message and "model" in message


@pytest.mark.parametrize(
    ("tree", "dotted"),
    [
        ({"model": {"nlayer": 2}}, "model.nlayer"),
        ({"optimizer": {"learning_rate": 1.0}}, "optimizer.learning_rate"),
        ({"ssd": {"path": "x"}}, "ssd.path"),
        ({"runtime": {"gpus": 1}}, "runtime.gpus"),
    ],
)
def test_unknown_nested_key_names_dotted_path(tree: dict[str, Any], dotted: str) -> None:
    message = raises_naming(f"'{dotted}'", tree)
    assert "unknown key" in message


def test_unknown_key_from_override() -> None:
    raises_naming("'model.depth'", {}, ("model.depth=3",))


def test_section_given_as_scalar() -> None:
    raises_naming("model", {"model": 3})


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"batch": {"global_batch": 10, "micro_batch": 4}}, "batch.global_batch"),
        ({"batch": {"global_batch": 2, "micro_batch": 4}}, "batch.global_batch"),
        ({"batch": {"seq_len": 256}, "model": {"max_seq_len": 128}}, "batch.seq_len"),
        ({"model": {"d_model": 130, "n_head": 4}}, "model.d_model"),
        ({"batch": {"global_batch": 16, "micro_batch": 8, "grad_accum": 4}}, "batch.grad_accum"),
        ({"optimizer": {"lr": -1e-3}}, "optimizer.lr"),
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
        ({"optimizer": {"eps": 0}}, "optimizer.eps"),
        ({"optimizer": {"weight_decay": -0.1}}, "optimizer.weight_decay"),
        ({"optimizer": {"warmup_steps": -1}}, "optimizer.warmup_steps"),
        ({"optimizer": {"min_lr_ratio": 1.5}}, "optimizer.min_lr_ratio"),
        ({"optimizer": {"max_grad_norm": -1}}, "optimizer.max_grad_norm"),
        ({"ssd": {"paths": ["/x", "/y", "/x"]}}, "ssd.paths"),
        ({"ssd": {"paths": []}}, "ssd.paths"),
        ({"ssd": {"io_threads": 0}}, "ssd.io_threads"),
        ({"steps": 0}, "steps"),
        ({"log_every": 0}, "log_every"),
        ({"model": {"vocab_size": 1}}, "model.vocab_size"),
        ({"model": {"n_layer": 0}}, "model.n_layer"),
        ({"model": {"init_std": 0}}, "model.init_std"),
        ({"model": {"layer_norm_eps": -1e-5}}, "model.layer_norm_eps"),
        ({"model": {"arch": "llama9"}}, "model.arch"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
        ({"runtime": {"executor": "dask"}}, "runtime.executor"),
        ({"runtime": {"optimizer_actors": -1}}, "runtime.optimizer_actors"),
        ({"runtime": {"max_restarts": -1}}, "runtime.max_restarts"),
    ],
)
def test_impossible_values_name_the_key(tree: dict[str, Any], key: str) -> None:
    raises_naming(key, tree)


def test_grad_accum_that_agrees_is_accepted() -> None:
    cfg = config_from_dict({"batch": {"global_batch": 16, "micro_batch": 4, "grad_accum": 4}}, base_dir="/b")
    assert cfg.batch.grad_accum == 4 and cfg.batch.accum_steps == 4


def test_duplicate_ssd_paths_after_resolution(tmp_path: Path) -> None:
    raises_naming("ssd.paths", {"ssd": {"paths": ["ssd", "./ssd"]}})
    with pytest.raises(ConfigError, match=r"ssd\.paths"):
        config_from_dict({"ssd": {"paths": [str(tmp_path / "ssd"), "ssd"]}}, base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "run_dir": "runs/x",
            "data": {"path": "data/text.txt"},
            "ssd": {"paths": ["s1", "../s2", "/abs/s3"]},
        },
        base_dir=tmp_path,
    )
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.data.path == str(tmp_path / "data" / "text.txt")
    assert cfg.ssd.paths == (str(tmp_path / "s1"), str(tmp_path.parent / "s2"), "/abs/s3")


def test_load_config_resolves_against_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    path = write_yaml(conf_dir / "c.yaml", {"run_dir": "out", "ssd": {"paths": ["ssd"]}})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(path)
    assert cfg.run_dir == str(work / "out")
    assert cfg.ssd.paths == (str(work / "ssd"),)


def test_home_directory_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_from_dict({"run_dir": "~/runs"}, base_dir="/elsewhere")
    assert cfg.run_dir == str(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------- saving


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        optimizer={"lr": 1e-10, "betas": (0.85, 0.97), "schedule": "constant"},
        batch={"grad_accum": 2},
        data={"path": str(tmp_path / "text.txt")},
        ssd={"paths": [str(tmp_path / "a"), str(tmp_path / "b")], "io_threads": 3},
        budgets={"gpu_mem": "1.5GB", "cpu_mem": "16MiB"},
    )
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)
    again = load_config(saved)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # The saved file is plain YAML (no Python tags) and the second save is byte-identical.
    text = saved.read_text()
    assert "!!python" not in text
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == text


def test_to_dict_is_plain_data(tmp_path: Path) -> None:
    d = tiny_config(tmp_path).to_dict()
    assert type(d["budgets"]["gpu_mem"]) is int
    assert isinstance(d["ssd"]["paths"], list)
    assert isinstance(d["optimizer"]["betas"], list)
    yaml.safe_dump(d)  # must not need any Python-specific tag


def test_run_config_is_frozen(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


def test_outputs_leave_the_ray_job_working_dir_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `ray job submit --working-dir`, the cwd is Ray's temporary copy: relative outputs go to
    ~/fuyou-ray (or base_dir), while relative inputs still resolve against the cwd."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}})
    )
    cwd = tmp_path / "ray_pkg_copy"
    cfg = config_from_dict(
        {"run_dir": "runs/a", "ssd": {"paths": ["ssd"]}, "data": {"path": "d.txt"}}, base_dir=cwd
    )
    assert cfg.run_dir == str(tmp_path / "home" / "fuyou-ray" / "runs" / "a")
    assert cfg.ssd.paths == (str(tmp_path / "home" / "fuyou-ray" / "ssd"),)
    assert cfg.data.path == str(cwd / "d.txt")
    explicit = config_from_dict({"run_dir": "r", "base_dir": str(tmp_path / "b")}, base_dir=cwd)
    assert explicit.run_dir == str(tmp_path / "b" / "r")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert config_from_dict({"run_dir": "r"}, base_dir=cwd).run_dir == str(cwd / "r")
