"""Turning one source tensor into the tensor(s) written: dtype cast and affine quantization.

The layout is mlx-lm's (and so mlx-community's): a quantized `<module>.weight` becomes the packed
uint32 `<module>.weight` plus `<module>.scales` and `<module>.biases` in the output dtype, and a
loader quantizes exactly the modules whose `.scales` are present. Like mlx-lm, the weight is cast
to the output dtype first and quantized from there, so both tools write identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_mistral.device import dtype_named
from mlx_mistral.errors import ConversionError

from .weight_map import Shape, TensorSpec

# The widths mx.quantize packs in affine mode (4 and 8 are the ones worth using on Mistral).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# The group sizes mx.quantize accepts.
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def parse_dtype(name: str) -> mx.Dtype:
    """The output dtype named `name` (a key of `DTYPES`).

    Raises:
        ConversionError: any other name.
    """
    try:
        return dtype_named(name)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


@dataclass(frozen=True)
class QuantConfig:
    """Affine quantization settings, validated on construction.

    Attributes:
        bits: bits per weight, one of SUPPORTED_BITS.
        group_size: weights sharing one scale and bias, one of SUPPORTED_GROUP_SIZES.
    """

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ConversionError(
                f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits!r}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES or isinstance(self.group_size, bool):
            raise ConversionError(
                f"group size must be one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}, "
                f"got {self.group_size!r}"
            )

    def applies_to(self, spec: TensorSpec) -> bool:
        """Whether `spec` is quantized: a Linear/Embedding weight whose rows split into groups.

        mlx-lm skips a module whose input dimension is not a multiple of the group size and
        keeps it in float; so do we, so the two tools agree module for module.
        """
        return spec.quantizable and spec.shape[-1] % self.group_size == 0

    def config_block(self) -> dict[str, object]:
        """The `quantization` entry of config.json, as mlx-lm writes it."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


@dataclass(frozen=True)
class OutputTensor:
    """A tensor as it will be stored: name, shape and dtype are known before any data is read."""

    name: str
    shape: Shape
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def plan_outputs(
    spec: TensorSpec, dtype: mx.Dtype, quant: QuantConfig | None
) -> list[OutputTensor]:
    """The tensors `spec` becomes in the output, without touching its data.

    Args:
        spec: the source tensor.
        dtype: the output float dtype.
        quant: the quantization settings, or None for a float conversion.

    Returns:
        [weight] for a float tensor; [weight (uint32, packed), scales, biases] when quantized.
    """
    if quant is None or not quant.applies_to(spec):
        return [OutputTensor(spec.name, spec.shape, dtype)]
    *rows, cols = spec.shape
    packed = (*rows, cols * quant.bits // 32)
    groups = (*rows, cols // quant.group_size)
    module = _module(spec.name)
    return [
        OutputTensor(spec.name, packed, mx.uint32),
        OutputTensor(f"{module}.scales", groups, dtype),
        OutputTensor(f"{module}.biases", groups, dtype),
    ]


def transform(
    spec: TensorSpec, weight: mx.array, dtype: mx.Dtype, quant: QuantConfig | None
) -> list[tuple[str, mx.array]]:
    """Cast (and maybe quantize) one source tensor; the result is lazy until evaluated.

    Args:
        spec: what the tensor is.
        weight: its data, in the source dtype.
        dtype: the output float dtype.
        quant: the quantization settings, or None.

    Returns:
        (name, array) pairs in the order `plan_outputs` gives.
    """
    cast = weight.astype(dtype)
    if quant is None or not quant.applies_to(spec):
        return [(spec.name, cast)]
    packed, scales, biases = mx.quantize(cast, group_size=quant.group_size, bits=quant.bits)
    module = _module(spec.name)
    return [(spec.name, packed), (f"{module}.scales", scales), (f"{module}.biases", biases)]
