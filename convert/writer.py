"""Streaming safetensors output: shards planned up front, then filled one tensor at a time.

Every output tensor's name, shape and dtype is known before any data is read (quantized shapes
follow from bits and group size), so each shard's header is written first and its tensors are
appended as they are produced. Memory then holds one tensor at a time instead of one shard, and
the shard count is known from the start, so files get their final names directly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import mlx.core as mx

from mlx_mistral.checkpoint_files import INDEX_FILE

from .quantize import OutputTensor

SAFETENSORS_CODES = {mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.uint32: "U32"}
# mlx-lm stamps its files this way; readers use it to tell MLX layouts from PyTorch ones.
METADATA = {"format": "mlx"}


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds, in write order."""

    filename: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` of tensor data.

    A tensor larger than the limit gets a shard of its own (a tensor is never split). Names
    follow mlx-lm: "model.safetensors" for one shard, else "model-00001-of-00003.safetensors".

    Args:
        tensors: the output tensors, in the order they will be produced.
        max_shard_bytes: the limit on each shard's tensor bytes (> 0).

    Returns:
        The shards, in order.
    """
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    return [Shard(name, tuple(group)) for name, group in zip(names, groups)]


def _header(shard: Shard) -> bytes:
    entries: dict[str, object] = {"__metadata__": METADATA}
    offset = 0
    for t in shard.tensors:
        entries[t.name] = {
            "dtype": SAFETENSORS_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    # The data block starts 8-byte aligned, as the format recommends: pad the JSON with spaces.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one planned shard; `write` must be called for its tensors in plan order.

    Args:
        directory: where the shard file goes.
        shard: the plan (names, shapes, dtypes) the header announces.
    """

    def __init__(self, directory: Path, shard: Shard) -> None:
        self.path = directory / shard.filename
        self.shard = shard
        self._next = 0
        # Held open across calls (closed by close/__exit__): tensors arrive one by one.
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115
        self._file.write(_header(shard))

    def write(self, name: str, array: mx.array) -> None:
        """Append one evaluated tensor, checking it is exactly what the header announced.

        Raises:
            RuntimeError: the tensor differs from the plan (a bug, never a user error).
        """
        planned = self.shard.tensors[self._next]
        if (name, tuple(array.shape), array.dtype) != (planned.name, planned.shape, planned.dtype):
            raise RuntimeError(
                f"{self.path.name}: got {name} {array.shape} {array.dtype}, planned "
                f"{planned.name} {planned.shape} {planned.dtype}"
            )
        data = memoryview(mx.contiguous(array)).cast("B")
        if data.nbytes != planned.nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, planned {planned.nbytes}")
        self._file.write(data)
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.shard.tensors)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc_type is None and not self.complete:
            raise RuntimeError(f"{self.path.name}: closed after {self._next} tensors")


def write_index(directory: Path, shards: list[Shard], total_parameters: int) -> Path:
    """Write model.safetensors.index.json: total size and a sorted tensor -> file map.

    mlx-lm writes the index even for a single shard; so do we.
    """
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    index = {
        "metadata": {
            "total_size": sum(s.nbytes for s in shards),
            "total_parameters": total_parameters,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    path = directory / INDEX_FILE
    path.write_text(json.dumps(index, indent=4) + "\n", encoding="utf-8")
    return path
