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
import sys
import types
from typing import TYPE_CHECKING, Any

from . import _blas

_blas.preload()  # before anything imports mlx.core (see _blas for why)

if TYPE_CHECKING:
    from .demo import demo_model_path
    from .engine import Engine, EngineConfig
    from .generate import GenerationChunk, batch_generate, generate, stream_generate
    from .loader import load
    from .sampling.params import SamplingParams

__version__ = "0.1.0"

# The public names, imported on first use: a light module (the tool-call parser, the chat
# format) can be imported without loading MLX and the engine.
_HOMES = {
    "Engine": ".engine",
    "EngineConfig": ".engine",
    "GenerationChunk": ".generate",
    "SamplingParams": ".sampling.params",
    "batch_generate": ".generate",
    "demo_model_path": ".demo",
    "generate": ".generate",
    "load": ".loader",
    "stream_generate": ".generate",
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


class _PublicNames(types.ModuleType):
    """Loading the submodule `generate` sets the package attribute of that name to the module;
    `mlx_mistral.generate` must stay the function (as it was when the package imported eagerly),
    whichever of the module's names was used first. The module stays in sys.modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicNames
