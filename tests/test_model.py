"""Models and data: flat layouts, unit specs, deterministic init, meta-built units run with flat weights,
and the deterministic, step-addressed token batches."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fuyou_ray.config import DataConfig, ModelConfig
from fuyou_ray.data import (
    DataError,
    TokenDataset,
    bundled_corpus_text,
    decode_bytes,
    encode_bytes,
)
from fuyou_ray.models import FlatLayout, ModelSpec, ReferenceModel, lm_loss
from fuyou_ray.models.gpt import build_gpt_unit

TINY = ModelConfig(vocab_size=256, n_layer=3, n_head=2, d_model=32, max_seq_len=32)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(TINY)


@pytest.fixture(scope="module")
def reference(spec: ModelSpec) -> ReferenceModel:
    return ReferenceModel(spec, seed=7)


def tokens(batch: int = 3, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- FlatLayout


def test_flat_layout_puts_decay_tensors_first() -> None:
    layout = FlatLayout.build(
        [("ln.weight", (4,), False), ("w1", (3, 4), True), ("b1", (3,), False), ("w2", (2, 3), True)]
    )
    assert [s.name for s in layout.slices] == ["w1", "w2", "ln.weight", "b1"]
    assert [s.offset for s in layout.slices] == [0, 12, 18, 22]
    assert [s.decay for s in layout.slices] == [True, True, False, False]
    assert layout.numel == 25 and layout.decay_numel == 18
    assert all(not s.decay for s in layout.slices if s.offset >= layout.decay_numel)


def test_unflatten_views_and_flatten_round_trip() -> None:
    layout = FlatLayout.build([("a", (2, 3), True), ("b", (5,), False), ("c", (1, 1, 2), True)])
    flat = torch.arange(layout.numel, dtype=torch.float32)
    named = layout.unflatten(flat)
    assert {k: tuple(v.shape) for k, v in named.items()} == {"a": (2, 3), "c": (1, 1, 2), "b": (5,)}
    assert torch.equal(named["c"].reshape(-1), torch.tensor([6.0, 7.0]))
    # Views, not copies: writing through a view changes the flat buffer.
    named["b"].fill_(-1)
    assert torch.equal(flat[8:], torch.full((5,), -1.0))
    assert torch.equal(layout.flatten(named), flat)
    assert layout.flatten(named, dtype=torch.bfloat16).dtype == torch.bfloat16
    # flatten -> unflatten from independent tensors.
    fresh = {"a": torch.randn(2, 3), "b": torch.randn(5), "c": torch.randn(1, 1, 2)}
    back = layout.unflatten(layout.flatten(fresh))
    assert all(torch.equal(back[k], fresh[k]) for k in fresh)


def test_gradients_of_unflattened_views_reach_the_flat_buffer() -> None:
    layout = FlatLayout.build([("w", (2, 2), True), ("b", (2,), False)])
    flat = torch.zeros(layout.numel, requires_grad=True)
    named = layout.unflatten(flat)
    (named["w"].sum() * 2 + named["b"].sum() * 3).backward()
    assert flat.grad is not None and torch.equal(flat.grad, torch.tensor([2.0, 2, 2, 2, 3, 3]))


# ---------------------------------------------------------------------------------------------- ModelSpec


def test_units_names_and_numel_match_the_reference(spec: ModelSpec, reference: ReferenceModel) -> None:
    assert spec.num_units == TINY.n_layer + 2
    assert [u.name for u in spec.units] == ["embed", "block.0", "block.1", "block.2", "head"]
    assert [u.index for u in spec.units] == list(range(spec.num_units))
    assert spec.numel == sum(p.numel() for p in reference.parameters())
    for unit, module in zip(spec.units, reference.units, strict=True):
        params = dict(module.named_parameters())
        assert unit.numel == sum(p.numel() for p in params.values())
        assert {s.name for s in unit.layout.slices} == set(params)
        assert unit.layout.decay_numel == sum(p.numel() for p in params.values() if p.dim() >= 2)
        for s in unit.layout.slices:
            assert s.shape == tuple(params[s.name].shape)
            assert s.decay == (params[s.name].dim() >= 2)


def test_gpt_parameter_count_formula(spec: ModelSpec) -> None:
    v, h, s, n = TINY.vocab_size, TINY.d_model, TINY.max_seq_len, TINY.n_layer
    block = 12 * h * h + 13 * h  # qkv + proj + 2-layer MLP (4h) + 2 LayerNorms, with biases
    assert spec.units[0].numel == v * h + s * h
    assert spec.units[1].numel == block
    assert spec.units[-1].numel == v * h + 2 * h
    assert spec.numel == v * h + s * h + n * block + v * h + 2 * h
    assert spec.flops_per_token(16) == 6.0 * spec.numel + 12.0 * n * h * 16


def test_unknown_arch_and_unit_index() -> None:
    with pytest.raises(ValueError, match=r"model\.arch"):
        ModelSpec(dataclasses.replace(TINY, arch="mamba"))  # type: ignore[arg-type]
    with pytest.raises(IndexError, match=r"units 0\.\.4"):
        build_gpt_unit(TINY, TINY.n_layer + 2)


def test_meta_units_hold_no_memory(spec: ModelSpec) -> None:
    for unit in spec.units:
        module = spec.build_unit(unit.index)
        assert all(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------------------------------- init


def test_init_is_deterministic_per_seed_and_unit(spec: ModelSpec) -> None:
    a = spec.init_unit(2, seed=5)
    assert a.dtype == torch.float32 and a.shape == (spec.units[2].numel,)
    assert torch.equal(a, spec.init_unit(2, seed=5))
    # Independent of what was initialised before (each unit has its own generator).
    for i in (0, 1, 3, 4):
        spec.init_unit(i, seed=5)
    assert torch.equal(a, spec.init_unit(2, seed=5))
    assert torch.equal(a, ModelSpec(TINY).init_unit(2, seed=5))
    # Blocks share a layout but not their weights; other seeds give other weights.
    assert not torch.equal(a, spec.init_unit(1, seed=5))
    assert not torch.equal(a, spec.init_unit(3, seed=5))
    assert not torch.equal(a, spec.init_unit(2, seed=6))
    assert not torch.equal(spec.init_unit(0, seed=0), spec.init_unit(0, seed=1))


def test_init_follows_gpt2(spec: ModelSpec) -> None:
    named = spec.units[1].layout.unflatten(spec.init_unit(1, seed=0))
    for name, t in named.items():
        if name.endswith("bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
        elif name.startswith("ln"):
            assert torch.equal(t, torch.ones_like(t)), name
    std = float(named["attn.c_attn.weight"].std())
    assert std == pytest.approx(TINY.init_std, rel=0.1)
    proj = torch.cat([named["attn.c_proj.weight"].reshape(-1), named["mlp.c_proj.weight"].reshape(-1)])
    assert float(proj.std()) == pytest.approx(TINY.init_std / math.sqrt(2 * TINY.n_layer), rel=0.1)
    head = spec.units[-1].layout.unflatten(spec.init_unit(spec.num_units - 1, seed=0))
    assert torch.equal(head["ln_f.weight"], torch.ones(TINY.d_model))
    assert float(head["lm_head.weight"].std()) == pytest.approx(TINY.init_std, rel=0.1)


def test_reference_holds_the_initial_weights(spec: ModelSpec, reference: ReferenceModel) -> None:
    for unit in spec.units:
        assert torch.equal(reference.flat_unit(unit.index), spec.init_unit(unit.index, seed=7))


# ---------------------------------------------------------------------------------------------- execution


def run_units(spec: ModelSpec, flats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The pipeline's way: weightless (meta) unit modules run with views of flat buffers."""
    for unit, flat in zip(spec.units, flats, strict=True):
        module = spec.build_unit(unit.index, "meta")
        x = functional_call(module, unit.layout.unflatten(flat), (x,))
    return x


