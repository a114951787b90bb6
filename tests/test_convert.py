"""The converter: exact float round trips, mlx-lm's format byte for byte, logits through mlx-lm
and our loader, quantization error bounds, peak memory, refusals, and nothing left on failure."""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import mlx_mistral
from mlx_mistral.config import ModelArgs
from mlx_mistral.convert import convert, expected_tensors
from mlx_mistral.convert.cli import parse_size
from mlx_mistral.convert.source import read_header
from tests.checkpoints import MISTRAL_TOKENIZER, write_hf_checkpoint

TOKENS = mx.array([[1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28734, 28723, 13, 2, 733, 16289,
                    28793, 32, 100, 2000, 31999, 5]])  # fmt: skip
ROPE_THETA = 1e6  # TINY_CONFIG's; transformers 5 writes it only inside rope_parameters


def set_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def read_tensors(path: Path) -> dict[str, mx.array]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, mx.array] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(path / name)))
    return out


def run_cli(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlx_mistral.convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn,
                          check=False)  # fmt: skip


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def mlx_lm_logits(path: Path, *, upcast: bool = False, **model_config) -> mx.array:
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    model, _ = load_model(path, model_config=model_config or None)
    if upcast:  # a half-precision source, compared with a float32 output of it
        model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    return model(TOKENS).astype(mx.float32)


def rel_rms(a: mx.array, ref: mx.array) -> float:
    return (mx.sqrt(((a - ref) ** 2).mean()) / mx.sqrt((ref**2).mean())).item()


