"""Which model to serve when none is named, and the small demo model shipped in the package.

No machine is guaranteed a model hub, and Mistral-7B's weights are 14 GB, so the package carries
a tiny model of the same architecture and tokenizer: a fresh install still answers.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint_files import safetensors_files
from .errors import MistralError, ModelNotFoundError
from .hub import DEFAULT_REPO

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"

# Where `mlx-mistral convert ... --out` puts Mistral-7B by the README's recipe.
CONVERTED_DIR = Path("~/.cache/mlx-mistral").expanduser()
# Hugging Face repos holding Mistral-7B-Instruct-v0.2, best first for this package.
CACHED_REPOS = ("mlx-community/Mistral-7B-Instruct-v0.2-4bit", DEFAULT_REPO)


def demo_model_path() -> Path:
    """Directory of the bundled demo checkpoint (a tiny Mistral-architecture model)."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ModelNotFoundError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}")
    return DEMO_MODEL_DIR


def _complete_checkpoint(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and all(
            f.is_file() for f in safetensors_files(path)
        )
    except MistralError:
        return False


def local_mistral() -> Path | None:
    """Mistral-7B-Instruct-v0.2 weights already on this machine, without touching the network:
    $MLX_MISTRAL_MODEL, a converted copy in ~/.cache/mlx-mistral, or the Hugging Face cache."""
    named = os.environ.get("MLX_MISTRAL_MODEL")
    if named:
        return Path(named).expanduser()
    if CONVERTED_DIR.is_dir():
        for path in sorted(CONVERTED_DIR.glob("Mistral-7B-Instruct-v0.2*")):
            if _complete_checkpoint(path):
                return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in CACHED_REPOS:
        try:
            path = Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not in the cache (or no cache at all)
            continue
        if _complete_checkpoint(path):
            return path
    return None


def default_model() -> tuple[str, bool]:
    """The model to serve when none is named: Mistral-7B-Instruct-v0.2 when its weights are on
    this machine, otherwise the demo model. Returns (path, is_demo)."""
    found = local_mistral()
    if found is not None:
        return str(found), False
    return str(demo_model_path()), True
