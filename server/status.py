"""`GET /v1/status`: what the server is doing, as one JSON object (docs/status.md).

Made for people and small apps (the server's own page, a menubar item): the loaded model, its
state and memory, the queue, generated tokens per second over the last minutes, the cache and
speculation figures, and the base URLs to paste into clients. Behind the same Host and API-key
guards as the API.
"""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_mistral.demo import DEMO_MODEL_DIR
from mlx_mistral.errors import EngineDeadError

from .config import ServerConfig
from .handling import ServerState, guarded, state_of

DIALECTS = (
    "OpenAI Chat Completions and Completions (/v1/chat/completions, /v1/completions)",
    "OpenAI Responses (/v1/responses)",
    "Anthropic Messages (/v1/messages)",
    "Ollama (/api/chat, /api/generate)",
)
RECENT_SECONDS = 10  # "tokens per second now": the mean over this many last seconds


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


@functools.cache
def quantization_of(model: str) -> dict[str, Any] | None:
    """The checkpoint's `quantization` entry in config.json ({"bits": 4, "group_size": 64}),
    or None for full-precision weights (or a checkpoint whose config cannot be read)."""
    from mlx_mistral.hub import resolve_model_path

    try:
        config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    except Exception:  # noqa: BLE001 - a status page never fails on it
        return None
    found = config.get("quantization") if isinstance(config, dict) else None
    return found if isinstance(found, dict) else None


def is_demo(config: ServerConfig) -> bool:
    """Serving a bundled demo checkpoint, chosen by default or named with --model."""
    if config.is_demo:
        return True
    try:
        path = Path(config.model).expanduser().resolve()
    except OSError:
        return False
    return path.parent == DEMO_MODEL_DIR.parent.resolve() and path.name.startswith("demo_model")


def _rate(part: int, whole: int) -> float | None:
    return None if whole <= 0 else round(part / whole, 4)


def disk_cache(state: ServerState) -> dict[str, Any] | None:
    """The disk prompt cache's prompts and size cap (None when it is off)."""
    generator = state.engine.generator if state.engine is not None else None
    cache = None if generator is None else generator.prefix_cache
    disk = None if cache is None else cache.disk
    if disk is None:
        return None
    return {
        "entries": len(disk),  # a dict's len(): safe while the writer thread adds
        "limit_bytes": state.config.prompt_cache_disk_bytes,
        "directory": state.config.prompt_cache_dir,
    }


def base_urls(request: Request, config: ServerConfig) -> dict[str, Any]:
    """The addresses a client is configured with, as this request reached the server."""
    origin = f"{request.url.scheme}://{request.url.netloc}"
    urls: dict[str, Any] = {
        "openai": f"{origin}/v1",
        "anthropic": origin,
        "ollama": origin,
    }
    if config.ollama_port is not None:
        urls["ollama"] = f"{request.url.scheme}://{request.url.hostname}:{config.ollama_port}"
    return urls


def status_body(request: Request, state: ServerState) -> dict[str, Any]:
    """The status object (see docs/status.md)."""
    config, engine = state.config, state.engine
    if engine is None or not engine.alive:
        raise EngineDeadError("the engine is not running")
    activity = state.served.activity if state.served is not None else None
    last, counts = activity.per_second() if activity is not None else (int(time.time()), [])
    recent = counts[-RECENT_SECONDS - 1 : -1]  # whole seconds: the current one is still filling
    generator = engine.generator
    unloads_at = engine.slot.unloads_at
    prompt = activity.prompt_tokens if activity is not None else 0
    cached = activity.cached_tokens if activity is not None else 0
    return {
        "model": {
            "name": config.model_name,
            "demo": is_demo(config),
            "quantization": quantization_of(config.model),
            "kv_bits": config.kv_bits,
            "context_length": engine.context_length,
        },
        "state": "draining" if state.draining else ("loaded" if engine.loaded else "unloaded"),
        "unloads_at": None if unloads_at is None else iso_time(unloads_at),
        "started_at": iso_time(state.started),
        "memory": engine.slot.memory_usage(),
        "disk_cache": disk_cache(state),
        "requests": {
            "active": engine.num_active,
            "waiting": engine.num_waiting,
            "running": 0 if generator is None else generator.num_sequences,
            "max_batch": config.max_batch,
            "max_queue": config.max_queue,
        },
        "tokens_per_second": {
            "now": round(sum(recent) / max(1, len(recent)), 2),
            "interval_seconds": 1,
            "last_second": iso_time(last),
            "counts": counts,
        },
        "tokens": {
            "prompt": prompt,
            "cached": cached,
            "generated": activity.generated_tokens if activity is not None else 0,
        },
        "prefix_cache": {"hit_rate": _rate(cached, prompt)},
        "speculation": {
            "mode": config.speculation,
            "proposed": engine.draft_tokens_proposed,
            "accepted": engine.draft_tokens_accepted,
            "acceptance_rate": _rate(engine.draft_tokens_accepted, engine.draft_tokens_proposed),
        },
        "served": {
            "dialects": list(DIALECTS),
            "port": (request.scope.get("server") or ("", config.port))[1],
            "ollama_port": config.ollama_port,
            "base_urls": base_urls(request, config),
            "api_key_required": config.api_key is not None,
        },
    }


@guarded
async def status(request: Request) -> Response:
    """`GET /v1/status` (docs/status.md)."""
    return JSONResponse(
        status_body(request, state_of(request)), headers={"Cache-Control": "no-store"}
    )
