"""The disk prompt cache: a restarted engine or server reuses a long prefix with the cold logits;
files made for another model, or damaged, are ignored with a log line."""

from __future__ import annotations

import logging
import shutil
import threading

import httpx
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mistral import SamplingParams
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.cache import BatchKVCache
from mlx_mistral.device import default_compute_dtype
from mlx_mistral.disk_cache import (
    DiskCacheSettings,
    DiskPrefixCache,
    KVLayout,
    default_cache_dir,
    model_identity,
    system_prompt_prefix,
)
from mlx_mistral.prefix_cache import PrefixCache, layers_copy
from tests.server_process import ServerProcess

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SYSTEM = "You are a careful assistant. Answer briefly and cite your sources. " * 30
# The tiny model's KV, in the compute dtype the suite runs (float32; float16 in CI's second pass).
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=16, dtype=default_compute_dtype())


def chat(tokenizer, user: str) -> list[int]:
    return tokenizer.encode_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    )


def mlx_tree_leaves(tree) -> list[mx.array]:
    return [leaf for _, leaf in tree_flatten(tree)]


def disk_cache(directory, identity="model-a", **kw) -> DiskPrefixCache:
    settings = DiskCacheSettings(directory, identity, **kw)
    return DiskPrefixCache(settings, LAYOUT)


def run(generator: BatchGenerator, prompt: list[int]):
    uid = generator.add(prompt, GREEDY)
    events = []
    while generator.has_work:
        events += [e for e in generator.step() if e.uid == uid]
    return [e.token for e in events if e.token is not None], events[-1].cached_tokens


def fill(tiny_model, directory) -> list[int]:
    """One engine's life: answer a long prompt, write it to disk; returns the prompt."""
    model, tokenizer = tiny_model
    disk = disk_cache(directory)
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30, disk=disk))
    prompt = chat(tokenizer, "What is the capital of France?")
    assert run(generator, prompt)[1] == 0
    disk.close()
    return prompt


def test_a_restarted_engine_reuses_the_prefix_with_the_cold_logits(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    first = fill(tiny_model, tmp_path)
    assert len(first) > 256
    # "Restart": a new disk cache over the same directory, an empty memory cache.
    disk = disk_cache(tmp_path)
    assert len(disk) == 1
    cache = PrefixCache(1 << 30, disk=disk)
    second = chat(tokenizer, "And what is the capital of Italy?")
    hit = cache.lookup(second)
    shared = int(
        np.flatnonzero(np.array(first[: len(second)]) != np.array(second[: len(first)]))[0]
    )
    assert hit is not None and hit.length == shared
    warm = [BatchKVCache.from_state(k, v) for k, v in hit.layers]
    warm_logits = np.array(model(mx.array([second[hit.length :]]), warm)[0, -1])
    # The cold run prefilled in the same two pieces, and in one piece, agree up to rounding:
    # not bit for bit, since the stored KV was computed in other matmul shapes (the first
    # prompt's length) and sits in a buffer of another capacity, so other kernels and
    # summation orders run (they differ in the 8th digit on some CPUs).
    cold = model.make_cache()
    model(mx.array([second[: hit.length]]), cold)
    cold_logits = np.array(model(mx.array([second[hit.length :]]), cold)[0, -1])
    one_pass = np.array(model(mx.array([second]))[0, -1])
    for reference in (cold_logits, one_pass):
        assert np.abs(warm_logits - reference).max() < 1e-4
    # Bit for bit where nothing is computed: the KV written and read back again.
    assert_round_trip_is_exact(tmp_path / "again", hit.layers)
    assert len(cache) == 1  # the disk entry moved into memory
    # Through the generator: the cold tokens, and the reused tokens reported.
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30, disk=disk))
    tokens, cached = run(generator, second)
    assert cached == shared
    assert tokens == run(BatchGenerator(model, tokenizer), second)[0]
    disk.close()


def assert_round_trip_is_exact(directory, layers) -> None:
    ids = np.arange(layers[0][0].shape[2], dtype=np.int64)
    disk = disk_cache(directory, min_tokens=1)
    assert disk.store(ids, layers_copy(layers))  # contiguous, as PrefixCache.store hands over
    disk.close()
    again = disk_cache(directory, min_tokens=1)
    (entry,) = again._index.values()
    for stored, loaded in zip(mlx_tree_leaves(layers), mlx_tree_leaves(again._load(entry))):
        assert stored.dtype == loaded.dtype and np.array_equal(np.array(stored), np.array(loaded))
    again.close()


