"""Random Mistral-shaped checkpoints for benchmarks, written directly with safetensors (fast).

Float32 by default; with `bits` each Linear and Embedding weight is quantized as it is drawn,
through the converter's own `transform` (mlx-lm's layout), so a 7B-shaped 4-bit checkpoint never
holds its float weights at once (one matrix at a time: at most 32000 x 4096 floats, 0.5 GiB).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # ~150M parameters, Mistral's proportions (GQA 4:1, SwiGLU 4x).
    "150m": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),
    # Mistral-7B-v0.2's dimensions; a CPU decodes a few of its 32 layers (pass `layers`).
    "7b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
}


def tokenizer_model() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_random_checkpoint(
    out: Path, shape: str, *, seed: int = 0, layers: int | None = None, bits: int | None = None
) -> Path:
    """An HF-format Mistral checkpoint with random weights and the real v0.2 tokenizer.

    Args:
        out: the directory to write; returned as it is when it already holds a checkpoint.
        shape: a key of SHAPES.
        seed: the weights' random seed.
        layers: the number of decoder layers (default: the shape's).
        bits: quantize Linear and Embedding weights to this many bits (group size 64, float32
            scales and biases: float16 ones are ~40x slower on an x86 CPU); None: float32.
    """
    if (out / "config.json").is_file():
        return out
    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=4096,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        torch_dtype="float32",
        **dims,
    )
    quant = None
    if bits is not None:
        from mlx_mistral.convert.quantize import QuantConfig

        quant = QuantConfig(bits=bits, group_size=64)
        config["quantization"] = config["quantization_config"] = quant.config_block()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(_random_tensors(config, np.random.default_rng(seed), quant))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer_model(), tmp / "tokenizer.model")
    tmp.rename(out)
    return out


def _tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's name and shape, in the order their random values are drawn (kept as the
    first float checkpoints drew them, so a rewritten checkpoint has the same weights)."""
    D, F, H, K, d, V = (
        config[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        )
    )
    shapes = [("model.embed_tokens.weight", (V, D)), ("lm_head.weight", (V, D))]
    shapes.append(("model.norm.weight", (D,)))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (H * d, D)),
            (p + "self_attn.k_proj.weight", (K * d, D)),
            (p + "self_attn.v_proj.weight", (K * d, D)),
            (p + "self_attn.o_proj.weight", (D, H * d)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
            (p + "input_layernorm.weight", (D,)),
            (p + "post_attention_layernorm.weight", (D,)),
        ]
    return shapes


def _random_tensors(config: dict, rng: np.random.Generator, quant):
    """(name, numpy array) for every tensor of `config`'s model, quantized one by one when
    `quant` is given; norms are ones, the matrices N(0, 0.02)."""
    import mlx.core as mx

    from mlx_mistral.convert.quantize import transform
    from mlx_mistral.convert.weight_map import TensorSpec

    for name, shape in _tensor_shapes(config):
        if len(shape) == 1:  # a norm
            yield name, np.ones(shape, np.float32)
            continue
        weight = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if quant is None:
            yield name, weight
            continue
        spec = TensorSpec(name, shape, quantizable=True)
        for out_name, array in transform(spec, mx.array(weight), mx.float32, quant):
            mx.eval(array)
            yield out_name, np.array(array)
