"""mlx-mistral: Mistral-7B-Instruct-v0.2 on your own machine, on MLX.

Example:
    >>> import mlx_mistral
    >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
    >>> greedy = mlx_mistral.SamplingParams(max_tokens=16, temperature=0)
    >>> text = mlx_mistral.generate(model, tokenizer, [{"role": "user", "content": "Hello!"}],
    ...                             params=greedy)
"""

from . import _blas

_blas.preload()  # before anything imports mlx.core (see _blas for why)

from .demo import demo_model_path
from .engine import Engine, EngineConfig
from .generate import GenerationChunk, batch_generate, generate, stream_generate
from .loader import load
from .sampling.params import SamplingParams

__version__ = "0.1.0"

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
