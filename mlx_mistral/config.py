"""The model's hyper-parameters, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("mistral", "llama")


@dataclass(frozen=True)
class ModelArgs:
    """Mistral (and Llama-shaped) architecture, with the HF config names.

    Mistral-7B-Instruct-v0.2: hidden_size 4096, 32 layers, 32 query heads, 8 KV heads, head_dim
    128, rope_theta 1e6, vocab 32000, no sliding window.
    """

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    head_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "mistral"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token costs (keys + values, all layers): 128 KiB for v0.2 in
        float16."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        model_type = config.get("model_type", "mistral")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model_type {model_type!r} is not a Mistral/Llama architecture "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        values = dict(config)
        # transformers 5 nests rope_theta in rope_parameters; v0.2's own config has it on top.
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if "rope_theta" not in values and isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        rope_type = (
            rope.get("rope_type", rope.get("type", "default"))
            if isinstance(rope, dict)
            else "default"
        )
        if rope_type not in ("default", None):
            raise ModelLoadError(
                f"rope type {rope_type!r} is not supported (only the default RoPE)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in names and v is not None})
        except TypeError as exc:
            raise ModelLoadError(f"config.json is missing a required field: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(read_config(path))


def read_config(path: str | Path) -> dict[str, Any]:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"no config.json in {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
