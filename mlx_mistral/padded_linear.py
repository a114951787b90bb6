"""A linear layer that rounds a small batch of rows up to a multiple of 16 on the CPU backend.

Batched decoding multiplies one row per running sequence against every weight matrix. With
OpenBLAS on x86 (measured, docs/benchmarks.md), a float32 matmul against a large weight takes
*longer* for 4-15 rows than for 16: Mistral-7B's MLP weight (14336x4096) took 24.3 ms at 8 rows,
37.7 ms at 12 and 19.5 ms at 16; 17-31 rows are likewise slower than 32. So the layer appends
zero rows up to the next multiple of 16 and drops their outputs. Each output row is still the
product of its own input row. Off on a GPU and for quantized layers (neither calls BLAS), for
small weights (the copy costs more than it saves) and past 64 rows (prefill chunks), and off on
MLX's reference BLAS (no OpenBLAS loaded, see `_blas`): its matmul costs grow with the rows, so
padding 8 rows to 16 doubled the work (8 streams decoded at 0.67x one stream's rate).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import _blas
from .device import on_gpu

MULTIPLE = 16
MIN_WEIGHT_ELEMENTS = 1 << 20
ROWS = range(4, 65)  # row counts that are padded (when not already a multiple)


class PaddedLinear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) with CPU row padding."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__(input_dims, output_dims, bias=bias)
        self.pad_rows = (
            not on_gpu()
            and _blas.loaded is not None  # the padding pays off with OpenBLAS only
            and input_dims * output_dims >= MIN_WEIGHT_ELEMENTS
        )

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if self.pad_rows and rows % MULTIPLE and rows in ROWS and self.weight.dtype == mx.float32:
            flat = x.reshape(rows, x.shape[-1])
            zeros = mx.zeros((MULTIPLE - rows % MULTIPLE, x.shape[-1]), dtype=x.dtype)
            out = super().__call__(mx.concatenate([flat, zeros]))[:rows]
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return super().__call__(x)
