"""The file layout of a Hugging Face safetensors checkpoint, shared by the loader and the converter.

Pure Python (no MLX): the hub download patterns, the demo-model check and the converter's header
reader find a checkpoint's files without loading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that carry no weights (RoPE frequencies are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def safetensors_files(root: Path, *, hf_names_only: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory: the shards its index lists, else its
    model*.safetensors.

    Args:
        root: the checkpoint directory.
        hf_names_only: without an index, never fall back to other *.safetensors files. The
            loader falls back (a single-file export may name its file anything); the converter
            does not (Mistral's consolidated.safetensors holds the weights under other names).

    Raises:
        ModelLoadError: a malformed index, a shard it lists that is missing, or no weights.
    """
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc})") from None
        for name in names:
            if not (root / name).is_file():
                raise ModelLoadError(f"{index.name} lists {name}, which is not in {root}")
        return [root / name for name in names]
    # Prefer HF's model*.safetensors: a repo may also carry consolidated.safetensors (the same
    # weights under Mistral's own tensor names).
    files = sorted(root.glob("model*.safetensors"))
    if not files and not hf_names_only:
        files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    others = sorted(p.name for p in root.glob("*.safetensors")) + sorted(
        p.name for p in root.glob("*.bin")
    )
    hint = (
        f" (found {', '.join(others[:3])}: not Hugging Face model*.safetensors)" if others else ""
    )
    raise ModelLoadError(f"no model*.safetensors weights in {root}{hint}")