def test_functional_units_give_exactly_the_reference_logits(
    spec: ModelSpec, reference: ReferenceModel
) -> None:
    x = tokens(batch=3, seq=TINY.max_seq_len)
    flats = [spec.init_unit(u.index, seed=7) for u in spec.units]
    with torch.no_grad():
        expected = reference(x)
        got = run_units(spec, flats, x)
    assert got.shape == (3, TINY.max_seq_len, TINY.vocab_size)
    assert torch.equal(got, expected)


def test_functional_units_give_the_reference_gradients(spec: ModelSpec) -> None:
    ref = ReferenceModel(spec, seed=3)
    x, y = tokens(batch=2, seq=12, seed=1), tokens(batch=2, seq=12, seed=2)
    lm_loss(ref(x), y).backward()
    flats = [spec.init_unit(u.index, seed=3).requires_grad_(True) for u in spec.units]
    loss = lm_loss(run_units(spec, flats, x), y)
    loss.backward()
    assert float(loss.detach()) == float(lm_loss(ref(x), y).detach())
    for unit, flat in zip(spec.units, flats, strict=True):
        named_grads = {n: p.grad for n, p in ref.units[unit.index].named_parameters()}
        expected = unit.layout.flatten(named_grads)  # type: ignore[arg-type]
        assert flat.grad is not None and torch.equal(flat.grad, expected), unit.name


