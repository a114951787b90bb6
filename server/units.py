"""Durations and sizes as people write them: `--keep-alive 5m`, `keep_alive: "1h"`, `8GB`.

Durations follow Ollama's `keep_alive` (Go's `time.ParseDuration` plus bare numbers of seconds):
"5m", "1h30m", "30s", "250ms", 300 or "300" (seconds), 0 (unload right after the request), any
negative value (never unload). They come back in seconds, `math.inf` meaning never.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mlx_mistral.errors import InvalidRequestError

NEVER = math.inf
"""A keep-alive that never expires (Ollama's -1)."""

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def _duration_text(text: str) -> float | None:
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        return None
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_duration(value: Any, *, name: str) -> float:
    """Seconds from a keep-alive value (see the module docstring); `math.inf` for never.

    Raises:
        InvalidRequestError: not a number nor a duration string; `param` is `name`.
    """
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_text(value)
    if seconds is None or math.isnan(seconds):
        raise InvalidRequestError(
            f'{name} must be a duration such as "5m", "1h" or "30s", a number of seconds, 0 '
            f"(unload after the request) or -1 (never unload); got {value!r:.100}",
            param=name,
        )
    return NEVER if seconds < 0 else seconds


def parse_size(value: str, *, name: str) -> int:
    """Bytes from a size: "8GB" and "512MB" are decimal (10^9, 10^6), "8GiB" and "512MiB" binary,
    as are the bare letters "8G" and "512M"; a plain number is bytes.

    Raises:
        InvalidRequestError: anything else, or zero; `param` is `name`.
    """
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or (match.group(3) and not match.group(2)):
        raise InvalidRequestError(
            f'{name} must be a size such as "8GB", "8GiB" or "512MiB", got {value!r:.100}',
            param=name,
        )
    number, prefix, binary, byte = match.groups()
    power = _SIZE_POWERS[prefix.lower()]
    base = 1000 if byte and not binary and power else 1024
    size = int(float(number) * base**power)
    if size <= 0:
        raise InvalidRequestError(
            f"{name} must be more than 0 bytes, got {value!r:.100}", param=name
        )
    return size
