"""Hugging Face checkpoint -> MLX weights (the mlx-community format mlx-lm reads and writes).

    >>> from mlx_mistral.convert import convert
    >>> convert("mistralai/Mistral-7B-Instruct-v0.2", "mistral-q4", quantize=True)  # doctest: +SKIP

Command line: `mlx-mistral convert SRC --out DIR [--dtype ...] [-q --bits 4 --group-size 64]`.
"""

from mlx_mistral.device import DTYPES

from .pipeline import DEFAULT_MAX_SHARD_BYTES, convert, output_config
from .quantize import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantConfig
from .weight_map import TensorSpec, check_source, expected_tensors

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "DTYPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantConfig",
    "TensorSpec",
    "check_source",
    "convert",
    "expected_tensors",
    "output_config",
]