def test_causal_attention(spec: ModelSpec, reference: ReferenceModel) -> None:
    # Changing a later token must not change earlier positions' logits.
    x = tokens(batch=1, seq=10)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = reference(x), reference(y)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_lm_loss_at_init_is_near_uniform(reference: ReferenceModel) -> None:
    x = tokens(batch=4, seq=32)
    with torch.no_grad():
        logits = reference(x)
        loss = lm_loss(logits, tokens(batch=4, seq=32, seed=9))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(math.log(TINY.vocab_size), rel=0.05)
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, TINY.vocab_size), tokens(4, 32, 9).reshape(-1)
    )
    assert float(loss) == pytest.approx(float(manual), rel=1e-6)


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def dataset() -> TokenDataset:
    return TokenDataset.from_config(DataConfig(), vocab_size=256)


def test_bundled_corpus_loads(dataset: TokenDataset) -> None:
    text = bundled_corpus_text()
    assert len(text) > 10_000
    raw = encode_bytes(text)
    assert raw.dtype == np.int64 and int(raw.max()) < 256 and int(raw.min()) >= 0
    assert dataset.train.size + dataset.eval.size == raw.size
    assert dataset.eval.size == raw.size - int(raw.size * (1 - DataConfig().eval_fraction))
    assert np.array_equal(np.concatenate([dataset.train, dataset.eval]), raw)
    assert decode_bytes(raw) == text


def test_batches_are_deterministic_per_step(dataset: TokenDataset) -> None:
    a = dataset.batch(3, 8, 32)
    assert a.step == 3
    assert a.inputs.shape == (8, 32) and a.targets.shape == (8, 32)
    assert a.inputs.dtype == torch.int64 and a.targets.dtype == torch.int64
    # The same step gives the same batch, whatever ran before and in a fresh dataset object.
    for s in range(3):
        dataset.batch(s, 8, 32)
    b = TokenDataset.from_config(DataConfig(), vocab_size=256).batch(3, 8, 32)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    # Other steps and other data seeds give other batches.
    assert not torch.equal(a.inputs, dataset.batch(4, 8, 32).inputs)
    other_seed = TokenDataset.from_config(DataConfig(seed=1), vocab_size=256)
    assert not torch.equal(a.inputs, other_seed.batch(3, 8, 32).inputs)


def test_targets_are_inputs_shifted_by_one(dataset: TokenDataset) -> None:
    batch = dataset.batch(11, 6, 24)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    train = dataset.train.astype(np.uint8).tobytes()
    for row_in, row_tg in zip(batch.inputs, batch.targets, strict=True):
        window = torch.cat([row_in, row_tg[-1:]]).numpy().astype(np.uint8).tobytes()
        assert window in train  # each row is a real window of the train split


