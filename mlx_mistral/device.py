"""Which dtype to compute in, per device."""

from __future__ import annotations

import os

import mlx.core as mx

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# The compute dtype when no `dtype`/`--dtype` is given: lets a Linux machine or CI run the Mac's
# half precision, and a Mac user rule precision out (float32) without changing a command line.
DTYPE_ENV = "MLX_MISTRAL_DTYPE"
DTYPE_HELP = (
    "compute dtype: float16, bfloat16 or float32 (default: $MLX_MISTRAL_DTYPE if set, else "
    "float16/bfloat16 on a GPU and float32 on the CPU; float32 on a Mac rules precision out "
    "when reporting a bug)"
)


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def default_compute_dtype(checkpoint_dtype: mx.Dtype | None = None) -> mx.Dtype:
    """$MLX_MISTRAL_DTYPE if set; else half precision on a GPU (Metal, CUDA), float32 on the CPU.

    On x86 CPUs half-precision arithmetic is emulated: float32 decodes 2-3x faster there, and a
    4-bit matmul with float32 scales is ~40x faster than with float16 scales.

    Raises:
        ValueError: $MLX_MISTRAL_DTYPE names no supported dtype.
    """
    forced = os.environ.get(DTYPE_ENV)
    if forced:
        try:
            return dtype_named(forced)
        except ValueError as exc:
            raise ValueError(f"${DTYPE_ENV}: {exc}") from None
    if on_gpu():
        # `is not None` first: MLX's Dtype.__eq__ raises TypeError when compared with None.
        bf16 = checkpoint_dtype is not None and checkpoint_dtype == mx.bfloat16
        return mx.bfloat16 if bf16 else mx.float16
    return mx.float32


def name_of(dtype: mx.Dtype) -> str:
    """ "float16" for mx.float16 (the names `--dtype` takes), else MLX's own spelling."""
    return next((name for name, known in DTYPES.items() if known == dtype), str(dtype))


def dtype_named(name: str) -> mx.Dtype:
    """The MLX dtype for "float16" | "bfloat16" | "float32".

    Raises:
        ValueError: any other name.
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype {name!r} is not supported (choose from {', '.join(DTYPES)})"
        ) from None


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype | None:
    """A compute dtype given by name or as an MLX dtype; None (the device's default) passes."""
    if name is None or isinstance(name, mx.Dtype):
        return name
    return dtype_named(name)


def check_requested_dtype(name: str | None) -> None:
    """Check a command line's `--dtype` (or, without one, $MLX_MISTRAL_DTYPE) before a load.

    Raises:
        InvalidRequestError: naming the flag or the variable that holds an unknown dtype.
    """
    from .errors import InvalidRequestError

    if name is not None:
        source, value = "--dtype", name
    else:
        source, value = DTYPE_ENV, os.environ.get(DTYPE_ENV)
    if value and value not in DTYPES:
        raise InvalidRequestError(
            f"{source} {value!r} is not a dtype (choose from {', '.join(DTYPES)})", param=source
        )
