"""KV quantization (--kv-bits): the attention path against mlx-lm's, the logit error against
float KV, batching, the bytes per token, and the prefix and disk caches on quantized KV."""

from __future__ import annotations

import subprocess
import sys

import httpx
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention

import mlx_mistral
from mlx_mistral import SamplingParams
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.cache import QuantizedKVCache, cache_from_state
from mlx_mistral.device import default_compute_dtype
from mlx_mistral.disk_cache import DiskCacheSettings, DiskPrefixCache, KVLayout
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.model import attention_mask, quantized_attention
from mlx_mistral.prefix_cache import PrefixCache
from tests.server_process import ServerProcess

GREEDY = SamplingParams(temperature=0, max_tokens=12)
QUESTIONS = ["Hello!", "What is the capital of France?", "2+2?", "Tell me a story about a cat."]


@pytest.fixture(scope="module")
def checkpoint64(tmp_path_factory):
    """A tiny checkpoint whose head_dim (64) is a multiple of the quantization group."""
    from tests.checkpoints import write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-hd64"), seed=3, head_dim=64)


@pytest.fixture(scope="module")
def model64(checkpoint64):
    return mlx_mistral.load(checkpoint64)


def run(generator: BatchGenerator, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    uids = [generator.add(p, params) for p in prompts]
    tokens: dict[int, list[int]] = {}
    while generator.has_work:
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
    return [tokens[u] for u in uids]


def test_quantized_attention_matches_mlx_lm():
    rng = np.random.default_rng(0)
    B, H, K, L, T, d = 2, 8, 2, 3, 70, 64
    q = mx.array(rng.standard_normal((B, H, L, d)), dtype=mx.float32)
    cache = QuantizedKVCache([0, 5], bits=8)
    k, v = cache.update_and_fetch(
        mx.array(rng.standard_normal((B, K, T, d)), dtype=mx.float32),
        mx.array(rng.standard_normal((B, K, T, d)), dtype=mx.float32),
    )
    mask = attention_mask(L, T - L, [0, 5])  # causal, with row 1's left padding hidden
    ours = quantized_attention(q, k, v, 0.125, mask, 64, 8)
    theirs = quantized_scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, bits=8)
    assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-5


@pytest.mark.parametrize("bits, bound", [(8, 0.05), (4, 0.6)])
def test_logit_error_against_float_kv(model64, bits, bound):
    model, tokenizer = model64
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Tell me a story. " * 20}])
    errors = []
    for kv_bits in (None, bits):
        cache = model.make_cache(kv_bits=kv_bits)
        model(mx.array([prompt[:100]]), cache)  # a prefill in two chunks, then one decode step
        model(mx.array([prompt[100:-1]]), cache)
        errors.append(np.array(model(mx.array([prompt[-1:]]), cache)[0, -1]))
    float_logits, quant_logits = errors
    # Measured on this model: 8 bits ~0.3% of the logits' spread, 4 bits ~5%.
    assert np.abs(float_logits - quant_logits).max() < bound * float_logits.std()


def test_greedy_tokens_equal_float_kv_at_8_bits(model64):
    model, tokenizer = model64
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    float_tokens = run(BatchGenerator(model, tokenizer), prompts)
    assert run(BatchGenerator(model, tokenizer, kv_bits=8), prompts) == float_tokens


def test_batched_quantized_equals_alone(model64):
    """Rows joining (merge) and leaving (filter) a quantized batch change nobody's tokens."""
    model, tokenizer = model64
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    generator = BatchGenerator(model, tokenizer, kv_bits=4, prefill_chunk=4)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (16, 3, 9, 12)]
    uids, tokens = [generator.add(prompts[0], params[0])], {}
    for step in range(80):
        if step == 5:
            uids.append(generator.add(prompts[1], params[1]))
        if step == 8:
            uids += [generator.add(p, sp) for p, sp in zip(prompts[2:], params[2:])]
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
        if step > 8 and not generator.has_work:
            break
    for uid, prompt, sp in zip(uids, prompts, params):
        alone = run(BatchGenerator(model, tokenizer, kv_bits=4), [prompt], sp)[0]
        assert tokens[uid] == alone


def test_bytes_per_token(model64):
    model, tokenizer = model64
    args = model.args
    float_bytes = BatchGenerator(model, tokenizer).kv_bytes_per_token
    # 8 (4) bits a value plus a 16-bit scale and bias per 64 values: 8.5 / 16 = 0.531 (4.5 / 16
    # = 0.281) of float16 KV; less of float32 KV.
    for bits, ratio in ((8, 0.532), (4, 0.282)):
        generator = BatchGenerator(model, tokenizer, kv_bits=bits)
        # Scales and biases are in the compute dtype (float32 here, float16 on a Mac).
        d, scale_bytes = args.head_dim, model.model.norm.weight.dtype.size
        per_head = d * bits // 8 + 2 * (d // 64) * scale_bytes
        assert generator.kv_bytes_per_token == 2 * args.num_hidden_layers * 2 * per_head
        assert generator.kv_bytes_per_token <= ratio * float_bytes
        cache = model.make_cache(kv_bits=bits)
        model(mx.array([[1] * 300]), cache)
        stored = sum(c.nbytes for c in cache)  # capacity grows in steps of 256 tokens
        assert stored == 512 * generator.kv_bytes_per_token