def test_eval_batches_come_from_the_eval_split(dataset: TokenDataset) -> None:
    batch = dataset.eval_batch(0, 4, 16)
    held_out = dataset.eval.astype(np.uint8).tobytes()
    for row_in, row_tg in zip(batch.inputs, batch.targets, strict=True):
        assert torch.cat([row_in, row_tg[-1:]]).numpy().astype(np.uint8).tobytes() in held_out
    assert torch.equal(batch.inputs, dataset.eval_batch(0, 4, 16).inputs)


def test_micro_batches_split_the_batch(dataset: TokenDataset) -> None:
    batch = dataset.batch(0, 8, 16)
    micro = batch.micro_batches(2)
    assert len(micro) == 4
    assert torch.equal(torch.cat([x for x, _ in micro]), batch.inputs)
    assert torch.equal(torch.cat([y for _, y in micro]), batch.targets)


def test_text_file_dataset_and_errors(tmp_path: Path) -> None:
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello world, " * 50, encoding="utf-8")
    ds = TokenDataset.from_config(DataConfig(path=str(text_file), eval_fraction=0.1), vocab_size=256)
    batch = ds.batch(0, 2, 8)
    assert decode_bytes(batch.inputs[0]) in "hello world, " * 50
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset.from_config(DataConfig(path=str(tmp_path / "missing.txt")), vocab_size=256)
    with pytest.raises(DataError, match="vocab_size >= 256"):
        TokenDataset.from_config(DataConfig(), vocab_size=128)
    with pytest.raises(DataError, match="seq_len 1000"):
        ds.batch(0, 2, 1000)
    with pytest.raises(DataError, match=r">= model\.vocab_size"):
        TokenDataset(np.array([1, 2, 300]), vocab_size=256, eval_fraction=0.0, seed=0)
    with pytest.raises(DataError, match="fewer than 2"):
        TokenDataset(np.array([1]), vocab_size=256, eval_fraction=0.0, seed=0)


def test_shortest_possible_split_still_works() -> None:
    ds = TokenDataset(np.arange(9), vocab_size=256, eval_fraction=0.0, seed=0)
    batch = ds.batch(0, 3, 8)  # exactly seq_len + 1 tokens: one possible window
    assert torch.equal(batch.inputs, torch.arange(8).expand(3, 8))
    assert torch.equal(batch.targets, torch.arange(1, 9).expand(3, 8))


# ---------------------------------------------------------------------------------------------- LM head


def test_aligned_logits_match_the_plain_projection_with_their_gradients() -> None:
    """The padded GEMM (what LMHead runs on CUDA) gives the unpadded head's logits, loss and gradients."""
    from fuyou_ray.models.lm_head import aligned_logits

    gen = torch.Generator().manual_seed(3)
    vocab, h = 50, 16  # 50 is not a multiple of 16: 14 padding rows
    weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, h, generator=gen, dtype=torch.float64)
    y = torch.randint(0, vocab, (2, 5), generator=gen)
    results = []
    for project in (lambda x, w: torch.nn.functional.linear(x, w), lambda x, w: aligned_logits(x, w, 16)):
        w = weight.clone().requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        logits = project(xi, w)
        loss = lm_loss(logits, y)
        loss.backward()
        assert w.grad is not None and xi.grad is not None
        results.append((logits.detach(), loss.detach(), w.grad, xi.grad))
    assert results[1][0].shape == (2, 5, vocab)
    for plain, padded in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    aligned = aligned_logits(x, weight[:48], 16)  # already aligned: the plain GEMM, no slicing
    assert aligned.is_contiguous() and aligned.shape == (2, 5, 48)


def test_every_family_head_is_an_lm_head_with_the_usual_state_dict_key() -> None:
    from fuyou_ray.models.lm_head import LMHead

    head = build_gpt_unit(TINY, TINY.n_layer + 1)
    assert isinstance(head.lm_head, LMHead)
    assert set(head.state_dict()) == {"ln_f.weight", "ln_f.bias", "lm_head.weight"}
