"""Half precision, the dtype every Mac computes in, against the reference and against float32.

MLX computes float16 and bfloat16 on its CPU backend too (slower, as x86 emulates them), so the
Mac's numbers can be checked here. The tolerances follow from the formats: float16 keeps 11
significant bits (machine epsilon 2^-10 ~ 9.8e-4), bfloat16 8 (2^-7 ~ 7.8e-3); rounding at each
of a layer's matmuls and norms adds up, so logits differ from float32 by a few epsilons times
their magnitude. Measured figures are in docs/precision.md.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import MistralForCausalLM

import mlx_mistral
from mlx_mistral import SamplingParams
from mlx_mistral.convert.pipeline import convert
from mlx_mistral.weights import load_model
from tests.checkpoints import write_hf_checkpoint

EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
HALF = sorted(EPSILON)
PROMPTS = [
    "What is 2 + 2?",
    "What is the capital of France?",
    "Hello! How are you?",
    "What is 7 * 6?",
    "Name the capital of Italy.",
]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-half"), seed=1, vocab_size=512)


def logits(path: Path, dtype: str, ids: list[int]) -> np.ndarray:
    return np.array(load_model(path, dtype=dtype)(mx.array([ids])).astype(mx.float32))[0]


def reference_logits(path: Path, dtype: str, ids: list[int]) -> np.ndarray:
    ref = MistralForCausalLM.from_pretrained(
        path, torch_dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits.float().numpy()[0]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_half_precision_logits_match_the_reference_in_the_same_dtype(model, dtype, tiny_path):
    """Against transformers in the same dtype, and against our own float32: we lose no more
    precision than the reference does (measured: ours 0.018 from float32 on the demo model in
    float16, transformers' 0.021; 0.12 and 0.15 in bfloat16)."""
    path = tiny_path if model == "tiny" else mlx_mistral.demo_model_path()
    vocab = 512 if model == "tiny" else 32000
    ids = np.random.default_rng(0).integers(3, vocab, size=33).tolist()
    exact = logits(path, "float32", ids)
    ours, ref = logits(path, dtype, ids), reference_logits(path, dtype, ids)
    scale = np.abs(exact).max()
    # Two half-precision computations, each a few epsilons from the exact logits.
    assert np.abs(ours - ref).max() <= 4 * EPSILON[dtype] * scale
    assert np.abs(ours - exact).max() <= 1.5 * np.abs(ref - exact).max() + EPSILON[dtype] * scale
    assert (ours.argmax(-1) == exact.argmax(-1)).mean() >= 0.95


@pytest.fixture(scope="module")
def demo_models() -> dict[str, tuple]:
    path = mlx_mistral.demo_model_path()
    return {dtype: mlx_mistral.load(path, dtype=dtype) for dtype in ("float32", "float16")}


def greedy(model_and_tokenizer, prompt: str, **extra) -> str:
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": prompt}]
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0, **extra})
    return mlx_mistral.generate(model, tokenizer, messages, params=params)


def test_the_demo_model_answers_the_same_in_float16(demo_models):
    """Greedy answers in float16 equal float32's on these prompts (the logits differ by ~1e-3
    of their range, less than the gap between the best two tokens at each step here)."""
    for prompt in PROMPTS:
        assert greedy(demo_models["float16"], prompt) == greedy(demo_models["float32"], prompt)


def test_top_logprobs_in_float16_match_float32(demo_models):
    """The sampler computes logprobs in float32 from half-precision logits (as vLLM and
    llama.cpp do), so they differ from float32's only by the logits' own rounding."""

    def steps(dtype: str) -> list:
        model, tokenizer = demo_models[dtype]
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        stream = mlx_mistral.stream_generate(model, tokenizer, messages, params=params)
        return [chunk.logprobs for chunk in stream if chunk.logprobs is not None]

    half, full = steps("float16"), steps("float32")
    assert [s.token for s in half] == [s.token for s in full]
    for h, f in zip(half, full):
        assert abs(h.logprob - f.logprob) < 0.02
        # The same alternatives; their order may differ where float32 has them within the
        # tolerance of each other (measured: -14.6512 and -14.6520 swap in float16).
        half_top, full_top = dict(h.top), dict(f.top)
        assert half_top.keys() == full_top.keys()
        assert all(abs(half_top[t] - full_top[t]) < 0.02 for t in full_top)


def test_a_seed_reproduces_its_answer_in_float16(demo_models):
    def sampled() -> str:
        return greedy(demo_models["float16"], PROMPTS[2], temperature=1.0, seed=1234)

    assert sampled() == sampled()


def test_a_4bit_checkpoint_with_float16_scales_computes_in_float16(tiny_path, tmp_path):
    """As mlx-community ships them: 4-bit weights, float16 scales and biases."""
    out = convert(
        tiny_path, tmp_path / "q4", dtype="float16", quantize=True, bits=4, progress=False
    )
    ids = np.random.default_rng(1).integers(3, 512, size=17).tolist()
    half = load_model(out, dtype="float16")
    layer = half.model.layers[0].mlp.gate_proj
    assert layer.scales.dtype == mx.float16 and layer.weight.dtype == mx.uint32
    got = np.array(half(mx.array([ids])).astype(mx.float32))[0]
    exact = logits(out, "float32", ids)
    assert np.isfinite(got).all()
    # Measured 0.0022 on logits of magnitude 0.63 (3.5 epsilons): the quantized matmul also
    # dequantizes through float16 scales, so twice the dense bound.
    assert np.abs(got - exact).max() <= 8 * EPSILON["float16"] * np.abs(exact).max()