@pytest.fixture(scope="module")
def hf_f32(tmp_path_factory) -> Path:
    """One float32 file; config with a top-level rope_theta, as v0.2's own config.json has."""
    path = write_hf_checkpoint(tmp_path_factory.mktemp("hf-f32"), seed=3)
    set_config(path, rope_theta=ROPE_THETA)
    return path


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory) -> Path:
    """bfloat16 in several shards, config exactly as transformers 5 writes it."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf-bf16"), seed=4, dtype="bfloat16",
                               max_shard_size="100KB")  # fmt: skip


@pytest.fixture(scope="module")
def hf_f16(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf-f16"), seed=5, dtype="float16")


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """convert(source fixture, **options), each combination done once per module."""
    done: dict[tuple, Path] = {}

    def get(source: str, **options) -> Path:
        key = (source, *sorted(options.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("out") / "model"
            done[key] = convert(request.getfixturevalue(source), out, progress=False, **options)
        return done[key]

    return get


def test_weight_map_describes_mistral_7b_v02():
    args = ModelArgs(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)  # fmt: skip
    specs = {s.name: s for s in expected_tensors(args)}
    assert len(specs) == 1 + 32 * 9 + 2
    assert specs["model.layers.31.self_attn.k_proj.weight"].shape == (1024, 4096)
    assert specs["model.layers.0.mlp.down_proj.weight"].shape == (4096, 14336)
    assert sum(np.prod(s.shape) for s in specs.values()) == 7_241_732_096  # "7B"
    assert not specs["model.norm.weight"].quantizable and specs["lm_head.weight"].quantizable


@pytest.mark.parametrize("source,dtype", [("hf_f32", "float32"), ("hf_f32", "float16"),
                                          ("hf_bf16", "bfloat16"), ("hf_bf16", "float32"),
                                          ("hf_f16", "bfloat16")])  # fmt: skip
def test_float_conversion_round_trips_every_tensor(request, converted, source, dtype):
    src = request.getfixturevalue(source)
    ours = read_tensors(converted(source, dtype=dtype))
    theirs = {}
    for file in src.glob("model*.safetensors"):
        theirs.update(mx.load(str(file)))
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == getattr(mx, dtype), name
        assert mx.array_equal(ours[name], tensor.astype(getattr(mx, dtype))).item(), name


def test_shards_and_index(hf_f32, tmp_path):
    limit = 100_000  # the 8.2 MB embedding and head get a shard each; 300 KB of layers fill 3+
    out = convert(hf_f32, tmp_path / "m", dtype="float32", max_shard_bytes=limit, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    sizes, firsts, total = [], [], 0
    for name in files:
        with safe_open(out / name, framework="numpy") as f:  # the reference reader accepts ours
            assert f.metadata() == {"format": "mlx"}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        assert all(index["weight_map"][k] == name for k in arrays)
        in_file_order = sorted(read_header(out / name).items(), key=lambda kv: kv[1][2])
        nbytes = [arrays[k].nbytes for k, _ in in_file_order]
        assert sum(nbytes) <= limit or len(nbytes) == 1
        sizes.append(sum(nbytes))
        firsts.append(nbytes[0])
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total
    # Greedy packing: no shard could have taken the next one's first tensor.
    assert all(s + f > limit for s, f in zip(sizes, firsts[1:]))
    assert len(files) >= 5
    single = convert(hf_f32, tmp_path / "one", progress=False)
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]


def test_output_config_and_tokenizer_files(hf_bf16, converted):
    source = json.loads((hf_bf16 / "config.json").read_text())
    assert "rope_theta" not in source  # the transformers-5 layout this test is about
    out = converted("hf_bf16", dtype="float16", quantize=True, bits=4, group_size=64)
    config = json.loads((out / "config.json").read_text())
    block = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization"] == config["quantization_config"] == block
    assert config["rope_theta"] == ROPE_THETA and config["tie_word_embeddings"] is False
    assert config["dtype"] == "float16"
    assert {k: v for k, v in config.items() if k in source and k != "dtype"} == {
        k: v for k, v in source.items() if k != "dtype"
    }
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_bf16 / name).read_bytes()
    float_config = json.loads((converted("hf_bf16", dtype="float32") / "config.json").read_text())
    assert "quantization" not in float_config and "quantization_config" not in float_config


QUANT_CASES = [("float16", 4, 64), ("float16", 8, 64), ("bfloat16", 4, 128), ("float32", 8, 32)]


@pytest.mark.parametrize("dtype,bits,group_size", QUANT_CASES)
def test_quantized_output_is_identical_to_mlx_lm_convert(hf_f32, converted, tmp_path, capsys,
                                                         dtype, bits, group_size):  # fmt: skip
    from mlx_lm.convert import convert as mlx_lm_convert

    ours = converted("hf_f32", dtype=dtype, quantize=True, bits=bits, group_size=group_size)
    mlx_lm_convert(str(hf_f32), str(tmp_path / "ref"), quantize=True, q_bits=bits,
                   q_group_size=group_size, dtype=dtype)  # fmt: skip
    a, b = read_tensors(ours), read_tensors(tmp_path / "ref")
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert mx.array_equal(a[name], b[name]).item(), name
    # group 128 leaves the 64-wide projections in float, as mlx-lm does: mixed checkpoints exist.
    assert ("model.layers.0.self_attn.q_proj.scales" in a) == (group_size <= 64)
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization"] == ref_config["quantization"]
    assert config["quantization_config"] == ref_config["quantization_config"]


def test_mlx_lm_reads_float_output_with_identical_logits(hf_f32, hf_bf16, converted):
    ref = mlx_lm_logits(hf_f32)
    assert mx.array_equal(mlx_lm_logits(converted("hf_f32", dtype="float32")), ref).item()
    # transformers-5 source: mlx-lm needs the rope_theta our output config puts on top.
    ours = mlx_lm_logits(converted("hf_bf16", dtype="float32"))
    oracle = mlx_lm_logits(hf_bf16, upcast=True, rope_theta=ROPE_THETA)
    assert mx.abs(ours - oracle).max().item() <= 1e-6
    misread = mlx_lm_logits(hf_bf16, upcast=True)  # mlx-lm alone falls back to theta 10000
    assert mx.abs(misread - oracle).max().item() > 1e-3


# Measured on the tiny random model (seed 3): relative RMS logit error vs the float model is
# 0.0096 at 8 bits and 0.156 at 4 bits (random N(0, 0.02) weights quantize worse than trained
# ones); bounds carry 2x margin, and 8 bits must be at least 8x closer (measured 16x).
BOUND_8BIT, BOUND_4BIT = 0.02, 0.30


def test_quantized_logits_stay_within_bounds_of_float(hf_f32, converted):
    ref = mlx_lm_logits(hf_f32)
    err = {
        bits: rel_rms(
            mlx_lm_logits(converted("hf_f32", dtype="float32", quantize=True, bits=bits)), ref
        )
        for bits in (4, 8)
    }
    assert err[8] < BOUND_8BIT and err[4] < BOUND_4BIT
    assert err[8] * 8 < err[4]
    assert err[8] > 0  # the quantization actually happened


@pytest.mark.parametrize(
    "options",
    [{}, {"quantize": True, "bits": 4}, {"quantize": True, "bits": 8}],
    ids=["float", "4bit", "8bit"],
)
def test_our_loader_matches_mlx_lm_on_converted_output(converted, options):
    out = converted("hf_f32", dtype="float32", **options)
    model, _tokenizer = mlx_mistral.load(out, dtype="float32")
    diff = mx.abs(model(TOKENS).astype(mx.float32) - mlx_lm_logits(out)).max().item()
    assert diff <= 1e-4


def test_tied_embeddings_have_no_lm_head(tmp_path):
    src = write_hf_checkpoint(tmp_path / "tied", seed=6, tie_word_embeddings=True)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert not any(name.startswith("lm_head") for name in read_tensors(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    oracle = mlx_lm_logits(src, rope_theta=ROPE_THETA)
    assert mx.abs(mlx_lm_logits(out) - oracle).max().item() <= 1e-6


def test_progress_bar_on_stderr_only_when_asked(hf_f32, tmp_path, capfd):
    convert(hf_f32, tmp_path / "quiet", progress=False)
    assert capfd.readouterr().err == ""
    convert(hf_f32, tmp_path / "loud")
    assert "21/21" in capfd.readouterr().err


def test_cli_success_prints_one_summary_line(hf_f32, tmp_path):
    result = run_cli(hf_f32, "--out", tmp_path / "m", "-q", "--bits", "8", "--no-progress")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"wrote {tmp_path / 'm'} (8-bit, group size 64")


# ---- refusals: one line on stderr, exit 1, nothing written -----------------------------------


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _bad_source(kind: str, hf_f32: Path, tmp: Path) -> Path:
    src = _copy(hf_f32, tmp / "src")
    if kind == "gpt2":
        set_config(src, model_type="gpt2")
    elif kind == "missing":
        _edit_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif kind == "unknown":
        _edit_tensors(
            src,
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
        )
    elif kind == "misshapen":
        _edit_tensors(src, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    elif kind == "no-tokenizer":
        (src / "tokenizer.model").unlink()
    elif kind == "quantized":
        set_config(src, quantization={"group_size": 64, "bits": 4})
    elif kind == "truncated":
        with open(src / "model.safetensors", "r+b") as f:
            f.truncate((src / "model.safetensors").stat().st_size - 100)
    elif kind == "bin-only":
        (src / "model.safetensors").rename(src / "pytorch_model.bin")
    return src


REFUSALS = {
    "gpt2": ([], "not a Mistral/Llama-architecture checkpoint"),
    "missing": ([], "missing 1 tensor(s) the config requires: model.layers.1.mlp.up_proj.weight"),
    "unknown": ([], "model.layers.0.self_attn.q_proj.bias"),
    "misshapen": ([], "tensor model.norm.weight has shape [65], but the config implies [64]"),
    "no-tokenizer": ([], "has no tokenizer.model"),
    "quantized": ([], "already quantized"),
    "truncated": ([], "is truncated"),
    "bin-only": ([], "no model*.safetensors weights"),
    "bits": (["-q", "--bits", "7"], "bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
    "group": (["-q", "--group-size", "16"], "group size must be one of 32, 64, 128, got 16"),
    "dtype": (["--dtype", "int8"], "dtype 'int8' is not supported"),
    "bits-without-q": (["--bits", "8"], "only with -q/--quantize"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusal_is_one_line_and_leaves_nothing(hf_f32, tmp_path, kind):
    extra, message = REFUSALS[kind]
    src = _bad_source(kind, hf_f32, tmp_path)
    out = tmp_path / "out"
    result = run_cli(src, "--out", out, *extra)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_refusals_about_the_output_and_the_source_path(hf_f32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = run_cli(hf_f32, "--out", out)
    assert result.returncode == 1 and "already exists (pass --force" in result.stderr
    result = run_cli(hf_f32, "--out", hf_f32, "--force")
    assert result.returncode == 1 and "would overwrite the source" in result.stderr
    result = run_cli(tmp_path / "nowhere", "--out", tmp_path / "x")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert (out / "keep").read_text() == "x" and leftovers(tmp_path) == []
    src = _copy(hf_f32, tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    for inside in (src / "mlx", src / "a" / "b"):
        result = run_cli(src, "--out", inside, "--no-progress")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"output {inside} is inside the source checkpoint {src}" in result.stderr
    assert sorted(p.name for p in src.iterdir()) == before
    assert run_cli(hf_f32).returncode == 2  # usage: --out is required
    assert run_cli(hf_f32, "--out", tmp_path / "y", "--max-shard-size", "5XB").returncode == 2


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_force_replaces_only_a_finished_output(hf_f32, tmp_path):
    out = tmp_path / "out"
    # An earlier conversion in several shards: the names a one-shard output must not keep.
    earlier = run_cli(hf_f32, "--out", out, "--max-shard-size", "100KB", "--no-progress")
    assert earlier.returncode == 0
    before = _snapshot(out)
    old_shard = shards_in(out)[0]
    assert old_shard.startswith("model-00001-of-")
    # The file-size limit makes writing fail after most tensors (a full disk, reproducibly).
    fsize = 12 * 2**20

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    failed = run_cli(hf_f32, "--out", out, "--dtype", "float32", "--force", preexec_fn=limit)
    assert failed.returncode == 1 and "File too large" in failed.stderr.splitlines()[-1]
    assert "Converting" in failed.stderr  # it failed mid-way, not in a check up front
    assert _snapshot(out) == before and leftovers(tmp_path) == []
    result = run_cli(hf_f32, "--out", out, "--force", "--no-progress")
    assert result.returncode == 0
    assert not (out / old_shard).exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def _earlier_output_and(extra: str):
    def make(out: Path, hf_f32: Path) -> None:
        convert(hf_f32, out, force=True, progress=False)  # over the empty DIR
        (out / extra).write_text("mine")

    return make


def _files(**files: str):
    def make(out: Path, hf_f32: Path) -> None:
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)

    return make


FOREIGN_OUTPUTS = {  # what --force finds in DIR -> what the refusal names
    "thesis": (_files(**{"thesis.txt": "years", "sub/notes.txt": "more"}), "holds sub/notes.txt"),
    "earlier-plus-notes": (_earlier_output_and("notes.txt"), "holds notes.txt"),
    "earlier-plus-dotfile": (_earlier_output_and(".keep"), "holds .keep"),
    "transformers-weights": (lambda out, hf: shutil.copytree(hf, out, dirs_exist_ok=True),
                             "holds model.safetensors"),
    "tokenizer-only": (_files(**{"tokenizer.model": "x"}), "has no config.json"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(FOREIGN_OUTPUTS))
def test_force_refuses_to_replace_what_no_conversion_wrote(hf_f32, tmp_path, kind):
    make, message = FOREIGN_OUTPUTS[kind]
    out = tmp_path / "out"
    out.mkdir()
    make(out, hf_f32)
    before = _snapshot(out)
    result = run_cli(hf_f32, "--out", out, "--force", "--no-progress")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert _snapshot(out) == before and leftovers(tmp_path) == []


# ---- interrupted and concurrent conversions: the converter pauses between shards on a FIFO ---

PAUSE_FIFO_ENV = "MLX_MISTRAL_CONVERT_PAUSE_FIFO"


@pytest.fixture
def paused(hf_f32, tmp_path):
    """start_paused on the tiny checkpoint; a converter a failed test left waiting is killed."""
    started: list[subprocess.Popen] = []

    def start(out: Path, fifo: Path) -> tuple[subprocess.Popen, int]:
        return start_paused(hf_f32, out, fifo, started)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sigint_as_from_a_terminal() -> None:
    """Give the converter SIGINT's default disposition, as a shell in a terminal does.

    A job a non-interactive shell starts in the background (`pytest &` in a CI script) inherits
    SIGINT ignored, and Python then leaves it ignored, as every Unix program should (nohup relies
    on it): the converter would shrug off the test's Ctrl-C, convert its next shard and wait on
    the FIFO forever. Measured: both SIGINT tests time out that way, with or without load.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_paused(
    src: Path, out: Path, fifo: Path, started: list[subprocess.Popen]
) -> tuple[subprocess.Popen, int]:
    """Start a conversion in small shards and wait until it blocks after its first shard.

    Returns:
        The process, and the FIFO's write end: closing it lets the converter go on.
    """
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "mlx_mistral.convert", src, "--out", out,
           "--max-shard-size", "100KB", "--no-progress"]  # fmt: skip
    env = {**os.environ, PAUSE_FIFO_ENV: str(fifo)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_sigint_as_from_a_terminal)  # fmt: skip
    started.append(proc)
    # Waiting for a state, not racing: the converter stays blocked until the FIFO is closed.
    deadline = time.monotonic() + 120
    while True:
        try:
            # Succeeds only once the converter has the FIFO open for reading.
            return proc, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"the converter never paused between shards ({proc.returncode}): {stderr}")
        time.sleep(0.01)


def temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(".out.tmp-*"))


def shards_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("name,code,word", [("SIGINT", 130, "interrupted"),
                                            ("SIGTERM", 143, "terminated")])  # fmt: skip
def test_interrupt_mid_way_leaves_nothing(paused, tmp_path, name, code, word):
    out = tmp_path / "out"
    proc, fifo = paused(out, tmp_path / "pause")
    [tmp] = temporaries(tmp_path)
    [shard] = shards_in(tmp)  # truly mid-way: one shard of several written
    assert shard.startswith("model-00001-of-") and shard != "model-00001-of-00001.safetensors"
    proc.send_signal(getattr(signal, name))
    os.close(fifo)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"error: {word}; no output was written"
    assert not out.exists() and leftovers(tmp_path) == []


def test_stale_temporary_of_a_dead_conversion_is_removed(paused, hf_f32, tmp_path):
    out = tmp_path / "out"
    proc, fifo = paused(out, tmp_path / "pause")
    proc.kill()  # SIGKILL: no clean-up can run
    proc.wait()
    os.close(fifo)
    [stale] = temporaries(tmp_path)
    assert shards_in(stale) and stale.name.startswith(f".out.tmp-{proc.pid}-")
    result = run_cli(hf_f32, "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"removed {stale}, left by process {proc.pid}" in result.stderr
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_temporary_of_a_live_conversion_is_kept(paused, hf_f32, tmp_path):
    out = tmp_path / "out"
    proc, fifo = paused(out, tmp_path / "pause")
    [live] = temporaries(tmp_path)
    written = _snapshot(live)
    other = run_cli(hf_f32, "--out", out, "--no-progress")  # a second conversion meanwhile
    assert other.returncode == 0 and other.stderr == ""
    assert temporaries(tmp_path) == [live] and _snapshot(live) == written
    proc.send_signal(signal.SIGINT)
    os.close(fifo)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5 MB") == 1_500_000 and parse_size("1024") == 1024
    for bad in ("", "0", "5XB", "-1GB"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


# ---- a checkpoint big enough to measure: ~200 MB float32 in 5 shards, written with numpy -------

BIG_CONFIG = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 4096,
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "rope_theta": ROPE_THETA, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    """Like 7B's proportions (no tensor over 2% of the file); random float32, sharded at 48 MB."""
    out = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    shards: list[dict[str, np.ndarray]] = [{}]
    for spec in expected_tensors(ModelArgs.from_dict(BIG_CONFIG)):
        if sum(a.nbytes for a in shards[-1].values()) + np.prod(spec.shape) * 4 > 48 * 2**20:
            shards.append({})
        shards[-1][spec.name] = rng.standard_normal(spec.shape, dtype=np.float32) * 0.02
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(BIG_CONFIG))
    shutil.copy(MISTRAL_TOKENIZER, out / "tokenizer.model")
    return out


# VmHWM, not ru_maxrss: a child's ru_maxrss keeps the high-water mark of the process it was
# forked from (here pytest, which just held the whole checkpoint), even across exec.
RSS_CHILD = """
import json, sys
from mlx_mistral.convert import convert
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
base = status("VmRSS")
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3] == "q", max_shard_bytes=40 * 2**20,
        progress=False)
print(json.dumps({"growth": status("VmHWM") - base}))
"""
# Measured here: peak RSS grows by 14-16 MB (0.07-0.08x) converting the 200 MB checkpoint to
# float16 or 4-bit. Holding one 40 MB output shard, let alone the model, would break the bound.
RSS_FRACTION = 0.15


@pytest.mark.parametrize("mode", ["float16", "q4"])
def test_peak_memory_is_a_small_fraction_of_the_checkpoint(big_checkpoint, tmp_path, mode):
    size = sum(p.stat().st_size for p in big_checkpoint.glob("*.safetensors"))
    assert size > 190 * 2**20 and len(list(big_checkpoint.glob("*.safetensors"))) >= 4
    cmd = [sys.executable, "-c", RSS_CHILD, big_checkpoint, tmp_path / "out", mode]
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    growth = json.loads(child.stdout)["growth"]
    assert growth < RSS_FRACTION * size, f"peak RSS grew {growth / 2**20:.1f} MiB"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 2
