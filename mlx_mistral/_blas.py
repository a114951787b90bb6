"""Use an optimized BLAS for MLX's CPU backend when the system has one (Linux).

The `mlx[cpu]` wheel links the reference (netlib) BLAS: about 8 GFLOP/s for a float32 matmul on
the x86 machines we measured. Loading OpenBLAS with RTLD_GLOBAL *before* MLX is imported makes
the dynamic linker resolve MLX's `cblas_*` calls to it: the same matmul ran 10-30x faster, which
is what makes prefill and batched decoding fast on a CPU (see docs/benchmarks.md). Metal and
CUDA do not use BLAS for matmuls, so nothing changes on a Mac.

Set MLX_MISTRAL_BLAS=off to keep the reference BLAS, or to a library path to choose one.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload() -> str | None:
    """Load the optimized BLAS if possible; returns its path, or None (reference BLAS stays)."""
    global loaded
    choice = os.environ.get("MLX_MISTRAL_BLAS", "auto")
    if (
        loaded
        or choice.lower() in ("off", "0", "no", "none")
        or not sys.platform.startswith("linux")
    ):
        return loaded
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    for path in [choice] if choice.lower() != "auto" else CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return path
    return None


FIX_COMMAND = "sudo apt-get install libopenblas0-pthread"


def reference_blas_warning() -> str | None:
    """The start-up warning for MLX's CPU backend on the reference BLAS; None when it is not.

    With the reference BLAS, 8 concurrent streams decoded at 0.67x the rate of one (measured on
    a fresh Linux machine); with OpenBLAS they reach ~4.3x. Not said when the user turned the
    preload off on purpose (MLX_MISTRAL_BLAS=off).
    """
    choice = os.environ.get("MLX_MISTRAL_BLAS", "auto").lower()
    if loaded or not sys.platform.startswith("linux") or choice in ("off", "0", "no", "none"):
        return None
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:  # CUDA: matmuls do not use BLAS
        return None
    return (
        "MLX's CPU backend is using the reference BLAS, which makes prefill and batched "
        "decoding ~10x slower (concurrent requests slow each other down); install OpenBLAS "
        f"and restart: `{FIX_COMMAND}` (Debian/Ubuntu)"
    )
