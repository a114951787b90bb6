"""The small demo model shipped inside the package (so a machine with no model hub still works)."""

from __future__ import annotations

from pathlib import Path

from .hub import DEFAULT_REPO, resolve_model_path
from .errors import ModelNotFoundError

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def demo_model_path() -> Path:
    """Directory of the bundled demo checkpoint (a tiny Mistral-architecture model)."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ModelNotFoundError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}")
    return DEMO_MODEL_DIR


def default_model() -> tuple[str, bool]:
    """The model to serve when none is named: Mistral-7B-Instruct-v0.2 when its weights are
    already on this machine (HF cache), otherwise the demo model. Returns (path, is_demo)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(DEFAULT_REPO, local_files_only=True)
        resolve_model_path(path)
        return path, False
    except Exception:
        return str(demo_model_path()), True
