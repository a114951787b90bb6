"""Tensor parallelism over `mx.distributed`: each rank of a group holds 1/N of every layer.

Megatron-style sharding of each transformer block:
- q/k/v_proj and gate/up_proj are column-sharded (`nn.AllToShardedLinear`): rank r computes its
  own attention heads and MLP columns with no communication;
- o_proj and down_proj are row-sharded (`nn.ShardedToAllLinear`): each rank multiplies its slice
  of the inputs and one `all_sum` of the (B, L, hidden) partial outputs completes the layer,
  so a block costs two all-reduces.
Query and KV heads are split together (rank r holds KV heads [r*K/N, (r+1)*K/N) and the query
heads that read them), so attention needs nothing from other ranks and each rank's KV cache
holds K/N heads. Embeddings, norms and lm_head stay whole on every rank, so every rank computes
the full logits (lm_head is under 2% of Mistral-7B's weights; sharding the vocabulary would
cost an all-gather of the logits every step).

The sharded layers are MLX's own (float and quantized). `load_sharded` reads only this rank's
rows or columns of each tensor straight from the safetensors files, so no rank ever holds the
whole model; `shard_model` shards a model already in memory.

Run the same script on every rank, e.g. two processes on this machine over TCP:
`mlx.launch --backend ring -n 2 script.py`, where script.py does

    >>> import mlx.core as mx, mlx_mistral
    >>> model, tokenizer = mlx_mistral.load(path, group=mx.distributed.init())  # doctest: +SKIP
    >>> greedy = mlx_mistral.SamplingParams(temperature=0)
    >>> mlx_mistral.generate(model, tokenizer, "Hello", params=greedy)  # doctest: +SKIP

Every rank must make the same calls in the same order (each forward all-reduces twice per
layer); sampling with temperature 0 or a fixed seed keeps the ranks' tokens identical.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten

from .checkpoint_files import IGNORED_SUFFIXES, safetensors_files
from .config import ModelArgs, read_config
from .device import default_compute_dtype, parse_dtype
from .errors import ModelLoadError
from .model import Model
from .weights import materialize, model_for_checkpoint

# Module name -> MLX sharding. Column-sharded layers split their outputs (axis 0 of weight,
# scales and biases); row-sharded layers split their inputs (the last axis, which a quantized
# layer packs: its weight columns hold 32/bits inputs each and its scales one per group).
SHARDING = {
    "q_proj": "all-to-sharded",
    "k_proj": "all-to-sharded",
    "v_proj": "all-to-sharded",
    "gate_proj": "all-to-sharded",
    "up_proj": "all-to-sharded",
    "o_proj": "sharded-to-all",
    "down_proj": "sharded-to-all",
}
SPLIT_AXIS = {"all-to-sharded": 0, "sharded-to-all": -1}


def check_shardable(model: Model, size: int) -> None:
    """Raise ModelLoadError unless `model` (full, possibly quantized) splits evenly into `size`
    ranks: whole KV heads per rank, and whole quantization groups per rank in row-sharded layers.
    """
    args = model.args
    if args.num_key_value_heads % size:
        raise ModelLoadError(
            f"num_key_value_heads ({args.num_key_value_heads}) must be a multiple of the group "
            f"size ({size}) for tensor parallelism: each rank holds whole KV heads"
        )
    if args.intermediate_size % size:
        raise ModelLoadError(
            f"intermediate_size ({args.intermediate_size}) must be a multiple of the group size "
            f"({size}) for tensor parallelism"
        )
    for name, module in _sharded_linears(model):
        if SHARDING[name.rsplit(".", 1)[-1]] != "sharded-to-all" or not hasattr(module, "bits"):
            continue
        inputs = module.weight.shape[-1] * 32 // module.bits
        if (inputs // size) % module.group_size:
            raise ModelLoadError(
                f"{name} is quantized in groups of {module.group_size} along its {inputs} inputs: "
                f"{size} ranks would split a group ({inputs // size} inputs each); use fewer ranks "
                f"or a checkpoint quantized with a smaller group size"
            )


def shard_model(model: Model, group: mx.distributed.Group) -> Model:
    """Shard `model` in place across `group` (see the module docstring) and return it.

    On a model whose weights are loaded this slices them; on a freshly built model it only
    reshapes the lazy, never-evaluated initial parameters, which `load_sharded` then replaces.
    """
    size = group.size()
    check_shardable(model, size)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, sharding in SHARDING.items():
                if name in parent:
                    parent[name] = shard_linear(parent[name], sharding, group=group)
        # The attention reshapes by its head counts: this rank's share of them.
        layer.self_attn.n_heads //= size
        layer.self_attn.n_kv_heads //= size
    return model


def load_sharded(
    path: str | Path, *, group: mx.distributed.Group, dtype: str | mx.Dtype | None = None
) -> Model:
    """This rank's shard of the checkpoint at `path` (HF or mlx-community, float or quantized).

    Every rank calls this with the same path; each reads only its own slices of the tensors.
    Calling the model gives the full logits on every rank (the ranks must call it in lockstep).

    Raises:
        ModelLoadError: a config or weights that are not a Mistral model, or a model that does
            not split into `group.size()` ranks.
    """
    path = Path(path)
    config = read_config(path)
    args = ModelArgs.from_dict(config)
    tensors = SafetensorsSlices(safetensors_files(path))
    if args.tie_word_embeddings:
        tensors.names.pop("lm_head.weight", None)
    # Build the full model (its parameters are lazy and never evaluated, so this costs no
    # memory), quantize and check it against the checkpoint's shapes, then shard it.
    model = model_for_checkpoint(config, tensors.names)
    shard_model(model, group)

    split = {
        f"{name}.{param}": SPLIT_AXIS[SHARDING[name.rsplit(".", 1)[-1]]]
        for name, module in _sharded_linears(model)
        for param in ("weight", "scales", "biases")
    }
    floats = [t.dtype for t in tensors.names.values() if mx.issubdtype(t.dtype, mx.floating)]
    compute = parse_dtype(dtype) or default_compute_dtype(floats[0] if floats else None)
    weights = []
    for name, _ in tree_flatten(model.parameters()):
        axis = split.get(name)
        array = tensors.read(name, axis, group.rank(), group.size())
        if mx.issubdtype(array.dtype, mx.floating) and array.dtype != compute:
            # Cast now, so the slice in the checkpoint's dtype is freed before the next is read:
            # a lazy cast would hold every float32 slice until the end (a float32 checkpoint
            # served in float16 peaked at the whole model's float32 bytes on each rank).
            array = array.astype(compute)
            mx.eval(array)
        weights.append((name, array))
    model.load_weights(weights, strict=True)
    del weights
    materialize(model, compute)
    model.eval()
    return model


def _sharded_linears(model: Model):
    """(dotted name, module) of every linear layer that tensor parallelism splits."""
    for i, layer in enumerate(model.layers):
        for part, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in SHARDING:
                if name in parent:
                    yield f"model.layers.{i}.{part}.{name}", parent[name]


class TensorInfo:
    """A tensor's place in a safetensors file (what `check_weights` needs: its shape)."""

    def __init__(self, file: Path, entry: dict, base: int):
        self.file = file
        self.shape = tuple(entry["shape"])
        self.storage, self.dtype = _DTYPES[entry["dtype"]]
        self.offset = base + entry["data_offsets"][0]


