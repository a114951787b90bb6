"""Sampler cost per decode step at vocab 32000, next to a tiny model's forward pass.

Times one full `sample()` call (penalties, filters, draw, host transfer of the tokens) per step
for batch 1 and 16, beside one decode forward of the tiny test model (hidden 64, 2 layers,
vocab 32000, lm_head included). Prints a markdown
table and writes it, with the machine described, to the `sampler` section of docs/benchmarks.md.

    python bench/bench_sampler.py [--steps 30]
"""

from __future__ import annotations

# First: the package preloads an optimized system BLAS, which only works before mlx.core loads.
import mlx_mistral  # noqa: F401

# isort: split
import argparse
import os
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlx_mistral.config import ModelArgs
from mlx_mistral.model import Model
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.sampling.sampler import sample
from mlx_mistral.sampling.state import SamplerState

# Sibling modules: `python bench/NAME.py` puts bench/ first on sys.path.
from report import machine, write_section

VOCAB = 32000
BATCHES = (1, 16)
# The tiny checkpoint of tests/checkpoints.py (TINY_CONFIG), at the real vocabulary size.
TINY = ModelArgs(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    rope_theta=1e6,
)
TYPICAL = {
    "temperature": 0.7,
    "top_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repetition_penalty": 1.1,
}
TYPICAL_NAME = "typical: T 0.7, top_p 0.9, penalties on"
CONFIGS = {
    "greedy (temperature 0)": {"temperature": 0.0},
    "temperature 0.7 only": {"temperature": 0.7},
    TYPICAL_NAME: TYPICAL,
    "typical + logprobs, top_logprobs 5": {**TYPICAL, "logprobs": True, "top_logprobs": 5},
}


NOTES = (
    "Median of {steps} steps after 3 warm-up steps. *Sampler* is one `sample()` call: "
    "penalties, logit_bias, filters, draw, and the tokens back on the host. *Forward* is one "
    "decode step of the tiny test model (hidden 64, 2 layers, vocab 32000) "
    "with a 32-token KV cache. Logits: *peaked* = normal with std 3 (a top_p 0.9 nucleus of "
    "~10 tokens at T 0.7); *flat* = the tiny random model's own logits (a nucleus of most of "
    "the vocabulary: the full-sort fallback)."
)


def median_ms(step: Callable[[], object], steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_forward(batch: int, steps: int) -> float:
    """One decode step (B tokens, after a 32-token prefill) of the tiny model, evaluated."""
    model = Model(TINY)
    mx.eval(model.parameters())
    cache = model.make_cache(batch)
    mx.eval(model(mx.ones((batch, 32), dtype=mx.int32), cache))
    token = mx.ones((batch, 1), dtype=mx.int32)

    def step() -> None:
        mx.eval(model(token, cache)[:, -1, :])
        for c in cache:  # stay at one length: every step costs the same
            c.trim(1)

    return median_ms(step, steps)


def bench_sampler(logits: mx.array, kwargs: dict, steps: int) -> float:
    batch = logits.shape[0]
    states = [
        SamplerState(SamplingParams(seed=i, **kwargs), list(range(1, 200)), VOCAB)
        for i in range(batch)
    ]
    return median_ms(lambda: sample(logits, states), steps)


def bench_mlx_lm(logits: mx.array, steps: int) -> float:
    """mlx-lm's sampler, temp 0.7 / top_p 0.9 shared by every row, no penalties (a peer figure)."""
    sampler = make_sampler(temp=0.7, top_p=0.9)

    def step() -> None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampler(logprobs).tolist()

    return median_ms(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per figure")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    rows = []
    forward = {b: bench_forward(b, args.steps) for b in BATCHES}
    for batch in BATCHES:
        # Peaked logits (normal, std 3): at T 0.7 a top_p 0.9 nucleus is ~10 tokens, as for an
        # LM that is fairly sure. The tiny random model's own logits are nearly flat instead
        # (nucleus ~ most of the vocabulary): the worst case, which needs a full sort.
        peaked = mx.array(rng.normal(size=(batch, VOCAB)).astype(np.float32) * 3)
        model = Model(TINY)
        flat = model(mx.ones((batch, 8), dtype=mx.int32))[:, -1, :]
        mx.eval(peaked, flat, model.parameters())
        for name, kwargs in CONFIGS.items():
            rows.append((batch, name, "peaked", bench_sampler(peaked, kwargs, args.steps)))
        rows.append((batch, TYPICAL_NAME, "flat", bench_sampler(flat, TYPICAL, args.steps)))
        peer = "mlx-lm make_sampler(0.7, top_p 0.9), no penalties"
        rows.append((batch, peer, "peaked", bench_mlx_lm(peaked, args.steps)))

    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = [
        "## Sampler cost per decode step (vocab 32000)",
        "",
        (
            f"Machine: {machine()}. Shared with other jobs while measured (1-minute load "
            f"average {load}), so figures are indicative; compare rows of one run, not runs."
        ),
        "",
        NOTES.format(steps=args.steps),
        "",
        "| batch | sampler config | logits | sampler ms/step | tiny forward ms/step | ratio |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for batch, name, kind, ms in rows:
        fwd = forward[batch]
        lines.append(f"| {batch} | {name} | {kind} | {ms:.2f} | {fwd:.2f} | {ms / fwd:.2f} |")
    table = "\n".join(lines)
    print(table)

    write_section("sampler", table)


if __name__ == "__main__":
    main()
