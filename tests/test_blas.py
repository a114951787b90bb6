"""The optimized-BLAS preload: used when present, optional, and numerically the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlx_mistral import _blas

PROBE = """
import json, numpy as np
import mlx_mistral, mlx.core as mx
from mlx_mistral import _blas
a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 72)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b).max())
from mlx_mistral.padded_linear import PaddedLinear
pads = PaddedLinear(4096, 1024, bias=False).pad_rows  # a weight large enough to be padded
print(json.dumps({"loaded": _blas.loaded, "err": err, "pads": pads}))
"""


def probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLX_MISTRAL_BLAS", None)
    if env_value is not None:
        env["MLX_MISTRAL_BLAS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reference_blas_when_turned_off():
    result = probe("off")
    assert result["loaded"] is None and result["err"] < 1e-3
    # Rows are padded for OpenBLAS's sake; on the reference BLAS padding only adds work.
    assert result["pads"] is False


@pytest.mark.skipif(
    not any(os.path.exists(p) for p in _blas.CANDIDATES), reason="no system OpenBLAS"
)
def test_openblas_preloaded_and_matmuls_agree():
    result = probe(None)
    assert result["loaded"] in _blas.CANDIDATES and result["err"] < 1e-3
    assert result["pads"] is True
