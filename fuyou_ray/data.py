"""Training data: token streams and examples, and deterministic batches addressed by step number.

The batch of step `s` depends only on (seed, s), never on what ran before, so a resumed or replayed step
sees exactly the batch it would have seen: resuming at the committed step needs no saved iterator state.

Two shapes of data:
- a token stream (plain text, pre-tokenized .bin/.npy, the bundled corpus): `TokenDataset` draws random
  windows of seq_len + 1 tokens, a fresh draw per step;
- examples (JSONL: `text`, `prompt`/`completion`, chat `messages`): `ExampleDataset` packs them into rows
  of seq_len + 1 tokens (or one example per row, padded, with `pack: false`) and walks the rows in a
  fresh seeded permutation per epoch. Tokens that take no loss (prompts, user turns, padding) have target
  IGNORE_INDEX (-100), which `lm_loss` skips.
Packed rows do not reset attention at example boundaries (the usual simple packing).

Tokenization uses the model's own tokenizer from a local directory (see tokenizer.py) and is cached on
disk, keyed by the file's path, size and mtime, the tokenizer's contents and the format options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuyou_ray.config import DataConfig
from fuyou_ray.models import IGNORE_INDEX
from fuyou_ray.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

log = logging.getLogger("fuyou.data")

CACHE_VERSION = 1
TEXT_CHUNK_CHARS = 1 << 20  # plain text is tokenized in ~1 MB pieces cut at line ends


class DataError(ValueError):
    """The dataset is missing, malformed, empty, or too short for the requested sequence length."""


def bundled_corpus_text() -> str:
    return resources.files("fuyou_ray").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode_bytes(tokens: np.ndarray | torch.Tensor) -> str:
    arr = np.asarray(tokens, dtype=np.uint8)
    return arr.tobytes().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Batch:
    """One optimizer step's data: inputs and next-token targets, (global_batch, seq_len) int64.

    A target of IGNORE_INDEX (-100) takes no loss.
    """

    step: int
    inputs: torch.Tensor
    targets: torch.Tensor

    def micro_batches(self, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.inputs.split(micro), self.targets.split(micro), strict=True))


# ---------------------------------------------------------------------------------------------- streams


class TokenDataset:
    """A token stream split into train and eval parts; batches are random windows chosen by step.

    `from_config` is the entry point for every format: it returns this class for streams and an
    `ExampleDataset` (a subclass) for JSONL examples.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        vocab_size: int,
        eval_fraction: float,
        seed: int,
        eval_tokens: np.ndarray | None = None,
    ) -> None:
        if tokens.size < 2:
            raise DataError("the dataset holds fewer than 2 tokens")
        _check_vocab(tokens, vocab_size)
        if eval_tokens is None:
            split = int(tokens.size * (1.0 - eval_fraction))
            self.train, self.eval = tokens[:split], tokens[split:]
        else:
            _check_vocab(eval_tokens, vocab_size)
            self.train, self.eval = tokens, eval_tokens
        self.seed = seed

    @staticmethod
    def from_config(cfg: DataConfig, vocab_size: int) -> TokenDataset:
        return load_dataset(cfg, vocab_size)

    def batch(self, step: int, global_batch: int, seq_len: int) -> Batch:
        return _windows(self.train, step, global_batch, seq_len, self.seed, "train")

    def eval_batch(self, index: int, batch: int, seq_len: int) -> Batch:
        return _windows(self.eval, index, batch, seq_len, self.seed + 1, "eval")

    def eval_batches(self, count: int, batch: int, seq_len: int) -> list[Batch]:
        """The fixed held-out batches of an evaluation (the same ones every time)."""
        return [self.eval_batch(i, batch, seq_len) for i in range(count)]


