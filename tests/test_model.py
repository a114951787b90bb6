"""The MLX model against transformers' MistralForCausalLM (CPU torch, float32) on the same
weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import MistralForCausalLM

from mlx_mistral.cache import BatchKVCache, filter_caches, merge_caches
from mlx_mistral.device import DTYPE_ENV, on_gpu
from mlx_mistral.padded_linear import PaddedLinear
from mlx_mistral.weights import load_model
from tests.checkpoints import write_hf_checkpoint

CONFIGS = {
    "gqa1": dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(
        vocab_size=512, num_attention_heads=8, num_key_value_heads=2, hidden_size=64, head_dim=8
    ),
    "sliding": dict(vocab_size=512, sliding_window=8),
    "odd": dict(
        vocab_size=397,
        hidden_size=48,
        intermediate_size=72,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=18,
        num_hidden_layers=3,
        rope_theta=10000.0,
    ),
    # MLP weights of 2^20 elements: on the CPU backend their matmuls take the padded-rows path.
    "wide": dict(vocab_size=512, intermediate_size=16384),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = write_hf_checkpoint(
        tmp_path_factory.mktemp(request.param), seed=1, **CONFIGS[request.param]
    )
    ref = MistralForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return load_model(path, dtype="float32"), ref


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def test_prompt_forward_matches_transformers(pair):
    ours, ref = pair
    ids = prompt(21, ours.args.vocab_size)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits.numpy()
    got = np.array(ours(mx.array([ids])))
    assert np.abs(got - expected).max() < TOL


def test_cached_greedy_decode_matches_transformers(pair):
    """Chunked prefill, then 32 cached decode steps: logits and greedy tokens as transformers'."""
    ours, ref = pair
    ids = prompt(13, ours.args.vocab_size, seed=2)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    ref_tokens = out.sequences[0, len(ids) :].tolist()
    ref_logits = np.stack([step[0].numpy() for step in out.logits])

    cache = ours.make_cache()
    ours(mx.array([ids[:5]]), cache)  # prefill in two chunks
    logits = ours(mx.array([ids[5:]]), cache)[:, -1]
    tokens, step_logits = [], []
    for _ in range(32):
        step_logits.append(np.array(logits[0]))
        token = int(mx.argmax(logits[0]))
        tokens.append(token)
        logits = ours(mx.array([[token]]), cache)[:, -1]
    assert tokens == ref_tokens
    assert np.abs(np.stack(step_logits) - ref_logits).max() < TOL


def test_batched_rows_match_single_rows(pair):
    """Left-padded rows of different lengths, merged into one batch, give each row's own logits."""
    ours, _ = pair
    prompts = [prompt(n, ours.args.vocab_size, seed=n) for n in (3, 11, 7)]
    singles = []
    for p in prompts:
        cache = ours.make_cache()
        ours(mx.array([p]), cache)
        singles.append(np.array(ours(mx.array([[5]]), cache)[0, -1]))
    groups = []
    for p in prompts:
        cache = ours.make_cache()
        ours(mx.array([p]), cache)
        groups.append(cache)
    batch = merge_caches(groups)
    logits = np.array(ours(mx.array([[5], [5], [5]]), batch)[:, -1])
    for row, single in enumerate(singles):
        assert np.abs(logits[row] - single).max() < TOL
    # A row leaving the batch leaves the others unchanged.
    filter_caches(batch, [2, 1])
    logits = np.array(ours(mx.array([[6], [6]]), batch)[:, -1])
    for row, p in zip((0, 1), (prompts[2], prompts[1])):
        cache = ours.make_cache()
        ours(mx.array([p + [5]]), cache)
        alone = np.array(ours(mx.array([[6]]), cache)[0, -1])
        assert np.abs(logits[row] - alone).max() < TOL


def test_cache_grows_in_steps_and_trims():
    cache = BatchKVCache([0, 0])
    k = mx.ones((2, 2, 3, 4))
    cache.update_and_fetch(k, k)
    first = cache.keys
    assert cache.keys.shape[2] == BatchKVCache.step
    for _ in range(10):
        cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert cache.keys.shape[2] == BatchKVCache.step and cache.offset == 13
    assert first.shape == cache.keys.shape
    assert cache.trim(5) == 5 and cache.offset == 8
    keys, _ = cache.state
    assert keys.shape == (2, 2, 8, 4)


def test_padded_linear_gives_each_row_its_own_product():
    """Row counts that get padded (4-64, not multiples of 16) and ones that do not, in 2-D and
    3-D inputs: every output row is the input row times the weight, as numpy computes it."""
    layer = PaddedLinear(256, 4096, bias=False)
    assert layer.pad_rows == (not on_gpu())
    assert not PaddedLinear(64, 128, bias=False).pad_rows  # small weights: not worth the copy
    weight = np.array(layer.weight)
    rng = np.random.default_rng(0)
    for rows in (1, 3, 4, 8, 12, 16, 17, 31, 33, 64, 70):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        got = np.array(layer(mx.array(x)))
        assert got.shape == (rows, 4096)
        np.testing.assert_allclose(got, x @ weight.T, rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((3, 5, 256)).astype(np.float32)  # 15 rows, padded to 16
    got = np.array(layer(mx.array(x)))
    assert got.shape == (3, 5, 4096)
    np.testing.assert_allclose(got, x @ weight.T, rtol=1e-4, atol=1e-4)


def test_compute_dtype_follows_the_device_unless_given(monkeypatch):
    """The float16 demo checkpoint computes in float32 on the CPU backend (half precision is
    emulated on x86) and in float16 on a GPU; an explicit dtype wins."""
    import mlx_mistral

    monkeypatch.delenv(DTYPE_ENV, raising=False)  # the half-precision pass sets it
    model, _ = mlx_mistral.load(mlx_mistral.demo_model_path())
    assert model.model.norm.weight.dtype == (mx.float16 if on_gpu() else mx.float32)
    model, _ = mlx_mistral.load(mlx_mistral.demo_model_path(), dtype="bfloat16")
    assert model.model.norm.weight.dtype == mx.bfloat16
