"""`ServerConfig`: every setting of the HTTP server, validated once when it is built."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mlx_mistral.cache import KV_BITS
from mlx_mistral.disk_cache import DiskCacheSettings, model_identity
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.hub import DEFAULT_REPO, resolve_model_path

from .response_store import DEFAULT_STORE_BYTES

SPECULATION = ("auto", "always", "off")
MISTRAL_CONTEXT_TOKENS = 32768
MAX_BYTES_PER_TOKEN = 48  # the longest piece of Mistral's 32,000 (UTF-8, measured)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

CONTAINER_HOSTS = (
    "host.docker.internal",  # Docker Desktop, and Docker on Linux with host-gateway
    "gateway.docker.internal",
    "kubernetes.docker.internal",
    "host.containers.internal",  # Podman
    "host.lima.internal",  # Lima, Colima
    "host.orb.internal",  # OrbStack
)
"""The names by which a container on this machine reaches the host (Open WebUI in Docker sends
`Host: host.docker.internal:8000`); every `*.internal` name is accepted (see `_PRIVATE_NAME`),
these are the ones the runtimes use."""

# Names only this machine (or its own containers) can send, safe against DNS rebinding:
# - *.localhost (RFC 6761) is loopback, and browsers resolve it so without asking DNS (a page
#   cannot be served under such a name by anyone but this machine);
# - *.internal is the TLD ICANN reserved for private use (2024): it is never delegated in
#   public DNS, so an attacker's DNS cannot make a browser send it; only this machine's hosts
#   file or container runtime (Docker, Podman, Lima, OrbStack, Kubernetes) resolves it.
# Not *.local: any machine on the LAN can answer mDNS for such a name, with 127.0.0.1 too.
# Labels as in DNS.
_PRIVATE_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+(?:localhost|internal)")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
"""8 MiB: far more than a full 32k-token conversation needs, far less than memory."""


DEFAULT_MAX_HEADER_BYTES = 32 * 1024
"""32 KiB of request line and headers: what nginx (4 x 8 KiB buffers) accepts; h11 and Node
stop at 16 KiB. An API request carries a few hundred bytes of headers."""
MIN_HEADER_BYTES, MAX_HEADER_BYTES = 1024, 1024 * 1024


def is_loopback(host: str) -> bool:
    """True when `host` (a bind address or a name) only reaches this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_NAME = re.compile(r"[a-z0-9_.-]+")  # a DNS name or an IPv4 address, lower case


def parse_host(value: str) -> tuple[str, int | None]:
    """Split a Host header (or an allow-list entry) into (name, port), strictly.

    The name comes back lower case, an IPv6 address without its brackets:
    "LocalHost:8000" -> ("localhost", 8000), "[::1]" -> ("::1", None).

    Raises:
        ValueError: anything but `name[:port]` or `[ipv6][:port]` (RFC 9110 7.2), such as
            "[::1]evil.example", "localhost:evil" or "localhost:8200@evil.example": a lenient
            split would read each of them as an allowed name.
    """
    value = value.strip().lower()
    if value.startswith("["):
        address, sep, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{value[:100]!r} is not a bracketed IPv6 address") from None
        name, port = address, rest
        if not sep or (port and not port.startswith(":")):
            raise ValueError(f"{value[:100]!r} has text after its IPv6 address")
        port = port[1:] if port else None
    else:
        name, sep, port = value.partition(":")
        if not _NAME.fullmatch(name):
            raise ValueError(f"{value[:100]!r} is not a host name")
        port = port if sep else None
    if port is None:
        return name, None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{value[:100]!r} has an invalid port")
    return name, int(port)


def host_name(value: str) -> str:
    """The host part of a Host header or an allow-list entry, lower case, without port or
    IPv6 brackets: "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1".

    A bare IPv6 address (as `--host ::1` is written) is its own name.

    Raises:
        ValueError: `value` is not a host (see `parse_host`).
    """
    stripped = value.strip().lower()
    if stripped.count(":") > 1 and not stripped.startswith("["):
        return parse_host(f"[{stripped}]")[0]
    return parse_host(stripped)[0]


def host_allowed(name: str, allowed: frozenset[str]) -> bool:
    """Whether a Host name (from `host_name`) is on the allow-list (from `host_allow_list`), or
    a name that only this machine can send: a `*.localhost` or `*.internal` name (container
    runtimes' names for the host, `CONTAINER_HOSTS`, among them). `*.local` is not one: any
    machine on the LAN can answer mDNS for it, with 127.0.0.1 too, so it stays behind
    --allowed-hosts."""
    return "*" in allowed or name in allowed or _PRIVATE_NAME.fullmatch(name) is not None