# safetensors dtype -> (numpy dtype with the same bytes, MLX dtype). numpy has no bfloat16:
# its bytes are read as uint16 and viewed as bfloat16 by MLX.
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "I64": (np.int64, mx.int64),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
}


class SafetensorsSlices:
    """Reads slices of tensors from safetensors files without reading the rest.

    A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte
    range) and the raw tensors; a memory map of one tensor touches only the pages of the rows
    or columns copied out of it, and is dropped right after.
    """

    def __init__(self, files: list[Path]):
        self.names: dict[str, TensorInfo] = {}
        for file in files:
            try:
                with open(file, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
            except (OSError, struct.error, ValueError) as exc:
                raise ModelLoadError(f"cannot read {file}: {exc}") from None
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise ModelLoadError(f"tensor {name} in {file} has dtype {entry['dtype']}")
                self.names[name] = TensorInfo(file, entry, 8 + length)

    def read(self, name: str, axis: int | None, rank: int, size: int) -> mx.array:
        """Tensor `name`, or its `rank`-th of `size` equal parts along `axis`."""
        info = self.names[name]
        whole = np.memmap(info.file, info.storage, mode="r", offset=info.offset, shape=info.shape)
        index = [slice(None)] * whole.ndim
        if axis is not None:
            part = info.shape[axis] // size
            index[axis] = slice(rank * part, (rank + 1) * part)
        array = mx.array(np.ascontiguousarray(whole[tuple(index)]))
        del whole  # unmaps the file: its pages no longer count towards this process's memory
        return array.view(info.dtype) if array.dtype != info.dtype else array
