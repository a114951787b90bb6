"""mlx-mistral: Mistral-7B-Instruct-v0.2 on your own machine, on MLX.

Example:
    >>> import mlx_mistral
    >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
    >>> greedy = mlx_mistral.SamplingParams(max_tokens=16, temperature=0)
    >>> text = mlx_mistral.generate(model, tokenizer, [{"role": "user", "content": "Hello!"}],
    ...                             params=greedy)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _blas

_blas.preload()  # before anything imports mlx.core (see _blas for why)

if TYPE_CHECKING:
    from .demo import demo_model_path
    from .engine import Engine, EngineConfig
    from .generation import GenerationChunk, batch_generate, generate, stream_generate
    from .loader import load
    from .sampling.params import SamplingParams

__version__ = "0.1.0"

# The public names, imported on first use: a light module (the tool-call parser, the chat
# format) can be imported without loading MLX and the engine.
_HOMES = {
    "Engine": ".engine",
    "EngineConfig": ".engine",
    "GenerationChunk": ".generation",
    "SamplingParams": ".sampling.params",
    "batch_generate": ".generation",
    "demo_model_path": ".demo",
    "generate": ".generation",
    "load": ".loader",
    "stream_generate": ".generation",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationChunk",
    "SamplingParams",
    "batch_generate",
    "demo_model_path",
    "generate",
    "load",
    "stream_generate",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
