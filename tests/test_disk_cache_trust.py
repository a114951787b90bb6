"""The disk prompt cache trusts no file it reads: a crafted entry (checksum recomputed, as anyone
can) is a miss answered as a cold request, never an engine failure; junk in its folder is
skipped at start-up; entries are keyed by the weights' content."""

from __future__ import annotations

import logging
import os
import shutil

import httpx
import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral.batch import BatchGenerator
from mlx_mistral.disk_cache import DiskCacheSettings, DiskPrefixCache, checksum, model_identity
from mlx_mistral.prefix_cache import PrefixCache
from tests.checkpoints import write_hf_checkpoint
from tests.server_process import ServerProcess
from tests.test_disk_cache import LAYOUT, SYSTEM, chat, disk_cache, fill, run, usage


def craft(path, change) -> None:
    """Rewrite a cache file's tensors with `change` and a checksum that matches them."""
    tensors, meta = mx.load(str(path), return_metadata=True)
    tensors = {k: mx.array(np.array(v)) for k, v in change(dict(tensors)).items()}
    meta["crc32"] = checksum(tensors)
    path.unlink()
    mx.save_safetensors(str(path), tensors, metadata=meta)


def extra_head(t):
    return {k: mx.concatenate([v, v[:, :1]], axis=1) for k, v in t.items()}


def one_nan(t):
    values = np.array(t["1.values"])
    values[0, 1, 7, 3] = np.nan
    return {**t, "1.values": mx.array(values)}


def one_position_short(t):
    return {k: v[:, :, :-1] for k, v in t.items()}


CRAFTED = {
    "an extra KV head": extra_head,
    "float16 KV": lambda t: {k: v.astype(mx.float16) for k, v in t.items()},
    "int32 KV": lambda t: {k: v.astype(mx.int32) for k, v in t.items()},
    "a NaN": one_nan,
    "zeroed KV": lambda t: {k: mx.zeros_like(v) for k, v in t.items()},
    "one position short": one_position_short,
    "a layer missing": lambda t: {k: v for k, v in t.items() if not k.startswith("1.")},
}


@pytest.mark.parametrize("damage", CRAFTED)
def test_a_crafted_entry_is_a_miss_answered_cold(tiny_model, tmp_path, caplog, damage):
    model, tokenizer = tiny_model
    prompt = fill(tiny_model, tmp_path)
    (entry,) = tmp_path.glob("*/*.safetensors")
    craft(entry, CRAFTED[damage])
    with caplog.at_level(logging.WARNING, "mlx_mistral.disk_cache"):
        disk = disk_cache(tmp_path)
        generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30, disk=disk))
        tokens, cached = run(generator, prompt)
        assert cached == 0
        assert tokens == run(BatchGenerator(model, tokenizer), prompt)[0]
        # The engine goes on: the next request is served too (from the entry it wrote now).
        assert run(generator, prompt)[1] > 0
    assert f"ignoring prompt-cache file {entry}" in caplog.text
    assert caplog.text.count(str(entry)) == 1  # logged once, then removed
    disk.close()


@pytest.mark.slow
def test_a_crafted_entry_leaves_the_server_alive(tiny_hf_checkpoint, tmp_path):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello?"}]
    flags = ("--prompt-cache-dir", str(tmp_path))
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        _, cold_text = usage(server, messages)
    (entry,) = tmp_path.glob("*/*.safetensors")
    craft(entry, extra_head)
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        cached = []
        for _ in range(2):  # cold, then from the entry the first one left in memory
            answer_usage, text = usage(server, messages)
            cached.append(answer_usage["prompt_tokens_details"]["cached_tokens"])
            assert text == cold_text
        assert httpx.get(server.url("/health"), timeout=30).status_code == 200
        assert "ignoring prompt-cache file" in server.log()
    assert cached[0] == 0 and cached[1] > 0


