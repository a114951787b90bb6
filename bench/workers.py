"""Shared by the peer comparisons: run one side in its own process, give mlx-lm our BLAS, and
alternate which side goes first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def mlx_lm_blas_env() -> dict[str, str]:
    """The environment that gives an mlx-lm process the OpenBLAS ours preloads, so a comparison
    is of the code and not of the BLAS (mlx[cpu] ships the ~30x slower reference BLAS)."""
    return {"LD_PRELOAD": OPENBLAS} if os.path.exists(OPENBLAS) else {}


def run_worker(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run `script --worker *args` in a new process; returns the JSON its last stdout line holds."""
    out = subprocess.run(
        [sys.executable, script, "--worker", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_turn(round_: int, a: str, b: str) -> tuple[str, str]:
    """Which side goes first swaps from round to round, so neither always follows the other
    (or a slow minute on a shared machine)."""
    return (a, b) if round_ % 2 == 0 else (b, a)
