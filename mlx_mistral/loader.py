"""`load()`: a model and its tokenizer from a local path or a Hugging Face repo id."""

from __future__ import annotations

import os

import mlx.core as mx

from .distributed import load_sharded
from .hub import resolve_model_path
from .model import Model
from .tokenizer import Tokenizer
from .weights import load_model


def load(
    path_or_repo: str | os.PathLike[str],
    *,
    dtype: str | mx.Dtype | None = None,
    group: mx.distributed.Group | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a Mistral checkpoint (HF original or mlx-community quantized).

    Args:
        path_or_repo: a local directory, or a repo id looked up in the HF cache (downloaded
            unless HF_HUB_OFFLINE is set).
        dtype: compute dtype ("float16", "bfloat16", "float32"); default float16/bfloat16 on a
            GPU, float32 on the CPU backend.
        group: `mx.distributed.init()` under `mlx.launch`: each rank loads its tensor-parallel
            shard and the model gives the full logits on every rank (called in lockstep).

    Returns:
        (model, tokenizer)

    Raises:
        ModelNotFoundError: the checkpoint cannot be found or fetched (one sentence saying what
            to run).
        ModelLoadError: the checkpoint is not a readable Mistral model.

    Example:
        >>> import mlx_mistral
        >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
        >>> model.args.vocab_size
        32000
    """
    path = resolve_model_path(path_or_repo)
    if group is not None and group.size() > 1:  # tensor parallel: this rank reads its shard
        model = load_sharded(path, group=group, dtype=dtype)
    else:
        model = load_model(path, dtype=dtype)
    return model, Tokenizer.from_dir(path)