def test_junk_in_the_folder_is_skipped(tiny_model, tmp_path, caplog):
    model, tokenizer = tiny_model
    prompt = fill(tiny_model, tmp_path)
    (model_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    headers = {"[]": b"[]", "metadata list": b'{"__metadata__": [1]}', "offsets": b'{"a": 1}'}
    for i, header in enumerate(headers.values()):
        name = f"{300 + i}-{'ab' * 16}.safetensors"
        (model_dir / name).write_bytes(len(header).to_bytes(8, "little") + header)
    (model_dir / "x.safetensors").mkdir()
    (model_dir / f"7-{'cd' * 16}.safetensors").mkdir()
    fifo = model_dir / f"8-{'ef' * 16}.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block for ever
    with caplog.at_level(logging.WARNING, "mlx_mistral.disk_cache"):
        disk = disk_cache(tmp_path)
    assert len(disk) == 1 and fifo.exists()
    assert "x.safetensors (not a file the cache wrote)" in caplog.text
    assert caplog.text.count("is not a JSON object") == 1
    assert "__metadata__ is not an object of strings" in caplog.text
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30, disk=disk))
    assert run(generator, prompt)[1] > 0
    disk.close()


@pytest.mark.slow
def test_the_server_starts_over_junk(tiny_hf_checkpoint, tmp_path):
    flags = ("--prompt-cache-dir", str(tmp_path))
    with ServerProcess(tiny_hf_checkpoint, *flags):
        pass
    (model_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    header = b'{"__metadata__": [1]}'
    (model_dir / f"300-{'ab' * 16}.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header
    )
    (model_dir / "x.safetensors").mkdir()
    os.mkfifo(model_dir / f"8-{'ef' * 16}.safetensors")
    with ServerProcess(tiny_hf_checkpoint, *flags) as server:
        usage(server, [{"role": "user", "content": "Hi"}])
        assert "ignoring" in server.log()


def test_checkpoints_differing_only_in_values_share_nothing(tiny_hf_checkpoint, tmp_path):
    other = write_hf_checkpoint(tmp_path / "fine-tune", seed=1)
    assert (other / "config.json").read_bytes() == (tiny_hf_checkpoint / "config.json").read_bytes()
    for name in ("config.json", "model.safetensors"):
        times = (tiny_hf_checkpoint / name).stat()
        os.utime(other / name, ns=(times.st_atime_ns, times.st_mtime_ns))  # as `cp -p` keeps
    assert (other / "model.safetensors").stat().st_size == (
        tiny_hf_checkpoint / "model.safetensors"
    ).stat().st_size
    assert model_identity(other) != model_identity(tiny_hf_checkpoint)
    same = shutil.copytree(tiny_hf_checkpoint, tmp_path / "copy")
    os.utime(same / "model.safetensors")  # touched: still the same weights
    assert model_identity(same) == model_identity(tiny_hf_checkpoint)
    # Entries made for one are not seen by the other.
    root = tmp_path / "cache"
    a, b = (
        DiskPrefixCache(DiskCacheSettings(root, model_identity(ckpt)), LAYOUT)
        for ckpt in (tiny_hf_checkpoint, other)
    )
    assert a.dir != b.dir
    a.close()
    b.close()


def test_weights_changed_while_unloaded_get_their_own_entries(tmp_path):
    import mlx_mistral
    from mlx_mistral.engine import EngineConfig
    from mlx_mistral.lifecycle import ModelSlot

    checkpoint = write_hf_checkpoint(tmp_path / "model", seed=0)
    settings = DiskCacheSettings(
        tmp_path / "cache", model_identity(checkpoint), model_path=checkpoint
    )
    slot = ModelSlot(lambda: mlx_mistral.load(checkpoint), EngineConfig(prompt_cache=settings))
    slot.load()
    disk = slot.generator.prefix_cache.disk
    prompt = chat(slot.tokenizer, "Hello?")
    run(slot.generator, prompt)
    disk.flush()
    first_dir = disk.dir
    slot.unload()
    # Replaced in place by a fine-tune of the same shape, with the old files' times.
    times = {p.name: p.stat() for p in checkpoint.iterdir()}
    shutil.rmtree(checkpoint)
    write_hf_checkpoint(checkpoint, seed=1)
    for name, stat in times.items():
        os.utime(checkpoint / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    slot.load()
    assert disk.dir != first_dir and len(disk) == 0
    assert run(slot.generator, prompt)[1] == 0  # prefilled with the new weights
    disk.close()
