"""`ServerConfig`: every setting of the HTTP server, validated once when it is built."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.hub import DEFAULT_REPO

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
"""8 MiB: far more than a full 32k-token conversation needs, far less than memory."""


def is_loopback(host: str) -> bool:
    """True when `host` (a bind address or a name) only reaches this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host part of a Host header or an allow-list entry, lower case, without port or
    IPv6 brackets: "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        return value.split(":", 1)[0]
    return value


def served_name(model: str) -> str:
    """The name the API reports for `model`: a local directory's name, or the repo id as given."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name
    return model


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs; built once from the command line (see `server.cli`).

    Attributes:
        model: the checkpoint served (a local directory or a repo id), as given.
        model_name: the name reported in responses and `/v1/models`.
        is_demo: True when serving the bundled demo model.
        host, port: where to listen.
        api_key: the bearer key clients must send; None accepts any (or no) token.
        allowed_hosts: Host-header values accepted besides the loopback names and the bound
            host (DNS-rebinding defence); "*" turns the check off.
        cors_origins: origins that may call the API from a browser; empty turns CORS off.
        allow_public: allow a non-loopback bind without an API key.
        max_body_bytes: the largest request body accepted (413 beyond).
        max_batch, max_queue: engine limits (sequences decoded together; requests waiting).
        prefix_cache_mib: memory kept for earlier conversations' KV state, so a chat's next
            turn prefills only its new tokens; None picks the engine's default, 0 turns it off.
        prompt_price, completion_price: per-token prices for `usage.estimated_cost`.
        default_max_tokens: max_tokens when a request gives none (capped to the context
            left); None means "up to the context window".
        keepalive_seconds: period of SSE comments sent while a stream waits for its first token.
        send_timeout_seconds: a stream whose client stops reading for this long is cancelled.
        drain_timeout_seconds: at shutdown, how long in-flight requests may take to finish.

    Raises:
        InvalidRequestError: a setting out of range, or a public bind without a key; `param`
            names the command-line flag.
    """

    model: str
    model_name: str
    is_demo: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    allow_public: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch: int = 32
    max_queue: int = 64
    prefix_cache_mib: int | None = None
    prompt_price: float = 0.0
    completion_price: float = 0.0
    default_max_tokens: int | None = None
    keepalive_seconds: float = 10.0
    send_timeout_seconds: float = 60.0
    drain_timeout_seconds: float = 60.0
    ollama_port: int | None = None  # also serve on this port (Ollama's apps assume 11434)
    accepted_model_names: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{flag} {message}", param=flag)

        need(0 <= self.port <= 65535, "--port", f"must be in [0, 65535], got {self.port}")
        if self.ollama_port is not None:
            need(
                0 <= self.ollama_port <= 65535,
                "--ollama-port",
                f"must be in [0, 65535], got {self.ollama_port}",
            )
        need(
            self.max_body_bytes >= 1024,
            "--max-body-bytes",
            f"must be at least 1024, got {self.max_body_bytes}",
        )
        need(self.max_batch >= 1, "--max-batch", f"must be at least 1, got {self.max_batch}")
        need(self.max_queue >= 0, "--max-queue", f"must be at least 0, got {self.max_queue}")
        need(
            self.prefix_cache_mib is None or self.prefix_cache_mib >= 0,
            "--prefix-cache-mib",
            f"must be at least 0, got {self.prefix_cache_mib}",
        )
        for flag, price in (
            ("--prompt-price", self.prompt_price),
            ("--completion-price", self.completion_price),
        ):
            need(
                math.isfinite(price) and price >= 0,
                flag,
                f"must be a finite price >= 0, got {price}",
            )
        if self.default_max_tokens is not None:
            need(
                self.default_max_tokens >= 1,
                "--default-max-tokens",
                f"must be at least 1, got {self.default_max_tokens}",
            )
        for flag, value in (
            ("--keepalive", self.keepalive_seconds),
            ("--send-timeout", self.send_timeout_seconds),
            ("--drain-timeout", self.drain_timeout_seconds),
        ):
            need(value > 0, flag, f"must be positive, got {value}")
        if self.api_key is not None:
            need(bool(self.api_key.strip()), "--api-key", "must not be empty")
        # An open port on the network with no key is how local LLM servers get found and used
        # by strangers; make exposing one a deliberate act.
        need(
            is_loopback(self.host) or self.api_key is not None or self.allow_public,
            "--host",
            f"{self.host} is reachable from other machines; set --api-key, or pass "
            "--allow-public to serve without a key",
        )
        names = {self.model_name, self.model, DEFAULT_REPO}
        path = Path(self.model).expanduser()
        if path.is_dir():
            names.add(str(path.resolve()))
        object.__setattr__(self, "accepted_model_names", frozenset(names))

    @property
    def host_allow_list(self) -> frozenset[str]:
        """Host-header names accepted (lower case, without port or brackets)."""
        names = {*LOOPBACK_HOSTS, host_name(self.host)}
        names.update(host_name(h) for h in self.allowed_hosts if h.strip())
        return frozenset(names)