def read_text_flag(path: str, flag: str, *, max_bytes: int | None = None) -> str:
    """The text of the regular file a flag names, refused unread beyond `max_bytes`.

    Raises:
        InvalidRequestError: naming the flag (`/dev/zero` or a FIFO would never end a read).
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequestError(f"{flag}: {path} is not a regular file", param=flag)
        if max_bytes is not None and info.st_size > max_bytes:
            raise InvalidRequestError(
                f"{flag}: {path} has {info.st_size} bytes, more than the model's context could "
                f"hold ({max_bytes} bytes)",
                param=flag,
            )
        with open(path, "rb") as file:
            text = file.read(-1 if max_bytes is None else max_bytes + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"{flag}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}", param=flag
        ) from None
    if not text.strip():
        raise InvalidRequestError(f"{flag}: {path} is empty", param=flag)
    return text


def context_bytes(model: str) -> int:
    """Bytes of text beyond which a prompt cannot fit `model`'s context window, whatever its
    words: the window (from a local checkpoint's config.json, else Mistral-7B-v0.2's) times the
    most bytes one token of the Mistral vocabulary stands for."""
    tokens = MISTRAL_CONTEXT_TOKENS
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
        tokens = int(config.get("max_position_embeddings", tokens))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return tokens * MAX_BYTES_PER_TOKEN


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
        allowed_hosts: Host-header values accepted besides the loopback names, the bound host,
            `*.localhost` and `*.internal` (DNS-rebinding defence); "*" turns the check off.
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
        max_header_bytes: the largest request head (request line and headers; 431 beyond).
        idle_timeout_seconds: a connection that sends no request for this long is closed.
        header_timeout_seconds: a request head must be complete this long after its first
            byte (408 beyond).
        body_timeout_seconds: a request body that pauses for this long is closed.
        drain_timeout_seconds: at shutdown, how long in-flight requests may take to finish.
        strict_model_names: refuse (404) a request whose `model` is not a name of the served
            model; by default any name is served by the one model (clients send their own
            defaults: "gpt-4o", "llama3:latest", ""), and the answer names the served model.
        keep_alive_seconds: free the model's memory after this long without requests (the next
            one loads it again); 0 after each request, `math.inf` never.
        max_memory_bytes: cap on weights + KV + prefix cache; None: no cap.
        responses_store_bytes: most memory kept Responses may hold (their JSON size).
        metrics: serve /metrics; None: when bound to loopback or behind an API key.
        ui: serve the chat and status page at / (docs/ui.md).

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
    prompt_cache_dir: str | None = None
    prompt_cache_disk_bytes: int = 10 * 2**30
    warm_prompt: str | None = None
    dtype: str | None = None  # the compute dtype; None: $MLX_MISTRAL_DTYPE or the device's
    kv_bits: int | None = None
    speculation: str = "auto"
    prompt_price: float = 0.0
    completion_price: float = 0.0
    default_max_tokens: int | None = None
    keepalive_seconds: float = 10.0
    send_timeout_seconds: float = 60.0
    drain_timeout_seconds: float = 60.0
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    idle_timeout_seconds: float = 15.0
    header_timeout_seconds: float = 60.0
    body_timeout_seconds: float = 60.0
    ollama_port: int | None = None  # also serve on this port (Ollama's apps assume 11434)
    strict_model_names: bool = False
    keep_alive_seconds: float = 300.0  # Ollama's default: a laptop gets its memory back
    max_memory_bytes: int | None = None
    responses_store_bytes: int = DEFAULT_STORE_BYTES
    metrics: bool | None = None
    ui: bool = True
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
        need(
            MIN_HEADER_BYTES <= self.max_header_bytes <= MAX_HEADER_BYTES,
            "--max-header-bytes",
            f"must be in [{MIN_HEADER_BYTES}, {MAX_HEADER_BYTES}], got {self.max_header_bytes}",
        )
        for entry in self.allowed_hosts:
            if entry.strip() != "*":
                try:
                    host_name(entry)
                except ValueError as exc:
                    raise InvalidRequestError(
                        f"--allowed-hosts: {exc}", param="--allowed-hosts"
                    ) from None
        need(self.max_batch >= 1, "--max-batch", f"must be at least 1, got {self.max_batch}")
        need(
            self.max_queue >= 1,
            "--max-queue",
            f"must be at least 1 (0 would refuse every request), got {self.max_queue}",
        )
        need(
            self.prefix_cache_mib is None or self.prefix_cache_mib >= 0,
            "--prefix-cache-mib",
            f"must be at least 0, got {self.prefix_cache_mib}",
        )
        need(
            self.prompt_cache_disk_bytes > 0,
            "--prompt-cache-disk-size",
            f"must be positive, got {self.prompt_cache_disk_bytes}",
        )
        need(
            self.speculation in SPECULATION,
            "--speculation",
            f"must be one of {', '.join(SPECULATION)}, got {self.speculation!r}",
        )
        need(
            self.kv_bits in (None, *KV_BITS),
            "--kv-bits",
            f"must be one of {', '.join(map(str, KV_BITS))}, got {self.kv_bits}",
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
            ("--idle-timeout", self.idle_timeout_seconds),
            ("--header-timeout", self.header_timeout_seconds),
            ("--body-timeout", self.body_timeout_seconds),
        ):
            need(value > 0 and math.isfinite(value), flag, f"must be positive, got {value}")
        need(
            self.keep_alive_seconds >= 0 and not math.isnan(self.keep_alive_seconds),
            "--keep-alive",
            f"must be a duration >= 0 (or -1: never), got {self.keep_alive_seconds}",
        )
        if self.max_memory_bytes is not None:
            need(self.max_memory_bytes > 0, "--max-memory", "must be more than 0 bytes")
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
    def metrics_enabled(self) -> bool:
        """/metrics is served on loopback, or anywhere behind the API key (unless set)."""
        if self.metrics is not None:
            return self.metrics
        return is_loopback(self.host) or self.api_key is not None

    @property
    def host_allow_list(self) -> frozenset[str]:
        """Host-header names accepted (lower case, without port or brackets)."""
        names = {*LOOPBACK_HOSTS, host_name(self.host)}
        names.update(h.strip() if h.strip() == "*" else host_name(h) for h in self.allowed_hosts)
        return frozenset(names)


def prompt_cache_settings(config: ServerConfig) -> DiskCacheSettings | None:
    """The disk prompt cache's settings for the served checkpoint (None: turned off)."""
    if config.prompt_cache_dir is None:
        return None
    checkpoint = resolve_model_path(config.model)
    return DiskCacheSettings(
        Path(config.prompt_cache_dir).expanduser(),
        model_identity(checkpoint),
        max_bytes=config.prompt_cache_disk_bytes,
        model_path=Path(checkpoint),
    )
