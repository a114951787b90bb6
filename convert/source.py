"""Reading a Hugging Face checkpoint without loading it: config, tensor index, lazy tensors.

Only the safetensors headers are read up front (names, dtypes, shapes, byte ranges), so every
check runs before a byte of weights is touched. Tensor data is then read one tensor at a time
through `mx.load`, whose arrays stay on disk until evaluated; MLX reads bfloat16 natively, which
numpy cannot hold.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_mistral.checkpoint_files import safetensors_files
from mlx_mistral.config import SUPPORTED_MODEL_TYPES, ModelArgs, read_config
from mlx_mistral.errors import ConversionError, ModelLoadError

from .weight_map import Shape

# Float dtypes (safetensors codes) a source tensor may have.
FLOAT_CODES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# A header larger than this is not a checkpoint header (a guard against reading garbage).
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor lives and what it looks like, from the file header alone."""

    name: str
    file: Path
    code: str
    shape: Shape


def read_header(path: Path) -> dict[str, tuple[str, Shape, tuple[int, int]]]:
    """Parse a safetensors header: name -> (dtype code, shape, (begin, end) in the data block).

    Raises:
        ConversionError: the file is not safetensors, or its tensors run past its end.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConversionError(f"{path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER_BYTES:
                raise ConversionError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read the safetensors header of {path}: {exc}") from None
    data_bytes = path.stat().st_size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for {name}") from None
        itemsize = _ITEMSIZE.get(code)
        numel = 1
        for d in shape:
            numel *= d
        if itemsize is not None and end - begin != numel * itemsize:
            raise ConversionError(
                f"{path} is corrupt: tensor {name} has shape {list(shape)} ({code}) but "
                f"{end - begin} bytes of data"
            )
        if end > data_bytes:
            raise ConversionError(
                f"{path} is truncated: tensor {name} ends at byte {end} of a "
                f"{data_bytes}-byte data block"
            )
        tensors[name] = (code, shape, (begin, end))
    return tensors


def _check_config(root: Path, config: dict[str, Any]) -> ModelArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{root} is not a Mistral/Llama-architecture checkpoint (model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if "quantization" in config or "quantization_config" in config:
        raise ConversionError(
            f"{root} is already quantized; convert from the original float checkpoint instead"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{root} sets {flag}: Mistral/Llama layers here have no biases")
    try:
        return ModelArgs.from_dict(config)
    except ModelLoadError as exc:
        raise ConversionError(f"{root}/config.json: {exc.message}") from None


class SourceCheckpoint:
    """A source checkpoint directory: its config, its tensors' headers, lazy tensor data.

    Args:
        root: the checkpoint directory (config.json, model*.safetensors, tokenizer files).

    Raises:
        ConversionError: not a float Mistral/Llama checkpoint in safetensors, or a broken file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.config = read_config(root)
            self.args = _check_config(root, self.config)
            files = safetensors_files(root, hf_names_only=True)
        except ModelLoadError as exc:
            raise ConversionError(exc.message) from None
        self.tensors: dict[str, SourceTensor] = {}
        for file in files:
            for name, (code, shape, _) in read_header(file).items():
                if name in self.tensors:
                    raise ConversionError(
                        f"tensor {name} is in both {self.tensors[name].file.name} and {file.name}"
                    )
                self.tensors[name] = SourceTensor(name, file, code, shape)
        for t in self.tensors.values():
            if t.code not in FLOAT_CODES:
                raise ConversionError(
                    f"tensor {t.name} in {t.file.name} has dtype {t.code}; expected a float "
                    f"tensor ({', '.join(FLOAT_CODES)})"
                )
        self._open: dict[Path, dict[str, mx.array]] = {}

    @property
    def shapes(self) -> dict[str, Shape]:
        return {name: t.shape for name, t in self.tensors.items()}

    def take(self, name: str) -> mx.array:
        """The (lazy) array for `name`; handed over once, so its memory goes when the caller's does.

        Raises:
            ConversionError: the file cannot be read.
        """
        file = self.tensors[name].file
        try:
            if file not in self._open:
                self._open[file] = mx.load(str(file))
            return self._open[file].pop(name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConversionError(f"cannot read tensor {name} from {file}: {exc}") from None
