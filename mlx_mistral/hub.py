"""Find a checkpoint: a local directory, or a Hugging Face repo id (local cache or download)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint_files import INDEX_FILE
from .errors import ModelNotFoundError

DEFAULT_REPO = "mistralai/Mistral-7B-Instruct-v0.2"

# What a checkpoint needs; everything else in a repo (pytorch .bin files, consolidated .pth,
# README images) is skipped so a download fetches only what we read.
CHECKPOINT_PATTERNS = [
    "config.json",
    # model*.safetensors, not *.safetensors: some Mistral repos also ship the same weights as
    # consolidated.safetensors (Mistral's own format), which would double the download.
    "model*.safetensors",
    INDEX_FILE,
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_path(path_or_repo: str | os.PathLike[str]) -> Path:
    """Return the local directory of a checkpoint.

    Args:
        path_or_repo: a local directory, or a Hugging Face repo id such as
            "mistralai/Mistral-7B-Instruct-v0.2" (looked up in the local HF cache first;
            downloaded only when HF_HUB_OFFLINE is not set).

    Raises:
        ModelNotFoundError: one sentence naming what was asked for and what to run.
    """
    name = os.fspath(path_or_repo)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} is a directory but has no config.json: not a checkpoint"
            )
        return local
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(
            f"model {name!r} is neither a local directory nor a Hugging Face repo id"
        )

    from huggingface_hub import snapshot_download

    try:
        # Cache first: works offline and never touches the network for a model already here.
        return Path(
            snapshot_download(name, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True)
        )
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it where a network is available with `hf download {name}`, "
            f"or pass a local directory"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one sentence for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"could not get model {name!r} from the Hugging Face hub ({reason}); "
            f"run `hf download {name}` where a network is available, "
            f"or pass a local directory"
        ) from None