def test_writes_happen_off_the_engine_thread_with_evaluated_arrays(tiny_model, tmp_path):
    written = []
    original = DiskPrefixCache._write

    def spy(self, ids, layers):
        written.append(threading.current_thread().name)
        original(self, ids, layers)

    DiskPrefixCache._write = spy
    try:
        fill(tiny_model, tmp_path)
    finally:
        DiskPrefixCache._write = original
    assert written == ["prompt-cache-writer"]
    files = list(tmp_path.glob("*/*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*/.*"))  # no temporary file left


def test_a_foreign_or_damaged_file_is_ignored_with_a_log_line(tiny_model, tmp_path, caplog):
    model, tokenizer = tiny_model
    fill(tiny_model, tmp_path)
    (made_for_a,) = tmp_path.glob("*/*.safetensors")
    other = disk_cache(tmp_path, identity="model-b")
    foreign = other.dir / made_for_a.name
    shutil.copy(made_for_a, foreign)
    with caplog.at_level(logging.WARNING, "mlx_mistral.disk_cache"):
        assert len(disk_cache(tmp_path, identity="model-b")) == 0
    assert "made for another model" in caplog.text and not foreign.exists()
    other.close()

    # Damaged data under an intact header: found at load time, never used.
    data = bytearray(made_for_a.read_bytes())
    data[-100:] = bytes(100)
    made_for_a.write_bytes(bytes(data))
    disk = disk_cache(tmp_path)
    assert len(disk) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, "mlx_mistral.disk_cache"):
        generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30, disk=disk))
        prompt = chat(tokenizer, "Hi")
        tokens, cached = run(generator, prompt)
    assert cached == 0 and "does not match its checksum" in caplog.text
    assert tokens == run(BatchGenerator(model, tokenizer), prompt)[0]
    disk.close()

    # A truncated file is refused by its size alone.
    made_for_a = next(tmp_path.glob(f"{disk.dir.name}/*.safetensors"))
    made_for_a.write_bytes(made_for_a.read_bytes()[:5000])
    caplog.clear()
    with caplog.at_level(logging.WARNING, "mlx_mistral.disk_cache"):
        assert len(disk_cache(tmp_path)) == 0
    assert "bytes where its header says" in caplog.text


def test_the_cap_evicts_the_least_recently_used_file(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    fill(tiny_model, tmp_path)
    (first,) = tmp_path.glob("*/*.safetensors")
    disk = disk_cache(tmp_path, max_bytes=int(first.stat().st_size * 1.5))
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(0, disk=disk))
    run(generator, chat(tokenizer, "Something else entirely, please.")[:-3] + [1, 2, 3])
    disk.flush()
    files = list(tmp_path.glob("*/*.safetensors"))
    assert len(files) == 1 and files[0] != first
    disk.close()


def test_model_identity_follows_the_weights(tiny_hf_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_hf_checkpoint, tmp_path / "copy")
    assert model_identity(copy) == model_identity(copy)
    before = model_identity(copy)
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert model_identity(copy) != before


def test_default_directory_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "mlx-mistral" / "prompt-cache"


def test_system_prompt_prefix_starts_every_chat_with_it(tiny_model):
    _, tokenizer = tiny_model
    prefix = system_prompt_prefix(tokenizer, SYSTEM)
    for user in ("Hello", "1+1?", "¿Qué?"):
        assert chat(tokenizer, user)[: len(prefix)] == prefix
    assert len(prefix) > len(tokenizer.encode(SYSTEM)) - 5


def usage(server, messages):
    body = {
        "model": str(server.argv[server.argv.index("--model") + 1]),
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
    }
    response = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["usage"], data["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_a_restarted_server_reports_cached_tokens_and_the_cold_answer(tiny_hf_checkpoint, tmp_path):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    warm_file = tmp_path / "system.txt"
    warm_file.write_text(SYSTEM)
    flags = ("--prompt-cache-dir", str(tmp_path / "cache"))
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        cold_usage, cold_text = usage(server, messages)
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        warm_usage, warm_text = usage(server, messages)
    assert warm_usage["prompt_tokens_details"]["cached_tokens"] == cold_usage["prompt_tokens"] - 1
    assert warm_text == cold_text
    # --warm-prompt: the first request of a fresh cache already finds the system prompt.
    flags = ("--prompt-cache-dir", str(tmp_path / "fresh"), "--warm-prompt", str(warm_file))
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        first_usage, first_text = usage(server, messages)
        assert "warm prompt:" in server.log()
    assert first_usage["prompt_tokens_details"]["cached_tokens"] > len(SYSTEM) // 8
    assert first_text == cold_text
    # 'off': nothing written, nothing reused.
    with ServerProcess(tiny_hf_checkpoint, "--prompt-cache-dir", "off") as server:
        off_usage, _ = usage(server, messages)
    assert off_usage["prompt_tokens_details"]["cached_tokens"] == 0
