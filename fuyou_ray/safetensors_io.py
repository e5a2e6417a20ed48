"""Streaming safetensors: read tensors in bounded chunks, write sharded checkpoints tensor by tensor.

The safetensors library maps whole shards (5 GB each in a 70B checkpoint): every page touched stays in the
process's RSS until the shard is closed. Import and export must stay within a few GB whatever the model
size, so this module reads the format itself - an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte range), then the raw little-endian data - with `pread` into one reusable
chunk buffer, and writes shards whose headers are computed up front from the planned tensor list, so each
tensor is written once, in order, as soon as it is produced. Nothing is unpickled: weights arrive only as
raw bytes plus a JSON header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or not safetensors."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one .safetensors file's header, checking every byte range lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header length {header_len} is invalid; the file is corrupt")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: the header is not valid JSON ({exc})") from exc
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as exc:
            raise CheckpointError(
                f"{path}: tensor {name!r} has an unsupported or missing field {exc}"
            ) from exc
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} has a byte range that does not fit its shape")
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, nbytes)
    return entries


class CheckpointReader:
    """The tensors of a Hugging Face safetensors checkpoint directory (one file, or shards + index).

    Lifecycle: opening parses every shard's header (no tensor data); `read_into` then copies one tensor
    into a destination tensor (converting dtype, optionally transposing) in chunks of at most
    `chunk_bytes`, so memory use is one chunk whatever the tensor or shard size.
    """

    def __init__(self, directory: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.directory = Path(directory)
        self.chunk_bytes = chunk_bytes
        self.entries: dict[str, TensorEntry] = {}
        for file in self._files():
            for name, entry in read_header(file).items():
                if name in self.entries:
                    raise CheckpointError(f"{self.directory}: tensor {name!r} appears in two shards")
                self.entries[name] = entry
        # Sized to what the largest tensor needs, up to chunk_bytes (a tiny model gets a tiny buffer).
        largest = max((e.nbytes for e in self.entries.values()), default=0)
        self._buffer = bytearray(max(8, min(chunk_bytes, largest)))
        self.bytes_read = 0

    def _files(self) -> list[Path]:
        d = self.directory
        index = d / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            files = sorted({d / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return files
        files = sorted(d.glob("*.safetensors"))
        if files:
            return files
        if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
            raise CheckpointError(
                f"{d} holds only pickled PyTorch weights (*.bin/*.pt); fuyou-ray loads safetensors only "
                "(pickle can run code). Convert once with transformers: AutoModelForCausalLM."
                "from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{d} holds no *.safetensors weights")

    def names(self) -> list[str]:
        return list(self.entries)

    def read_into(self, name: str, dest: torch.Tensor, transpose: bool = False) -> None:
        """Copy tensor `name` into `dest` (same shape, or its transpose for a 2-D tensor)."""
        entry = self.entries[name]
        shape = entry.shape
        expected = (shape[1], shape[0]) if transpose else shape
        if tuple(dest.shape) != tuple(expected):
            raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {shape}, expected {expected}")
        rows = shape[0] if shape else 1
        row_bytes = entry.nbytes // max(rows, 1)
        per_chunk = max(1, self.chunk_bytes // max(row_bytes, 1))
        if row_bytes > len(self._buffer):
            self._buffer = bytearray(row_bytes)
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            for r0 in range(0, rows, per_chunk):
                r1 = min(rows, r0 + per_chunk)
                n = (r1 - r0) * row_bytes
                view = memoryview(self._buffer)[:n]
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:]], entry.offset + r0 * row_bytes + done)
                    if got == 0:
                        raise CheckpointError(f"{entry.file}: ends inside tensor {name!r}")
                    done += got
                chunk = torch.frombuffer(self._buffer, dtype=entry.dtype, count=n // entry.dtype.itemsize)
                if not shape:
                    dest.copy_(chunk.view(()))
                elif transpose:
                    dest[:, r0:r1].copy_(chunk.view(r1 - r0, shape[1]).t())
                else:
                    dest[r0:r1].copy_(chunk.view(r1 - r0, *shape[1:]))
            # The source is read once per use: keep it out of the page cache where the OS allows.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self.bytes_read += entry.nbytes


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy in order: a shard takes tensors until the next would push it past max_shard_bytes."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(shard: Sequence[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardedCheckpointWriter:
    """Writes a planned list of tensors as model-0000k-of-0000n.safetensors + model.safetensors.index.json.

    Lifecycle: the shard plan and every header are fixed at construction; `write` must then be called once
    per tensor in plan order (a shard file is opened when its first tensor arrives and closed, fsync'ed,
    after its last); `close` writes the index. Memory: nothing beyond the tensor being written.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], tensors: Sequence[PlannedTensor], max_shard_bytes: int
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order: Iterator[tuple[int, int, PlannedTensor]] = (
            (s, k, t) for s, shard in enumerate(self.shards) for k, t in enumerate(shard)
        )
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            s, k, planned = next(self._order)
        except StopIteration:
            raise CheckpointError(f"tensor {name!r} was not planned for this checkpoint") from None
        if name != planned.name or tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise CheckpointError(
                f"expected {planned.name} {planned.dtype} {planned.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if k == 0:
            self._file = open(self.out_dir / self.file_names[s], "wb")  # noqa: SIM115 (closed below)
            self._file.write(_header_bytes(self.shards[s]))
        assert self._file is not None
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.data)
        self.bytes_written += planned.nbytes
        if k == len(self.shards[s]) - 1:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Write the index once every planned tensor has been written."""
        if next(self._order, None) is not None:
            raise CheckpointError("the checkpoint is incomplete: not every planned tensor was written")
        weight_map = {t.name: self.file_names[s] for s, shard in enumerate(self.shards) for t in shard}
        total = sum(t.nbytes for shard in self.shards for t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