def test_prefix_and_disk_caches_hold_quantized_kv(model64, tmp_path):
    model, tokenizer = model64
    system = "You are a careful assistant. Answer briefly. " * 40
    first, second = (
        tokenizer.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": u}]
        )
        for u in ("Hi", "Hello there")
    )
    settings = DiskCacheSettings(tmp_path, "model-64")
    disk = DiskPrefixCache(settings, KVLayout(2, 2, 64, default_compute_dtype(), kv_bits=8))
    generator = BatchGenerator(
        model, tokenizer, kv_bits=8, prefix_cache=PrefixCache(1 << 30, disk=disk)
    )
    run(generator, [first])
    disk.close()
    # A restart: the quantized prefix comes back from disk.
    disk = DiskPrefixCache(settings, KVLayout(2, 2, 64, default_compute_dtype(), kv_bits=8))
    hit = PrefixCache(1 << 30, disk=disk).lookup(second)
    assert hit is not None and isinstance(hit.layers[0][0], tuple)
    warm = [cache_from_state(k, v) for k, v in hit.layers]
    cold = model.make_cache(kv_bits=8)
    model(mx.array([second[: hit.length]]), cold)
    warm_logits = model(mx.array([second[hit.length :]]), warm)[0, -1]
    cold_logits = model(mx.array([second[hit.length :]]), cold)[0, -1]
    # Close, not bit for bit: the stored KV was computed in the first prompt's matmul shapes,
    # so other kernels ran (and 8-bit rounding can amplify a last-digit difference).
    scale = np.abs(np.array(cold_logits)).max()
    assert np.abs(np.array(warm_logits) - np.array(cold_logits)).max() < 1e-3 * scale
    disk.close()
    # A float cache over the same directory never sees the 8-bit files.
    assert len(DiskPrefixCache(settings, KVLayout(2, 2, 64, default_compute_dtype()))) == 0


def test_kv_bits_refused_clearly(model64, tiny_model):
    model, tokenizer = model64
    with pytest.raises(InvalidRequestError, match="kv_bits must be one of") as info:
        BatchGenerator(model, tokenizer, kv_bits=3)
    assert info.value.param == "kv_bits"
    with pytest.raises(InvalidRequestError, match="multiple of 64; this model's is 16"):
        BatchGenerator(*tiny_model, kv_bits=8)


def answer(server, content: str) -> dict:
    body = {
        "model": server.argv[server.argv.index("--model") + 1],
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 10,
        "temperature": 0,
    }
    response = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_server_with_kv_bits_8_answers_as_float_kv(checkpoint64):
    texts = {}
    for flags in ((), ("--kv-bits", "8")):
        with ServerProcess(checkpoint64, "--prompt-cache-dir", "off", *flags) as server:
            texts[flags] = [answer(server, q) for q in QUESTIONS[:2]]
    assert texts[("--kv-bits", "8")] == texts[()]


def test_server_refuses_a_bad_kv_bits(checkpoint64, tiny_hf_checkpoint):
    for model, bits, says in (
        (checkpoint64, "3", "--kv-bits must be one of 4, 8, got 3"),
        (tiny_hf_checkpoint, "8", "multiple of 64; this model's is 16"),
    ):
        argv = [sys.executable, "-m", "mlx_mistral.server", "--model", str(model)]
        argv += ["--port", "0", "--prompt-cache-dir", "off", "--kv-bits", bits]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and says in done.stderr, done.stderr


def test_trim_rows_realigns_every_quantized_array():
    # Speculative decoding drops a different number of rejected positions per row: the data,
    # scales and biases must all move together, as the float cache's keys and values do.
    keys = mx.random.normal((2, 2, 10, 64), key=mx.random.key(1))
    values = mx.random.normal((2, 2, 10, 64), key=mx.random.key(2))
    cache = QuantizedKVCache([0, 0], bits=8)
    cache.update_and_fetch(keys, values)
    cache.trim_rows([1, 3])
    assert cache.length == 9 and cache.left_padding == [0, 2]
    k, v = (mx.dequantize(*part, group_size=64, bits=8) for part in cache.state)
    for got, want in ((k, keys), (v, values)):
        assert float(mx.abs(got[0, :, :9] - want[0, :, :9]).max()) < 0.05
        assert float(mx.abs(got[1, :, 2:9] - want[1, :, :7]).max()) < 0.05  # row 1 kept 7
