"""Checkpoints written by mlx-lm load here and give mlx-lm's logits (and ours load in mlx-lm:
see test_convert.py)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_mistral

TOKENS = mx.array([[1, 733, 16289, 28793, 22557, 28808, 733, 28748, 16289, 28793]])


@pytest.fixture(scope="module")
def mlx_lm_source(tiny_hf_checkpoint, tmp_path_factory):
    """The tiny HF checkpoint with rope_theta also at the top level (mlx-lm 0.32 reads only
    there)."""
    import shutil

    src = tmp_path_factory.mktemp("interop") / "src"
    shutil.copytree(tiny_hf_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 1e6)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("quantize", [None, 4, 8, "mixed_3_6"])
def test_mlx_lm_converted_checkpoint_loads_with_mlx_lm_logits(mlx_lm_source, tmp_path, quantize):
    """Float, 4- and 8-bit, and a mixed-precision recipe (per-layer bits in config.json)."""
    from mlx_lm.convert import convert as mlx_lm_convert
    from mlx_lm.utils import load_model

    out = tmp_path / "mlx-lm-out"
    kwargs = (
        dict(quantize=True, q_bits=quantize, q_group_size=64) if isinstance(quantize, int) else {}
    )
    if isinstance(quantize, str):
        kwargs = dict(quantize=True, q_group_size=64, quant_predicate=quantize)
    mlx_lm_convert(str(mlx_lm_source), str(out), dtype="float32", **kwargs)
    if isinstance(quantize, str):  # the recipe names some layers with other bits than the default
        block = json.loads((out / "config.json").read_text())["quantization"]
        assert any(isinstance(v, dict) for v in block.values())
    reference, _ = load_model(out)
    model, tokenizer = mlx_mistral.load(out, dtype="float32")
    ours = model(TOKENS)
    theirs = reference(TOKENS).astype(mx.float32)
    assert mx.abs(ours - theirs).max().item() < 1e-4
    assert mx.array_equal(mx.argmax(ours, -1), mx.argmax(theirs, -1)).item()
    text = mlx_mistral.generate(
        model,
        tokenizer,
        [{"role": "user", "content": "Hello!"}],
        params=mlx_mistral.SamplingParams(max_tokens=8, temperature=0),
    )
    assert isinstance(text, str)


def test_tokenizer_json_with_another_vocabulary_is_refused(tmp_path):
    from mlx_mistral.errors import ModelLoadError
    from mlx_mistral.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"<unk>": 0, "a": 1}}}))
    with pytest.raises(ModelLoadError, match="no tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
