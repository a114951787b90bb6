"""Read a checkpoint's weights into a Model: HF originals and the mlx-community format.

Both formats keep the HF tensor names; a quantized checkpoint adds `<name>.scales` and
`<name>.biases` next to a packed `<name>.weight`, and a `quantization` block in config.json.
Exactly the modules whose `.scales` are present are quantized, each with its own bits and group
size (mlx-lm's mixed-precision recipes vary them per layer), as mlx-lm does, so checkpoints move
between the two packages in both directions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint_files import IGNORED_SUFFIXES, safetensors_files
from .config import ModelArgs, read_config
from .device import default_compute_dtype, parse_dtype
from .errors import ModelLoadError
from .model import Model

log = logging.getLogger("mlx_mistral.weights")


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in safetensors_files(path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
    return {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES)}


def quantization_of(config: dict[str, Any]) -> dict[str, int] | None:
    quant = config.get("quantization")
    if quant is None:
        return None
    try:
        return {"group_size": int(quant["group_size"]), "bits": int(quant["bits"])}
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"config.json has a malformed quantization block: {quant!r}") from None


def quantized_layers_predicate(block: dict[str, Any], weights: dict[str, mx.array]):
    """`nn.quantize`'s predicate: which layers are quantized, and how.

    A layer is quantized when its `.scales` are in the checkpoint. Its bits and group size are
    the ones mlx-lm's mixed-precision recipes write per layer into the quantization block
    (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6}`), else what the packed
    tensors' shapes say, which the block's defaults match for a uniform quantization.
    """

    def predicate(name: str, module: nn.Module) -> bool | dict[str, int]:
        if f"{name}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        layer = block.get(name)
        if isinstance(layer, dict):
            try:
                return {"group_size": int(layer["group_size"]), "bits": int(layer["bits"])}
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(
                    f"config.json quantizes {name} as {layer!r}: need group_size and bits"
                ) from None
        in_dims = module.weight.shape[-1]
        group_size = in_dims // weights[f"{name}.scales"].shape[-1]
        bits = weights[f"{name}.weight"].shape[-1] * 32 // in_dims
        return {"group_size": group_size, "bits": bits}

    return predicate


def check_weights(model: Model, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unknown:
        raise ModelLoadError(
            f"checkpoint has {len(unknown)} unexpected tensor(s), e.g. {unknown[0]}"
        )
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            found, wanted = tuple(weights[name].shape), tuple(param.shape)
            raise ModelLoadError(f"tensor {name} has shape {found}, expected {wanted}")


def load_model(
    path: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    group: mx.distributed.Group | None = None,
) -> Model:
    """Build a Model from a local checkpoint directory and load its weights.

    Args:
        path: a directory with config.json and safetensors weights (HF or mlx-community format).
        dtype: compute dtype; default float16/bfloat16 on a GPU, float32 on the CPU backend.
        group: an `mx.distributed` group of more than one rank: load this rank's tensor-parallel
            shard (see `mlx_mistral.distributed`).

    Raises:
        ModelLoadError: a config or weights that do not describe a Mistral model.
    """
    if group is not None and group.size() > 1:  # tensor parallel (issue 18): reads one shard
        from .distributed import load_sharded

        return load_sharded(path, group=group, dtype=dtype)
    path = Path(path)
    config = read_config(path)
    args = ModelArgs.from_dict(config)
    weights = read_weights(path)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = model_for_checkpoint(config, weights)
    float_weights = [w for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)]
    compute = parse_dtype(dtype) or default_compute_dtype(
        float_weights[0].dtype if float_weights else None
    )
    weights = {
        k: v.astype(compute) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    materialize(model, compute)
    model.eval()
    return model


def model_for_checkpoint(config: dict[str, Any], weights: Mapping[str, Any]) -> Model:
    """The (lazy, unevaluated) Model a checkpoint describes: quantized where its config says,
    and checked against the checkpoint's tensor names and shapes (`weights`: name -> anything
    with a `.shape`).

    Raises:
        ModelLoadError: a tensor is missing, unexpected or of the wrong shape.
    """
    model = Model(ModelArgs.from_dict(config))
    quant = quantization_of(config)
    if quant is not None:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=quantized_layers_predicate(config["quantization"], weights),
        )
    check_weights(model, weights)
    return model


def materialize(model: Model, compute: mx.Dtype) -> None:
    """Read the weights into memory layer by layer, logging progress (a 7B model takes a while
    from disk; mx.load maps the files lazily, so this is where the reading happens)."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    log.info("reading %.2f GB of weights (%s compute)", total / 1e9, str(compute).split(".")[-1])
    layers = model.layers
    mx.eval(model.model.embed_tokens.parameters())
    marks = {len(layers) * q // 4: q * 25 for q in (1, 2, 3)}
    for i, layer in enumerate(layers, 1):
        mx.eval(layer.parameters())
        if i in marks:
            log.info("weights %d%% read", marks[i])
    mx.eval(model.parameters())
    log.info("weights %d%% read", 100)
