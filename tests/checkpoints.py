"""Tiny real checkpoints for the tests, written by transformers (never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mistral_common

# The real Mistral-7B-v0.2 SentencePiece model, shipped inside mistral-common.
MISTRAL_TOKENIZER = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"

TINY_CONFIG = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=False,
)


def write_hf_checkpoint(
    out: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Write a random-weight MistralForCausalLM with the real tokenizer, as transformers saves
    it."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).eval()
    # Random init leaves norms at 1: perturb them so a bug that skips a norm weight shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    shutil.copy(MISTRAL_TOKENIZER, out / "tokenizer.model")
    return out