def _check_vocab(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        return
    step = 1 << 26
    top = max(int(tokens[i : i + step].max()) for i in range(0, tokens.size, step))
    low = min(int(tokens[i : i + step].min()) for i in range(0, tokens.size, step))
    if top >= vocab_size:
        raise DataError(
            f"token id {top} >= model.vocab_size {vocab_size}: the data was tokenized for another model"
        )
    if low < 0:
        raise DataError(f"negative token id {low} in the data")


def _windows(tokens: np.ndarray, step: int, batch: int, seq_len: int, seed: int, part: str) -> Batch:
    if tokens.size < seq_len + 1:
        raise DataError(f"the {part} split has {tokens.size} tokens; batch.seq_len {seq_len} needs more")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(windows)
    return Batch(step, t[:, :-1].contiguous(), t[:, 1:].contiguous())


# ---------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Examples:
    """Tokenized examples laid end to end: example k is tokens[offsets[k]:offsets[k+1]]; loss[i] says
    whether token i is trained on as a target (predicted from token i-1)."""

    tokens: np.ndarray  # int32
    loss: np.ndarray  # bool
    offsets: np.ndarray  # int64, n + 1 entries

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def select(self, indices: np.ndarray) -> Examples:
        parts = [(self.offsets[k], self.offsets[k + 1]) for k in indices]
        tokens = [self.tokens[a:b] for a, b in parts]
        loss = [self.loss[a:b] for a, b in parts]
        lengths = np.array([b - a for a, b in parts], dtype=np.int64)
        return Examples(
            np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
            np.concatenate(loss) if loss else np.zeros(0, bool),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )


class ExampleDataset(TokenDataset):
    """Examples in rows of seq_len + 1 tokens: packed end to end, or one per row (padded) when not `pack`.

    Train rows are visited in a seeded permutation per epoch: global row number step * B + j belongs to
    epoch (step * B + j) // rows, so the batch of a step is a pure function of (seed, step). Eval rows are
    taken in order (every evaluation sees the same ones).
    """

    def __init__(
        self, train: Examples, eval: Examples, vocab_size: int, seed: int, pack: bool, pad_id: int
    ) -> None:
        if train.tokens.size < 2:
            raise DataError("the training examples hold fewer than 2 tokens")
        _check_vocab(train.tokens, vocab_size)
        _check_vocab(eval.tokens, vocab_size)
        if not train.loss.any():
            raise DataError("no token of the training examples takes loss (all prompt, no completion?)")
        self.examples, self.eval_examples = train, eval
        self.train, self.eval = train.tokens, eval.tokens
        self.seed, self.pack, self.pad_id = seed, pack, pad_id
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def rows(self, part: Examples, seq_len: int) -> int:
        return (part.tokens.size - 1) // seq_len if self.pack else part.count

    def row(self, part: Examples, r: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets (seq_len each, int64) of row r."""
        if self.pack:
            a = r * seq_len
            window = part.tokens[a : a + seq_len + 1].astype(np.int64)
            trained = part.loss[a + 1 : a + seq_len + 1]
        else:
            a, b = int(part.offsets[r]), int(part.offsets[r + 1])
            b = min(b, a + seq_len + 1)
            window = np.full(seq_len + 1, self.pad_id, dtype=np.int64)
            window[: b - a] = part.tokens[a:b]
            trained = np.zeros(seq_len, dtype=bool)
            trained[: b - a - 1] = part.loss[a + 1 : b]
        targets = np.where(trained, window[1:], IGNORE_INDEX)
        return window[:-1], targets

    def _epoch_perm(self, epoch: int, rows: int) -> np.ndarray:
        key = (epoch, rows)
        if key not in self._perm:
            self._perm = {key: np.random.default_rng([self.seed, 7, epoch]).permutation(rows)}
        return self._perm[key]

    def _batch(self, part: Examples, step: int, row_ids: Sequence[int], seq_len: int) -> Batch:
        pairs = [self.row(part, int(r), seq_len) for r in row_ids]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        targets = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return Batch(step, inputs, targets)

    def batch(self, step: int, global_batch: int, seq_len: int) -> Batch:
        rows = self.rows(self.examples, seq_len)
        if rows < 1:
            raise DataError(
                f"the training examples hold {self.train.size} tokens; seq_len {seq_len} needs more"
            )
        ids = []
        for j in range(global_batch):
            position = step * global_batch + j
            ids.append(self._epoch_perm(position // rows, rows)[position % rows])
        return self._batch(self.examples, step, ids, seq_len)

    def eval_batch(self, index: int, batch: int, seq_len: int) -> Batch:
        rows = self.rows(self.eval_examples, seq_len)
        if rows < 1:
            raise DataError(
                f"the eval examples hold {self.eval.size} tokens; raise data.eval_fraction or give "
                "data.eval_path"
            )
        ids = [(index * batch + j) % rows for j in range(batch)]
        return self._batch(self.eval_examples, index, ids, seq_len)


# ---------------------------------------------------------------------------------------------- loading


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".bin", ".npy"):
        return "tokens"
    return "text"


def load_dataset(cfg: DataConfig, vocab_size: int) -> TokenDataset:
    """The dataset `cfg` describes, for a model with `vocab_size` tokens."""
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except TokenizerError as exc:
        raise DataError(f"data.tokenizer: {exc}") from exc
    if isinstance(tokenizer, ByteTokenizer) and vocab_size < 256:
        raise DataError(f"byte-level text needs model.vocab_size >= 256, got {vocab_size}")
    if cfg.path is None:
        tokens = np.asarray(_tokenize_text(bundled_corpus_text(), tokenizer, cfg.add_eos), dtype=np.int64)
        return TokenDataset(tokens, vocab_size, cfg.eval_fraction, cfg.seed)
    path = _existing(cfg.path, "data.path")
    eval_path = _existing(cfg.eval_path, "data.eval_path") if cfg.eval_path else None
    fmt = detect_format(path, cfg.format)
    if fmt == "tokens":
        tokens = load_token_file(path, cfg.token_dtype)
        eval_tokens = load_token_file(eval_path, cfg.token_dtype) if eval_path else None
        return TokenDataset(tokens, vocab_size, cfg.eval_fraction, cfg.seed, eval_tokens)
    cache = TokenCache(cfg, tokenizer)
    if fmt == "text":
        tokens = cache.text(path)
        eval_tokens = cache.text(eval_path) if eval_path else None
        return TokenDataset(tokens, vocab_size, cfg.eval_fraction, cfg.seed, eval_tokens)
    examples = cache.jsonl(path)
    if eval_path is not None:
        train, held_out = examples, cache.jsonl(eval_path)
    else:
        order = np.random.default_rng([cfg.seed, 3]).permutation(examples.count)
        n_eval = round(examples.count * cfg.eval_fraction)
        held_out, train = examples.select(np.sort(order[:n_eval])), examples.select(np.sort(order[n_eval:]))
    pad = getattr(tokenizer, "pad_id", None)
    pad_id = pad if pad is not None else (tokenizer.eos_id or 0)
    return ExampleDataset(train, held_out, vocab_size, cfg.seed, cfg.pack, pad_id)


def _existing(path: str | None, key: str) -> Path:
    p = Path(str(path))
    if not p.is_file():
        raise DataError(f"{key} {p} does not exist: give a text, .jsonl, .bin or .npy file")
    return p


def load_token_file(path: Path, token_dtype: str) -> np.ndarray:
    """Pre-tokenized ids, memory-mapped: .npy (its own dtype) or raw .bin of `token_dtype`."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{path}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
        return arr
    itemsize = np.dtype(token_dtype).itemsize
    if path.stat().st_size % itemsize:
        raise DataError(
            f"{path}: size is not a multiple of {itemsize} B; is data.token_dtype {token_dtype} right?"
        )
    return np.memmap(path, dtype=token_dtype, mode="r")


# ---------------------------------------------------------------------------------------------- tokenize


def _tokenize_text(text: str, tokenizer: ByteTokenizer | HFTokenizer, add_eos: bool) -> np.ndarray:
    """A whole text as one document: special tokens (e.g. BOS) once at the start, EOS at the end.

    Ids accumulate in a 4-byte array, not a list of Python ints (9x smaller for a large file)."""
    ids = array("i")
    for k, piece in enumerate(_pieces(text)):
        ids.extend(tokenizer.encode(piece, add_special_tokens=k == 0))
    if add_eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32)


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text) or start == 0:
        end = min(len(text), start + TEXT_CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        if end >= len(text):
            return
        start = end


def tokenize_record(
    record: Mapping[str, Any], tokenizer: ByteTokenizer | HFTokenizer, add_eos: bool
) -> tuple[list[int], list[bool]]:
    """One JSONL record's tokens and per-token loss flags (True = trained on as a target)."""
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
    if "messages" in record:
        return tokenize_chat(record["messages"], tokenizer)
    if "prompt" in record and "completion" in record:
        prompt = tokenizer.encode(_text(record, "prompt"), add_special_tokens=True)
        completion = tokenizer.encode(_text(record, "completion"), add_special_tokens=False) + eos
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if "text" in record:
        ids = tokenizer.encode(_text(record, "text"), add_special_tokens=True) + eos
        return ids, [True] * len(ids)
    raise DataError(
        f"a record needs `text`, `prompt` + `completion`, or `messages`; got keys {sorted(record)}"
    )


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def tokenize_chat(messages: Any, tokenizer: ByteTokenizer | HFTokenizer) -> tuple[list[int], list[bool]]:
    """A conversation rendered with the chat template; loss on the assistant turns only.

    Each assistant turn's text is where the conversation rendered up to it (with the generation prompt)
    ends and the conversation rendered through it ends, so it includes the end-of-turn marker the model
    must learn to emit. Tokens are matched to turns by their character offsets in the full text.
    """
    if not isinstance(tokenizer, HFTokenizer):
        raise DataError("`messages` records need data.tokenizer: a tokenizer with a chat template")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise DataError("`messages` must be a list of {role, content} objects")
    full = tokenizer.render_chat(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        if not full.startswith(start_text):
            start_text = tokenizer.render_chat(messages[:i])
        end_text = tokenizer.render_chat(messages[: i + 1])
        if not (full.startswith(start_text) and full.startswith(end_text)):
            log.warning("the chat template does not render conversations as prefixes: training on all tokens")
            spans = [(0, len(full))]
            break
        spans.append((len(start_text), len(end_text)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    loss = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return ids, loss


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line")
            yield number, record


class TokenCache:
    """Tokenized files on disk, so a resumed or repeated run does not tokenize again.

    Each entry is <key>.tokens.npy (+ .loss.npy, .offsets.npy for examples) and <key>.json, written last
    (via rename) as the entry's commit mark; the key hashes the file's identity, the tokenizer and the
    options that change the tokens.
    """

    def __init__(self, cfg: DataConfig, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fuyou-ray" / "tokens"
        self.dir = Path(cfg.cache_dir) if cfg.cache_dir else default
        self.tokenizer = tokenizer
        self.add_eos = cfg.add_eos

    def _key(self, path: Path, kind: str) -> str:
        st = path.stat()
        ident = {
            "v": CACHE_VERSION,
            "kind": kind,
            "path": str(path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "tokenizer": self.tokenizer.fingerprint,
            "add_eos": self.add_eos,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def _load(self, key: str, parts: Sequence[str]) -> list[np.ndarray] | None:
        if not (self.dir / f"{key}.json").is_file():
            return None
        try:
            return [np.load(self.dir / f"{key}.{p}.npy", mmap_mode="r", allow_pickle=False) for p in parts]
        except (OSError, ValueError):
            return None

    def _store(self, key: str, arrays: Mapping[str, np.ndarray], source: Path) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for name, arr in arrays.items():
                tmp = self.dir / f"{key}.{name}.tmp.npy"
                np.save(tmp, arr, allow_pickle=False)
                os.replace(tmp, self.dir / f"{key}.{name}.npy")
            mark = self.dir / f"{key}.json.tmp"
            mark.write_text(json.dumps({"source": str(source), "tokens": int(arrays["tokens"].size)}))
            os.replace(mark, self.dir / f"{key}.json")
        except OSError as exc:
            log.warning(
                "cannot cache tokenized %s in %s (%s): it will be tokenized again", source, self.dir, exc
            )

    def text(self, path: Path) -> np.ndarray:
        key = self._key(path, "text")
        hit = self._load(key, ["tokens"])
        if hit is not None:
            return hit[0]
        log.info("tokenizing %s", path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc}); for token ids use a .bin or .npy file") from exc
        tokens = np.asarray(_tokenize_text(text, self.tokenizer, self.add_eos), dtype=np.int32)
        self._store(key, {"tokens": tokens}, path)
        return tokens

    def jsonl(self, path: Path) -> Examples:
        key = self._key(path, "jsonl")
        hit = self._load(key, ["tokens", "loss", "offsets"])
        if hit is not None:
            return Examples(*hit)
        log.info("tokenizing %s", path)
        tokens, loss, offsets = array("i"), array("b"), array("q", [0])
        for number, record in read_jsonl(path):
            try:
                ids, flags = tokenize_record(record, self.tokenizer, self.add_eos)
            except (DataError, TokenizerError) as exc:
                raise DataError(f"{path}:{number}: {exc}") from exc
            tokens.extend(ids)
            loss.extend(flags)
            offsets.append(len(tokens))
        if len(offsets) == 1:
            raise DataError(f"{path}: no records")
        examples = Examples(
            np.frombuffer(tokens, dtype=np.int32) if tokens else np.zeros(0, np.int32),
            np.frombuffer(loss, dtype=np.int8).astype(bool),
            np.frombuffer(offsets, dtype=np.int64),
        )
        self._store(
            key, {"tokens": examples.tokens, "loss": examples.loss, "offsets": examples.offsets}, path
        )
        return examples
