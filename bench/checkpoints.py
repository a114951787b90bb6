"""Random Mistral-shaped checkpoints for benchmarks, written directly with safetensors (fast)."""

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
}


def tokenizer_model() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_random_checkpoint(out: Path, shape: str, *, seed: int = 0) -> Path:
    """A float32 HF-format Mistral checkpoint with random weights and the real v0.2 tokenizer."""
    if (out / "config.json").is_file():
        return out
    dims = SHAPES[shape]
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
    rng = np.random.default_rng(seed)
    D, F, H, K, d = (
        dims[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    )

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": w(32000, D),
        "lm_head.weight": w(32000, D),
        "model.norm.weight": np.ones(D, np.float32),
    }
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": w(H * d, D),
                p + "self_attn.k_proj.weight": w(K * d, D),
                p + "self_attn.v_proj.weight": w(K * d, D),
                p + "self_attn.o_proj.weight": w(D, H * d),
                p + "mlp.gate_proj.weight": w(F, D),
                p + "mlp.up_proj.weight": w(F, D),
                p + "mlp.down_proj.weight": w(D, F),
                p + "input_layernorm.weight": np.ones(D, np.float32),
                p + "post_attention_layernorm.weight": np.ones(D, np.float32),
            }
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer_model(), tmp / "tokenizer.model")
    tmp.rename(out)
    return out
