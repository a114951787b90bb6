"""Shared fixtures: one tiny checkpoint per kind, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_mistral  # noqa: F401  first, so its optimized-BLAS preload happens before mlx is imported
from tests.checkpoints import MISTRAL_TOKENIZER, write_hf_checkpoint


@pytest.fixture(scope="session")
def mistral_tokenizer_path() -> Path:
    """The real Mistral-7B-v0.2 tokenizer.model (from mistral-common's package data)."""
    return MISTRAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mistral in the HF format (float32 safetensors, real v0.2 tokenizer)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_checkpoint):
    """(model, tokenizer) of `tiny_hf_checkpoint`, loaded once."""
    return mlx_mistral.load(tiny_hf_checkpoint)
