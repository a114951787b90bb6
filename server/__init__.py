"""The OpenAI-compatible HTTP server (installed as `mlx_mistral.server`).

`create_app(ServerConfig(...))` builds the Starlette app; `mlx-mistral serve` (see `cli`) runs it
under uvicorn. Endpoints: POST /v1/chat/completions (also /v1/openai/chat/completions),
POST /v1/completions, GET /v1/models, GET /health.
"""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
