"""Training data: a token stream and deterministic batches addressed by step number.

The batch of step `s` depends only on (seed, s), never on what ran before, so a resumed or replayed step
sees exactly the batch it would have seen: resuming at the committed step needs no saved iterator state.
The embedded default is byte-level text (vocab 256) from the corpus bundled with fuyou-ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fuyou_ray.config import DataConfig


class DataError(ValueError):
    """The dataset is missing, empty, or too short for the requested sequence length."""


def bundled_corpus_text() -> str:
    return resources.files("fuyou_ray").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode_bytes(tokens: np.ndarray | torch.Tensor) -> str:
    arr = np.asarray(tokens, dtype=np.uint8)
    return arr.tobytes().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Batch:
    """One optimizer step's data: inputs and next-token targets, (global_batch, seq_len) int64."""

    step: int
    inputs: torch.Tensor
    targets: torch.Tensor

    def micro_batches(self, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.inputs.split(micro), self.targets.split(micro), strict=True))


class TokenDataset:
    """A token stream split into train and eval parts; batches are random windows chosen by step."""

    def __init__(self, tokens: np.ndarray, vocab_size: int, eval_fraction: float, seed: int) -> None:
        if tokens.size < 2:
            raise DataError("the dataset holds fewer than 2 tokens")
        if int(tokens.max()) >= vocab_size:
            raise DataError(f"token id {int(tokens.max())} >= model.vocab_size {vocab_size}")
        split = int(tokens.size * (1.0 - eval_fraction))
        self.train = tokens[:split]
        self.eval = tokens[split:]
        self.seed = seed

    @staticmethod
    def from_config(cfg: DataConfig, vocab_size: int) -> TokenDataset:
        if cfg.path is None:
            text = bundled_corpus_text()
        else:
            path = Path(cfg.path)
            if not path.is_file():
                raise DataError(f"data.path {path} does not exist: give a UTF-8 text file")
            text = path.read_text(encoding="utf-8")
        if vocab_size < 256:
            raise DataError(f"byte-level text needs model.vocab_size >= 256, got {vocab_size}")
        return TokenDataset(encode_bytes(text), vocab_size, cfg.eval_fraction, cfg.seed)

    def batch(self, step: int, global_batch: int, seq_len: int) -> Batch:
        return _windows(self.train, step, global_batch, seq_len, self.seed, "train")

    def eval_batch(self, index: int, batch: int, seq_len: int) -> Batch:
        return _windows(self.eval, index, batch, seq_len, self.seed + 1, "eval")


def _windows(tokens: np.ndarray, step: int, batch: int, seq_len: int, seed: int, part: str) -> Batch:
    if tokens.size < seq_len + 1:
        raise DataError(f"the {part} split has {tokens.size} tokens; batch.seq_len {seq_len} needs more")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    t = torch.from_numpy(windows)
    return Batch(step, t[:, :-1].contiguous(), t[:, 1:].contiguous())
