"""`mlx-mistral serve`: parse flags, check them, bind, load the model, serve with uvicorn.

The order is chosen so that every mistake costs nothing: settings are validated and the port is
bound before the model loads (a 7B load takes a while), and each refusal is one line on stderr
with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

from mlx_mistral.device import DTYPE_HELP, DTYPES, check_requested_dtype
from mlx_mistral.disk_cache import default_cache_dir
from mlx_mistral.errors import InvalidRequestError, MistralError

from .config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    SPECULATION,
    ServerConfig,
    context_bytes,
    read_text_flag,
    served_name,
)
from .protocol import HttpLimits, protocol_class
from .units import parse_duration, parse_size

API_KEY_ENV = "MLX_MISTRAL_API_KEY"
DEMO_NAME = "mlx-mistral-demo"
SHUTDOWN_MARGIN_SECONDS = 3.0


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags to `parser`."""
    parser.add_argument(
        "--model",
        default=None,
        help="local checkpoint directory or Hugging Face repo id (default: "
        "Mistral-7B-Instruct-v0.2 if its weights are on this machine, else the "
        "bundled demo model)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; a non-loopback address needs "
        "--api-key or --allow-public)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    parser.add_argument(
        "--ollama-port",
        type=int,
        default=None,
        help="also listen on this port (Ollama's is 11434), for apps that assume Ollama's",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"bearer key clients must send (default: ${API_KEY_ENV}; none: any token is "
        "accepted). Other users of the machine can read it in `ps`: prefer the environment "
        "variable or --api-key-file",
    )
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the bearer key from this file (its first line)",
    )
    parser.add_argument(
        "--allowed-hosts",
        type=_list,
        action="extend",
        default=[],
        metavar="HOST[,HOST]",
        help="Host headers accepted besides localhost, 127.0.0.1, [::1], *.localhost, "
        "host.docker.internal (and the other container names for this machine) and the "
        "bound host ('*' accepts any: not recommended)",
    )
    parser.add_argument(
        "--strict-model-names",
        action="store_true",
        help="answer 404 to a request whose model is not the served model's name (default: "
        "any name is served by the one model, as clients send their own default names)",
    )
    parser.add_argument(
        "--cors-origins",
        type=_list,
        action="extend",
        default=[],
        metavar="ORIGIN[,ORIGIN]",
        help="browser origins allowed to call the API (default: none, CORS off)",
    )
    parser.add_argument(
        "--allow-public",
        action="store_true",
        help="allow binding a non-loopback address without an API key",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="largest request line plus headers; 431 beyond, 414 for a request target over "
        f"{HttpLimits.max_url_bytes} bytes (default {DEFAULT_MAX_HEADER_BYTES})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=15.0,
        help="close a connection that sends no request for this many seconds (default 15)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=60.0,
        help="seconds a request's headers may take to arrive; 408 beyond (default 60)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="close a connection whose request body pauses this many seconds (default 60)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most sequences decoded together (default 32)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="most requests waiting for the engine, or for their client to read an answer the "
        "engine has finished; more get 503 (at least 1; default 64)",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=int,
        default=None,
        help="memory for earlier conversations' KV state, reused by their next "
        "turns (default: a quarter of the KV budget, at most 2048; 0 turns it off)",
    )
    parser.add_argument(
        "--prompt-cache-dir",
        default=None,
        metavar="DIR",
        help="keep long prompts' KV on disk here, so a restarted server does not prefill them "
        f"again (default: {default_cache_dir()}; 'off' turns it off)",
    )
    parser.add_argument(
        "--prompt-cache-disk-size",
        default="10G",
        metavar="SIZE",
        help="most disk the prompt cache uses, e.g. 512MiB, 10GiB (default 10G); least recently "
        "used files go first",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="store the KV cache quantized to 8 or 4 bits: ~0.53x or ~0.28x the memory per "
        "token of float16 (default: not quantized)",
    )
    parser.add_argument(
        "--speculation",
        default="auto",
        choices=SPECULATION,
        help="speculative decoding (prompt lookup and requests' `prediction`; exact, only the "
        "speed changes): auto verifies drafts when the forward's cost, measured once, says it "
        "pays; always whenever there is one; off never (default: auto)",
    )
    parser.add_argument(
        "--warm-prompt",
        default=None,
        metavar="FILE",
        help="prefill this file's text as the system prompt at start-up (and keep it cached)",
    )
    parser.add_argument(
        "--keep-alive",
        default="5m",
        metavar="DURATION",
        help="free the model's memory after this long without requests; the next request "
        "loads it again (Ollama's syntax: 5m, 1h, 30s, seconds as a number, 0: after each "
        "request, -1: never; default 5m)",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="cap on weights + KV cache + prefix cache, e.g. 8GB or 512MiB: a request that "
        "could never fit gets 400, one that must wait for memory queues (default: no cap; "
        "the KV cache may use 60%% of the memory free after loading)",
    )
    parser.add_argument(
        "--responses-store-size",
        default="64MiB",
        metavar="SIZE",
        help="most memory the Responses API's kept responses (for retrieval and "
        "previous_response_id) may hold, e.g. 256MiB; least recently used go first (default "
        "64MiB, and at most 256 responses)",
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve Prometheus metrics at /metrics (default: on when bound to loopback or "
        "when --api-key is set; behind the API key when one is set)",
    )
    parser.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the chat and status page at / (docs/ui.md)",
    )
    parser.add_argument(
        "--prompt-price",
        type=float,
        default=0.0,
        help="dollars per prompt token, for usage.estimated_cost (default 0)",
    )
    parser.add_argument(
        "--completion-price",
        type=float,
        default=0.0,
        help="dollars per completion token, for usage.estimated_cost (default 0)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="max_tokens for requests that give none (default: up to the context window)",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=10.0,
        help="seconds between SSE keep-alive comments while a stream waits",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=60.0,
        help="cancel a stream whose client reads nothing for this long; a client reading "
        "less than 64 KiB in this time counts as stopped (default 60)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="at shutdown, seconds running requests may take to finish (fractions allowed); "
        "then each ends with an error event (default 60)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="tensor-parallel across the ranks of `mlx.launch` (e.g. `mlx.launch --hosts "
        "mac1,mac2 --backend ring -- mlx-mistral serve --distributed`): each rank holds its "
        "share of the weights; rank 0 serves HTTP. The disk prompt cache is off in this mode",
    )


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else --api-key-file, else $MLX_MISTRAL_API_KEY (else None).

    Raises:
        InvalidRequestError: both flags are given, or the file cannot be read.
    """
    if args.api_key_file is None:
        return args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if args.api_key is not None:
        raise InvalidRequestError(
            "give --api-key or --api-key-file, not both", param="--api-key-file"
        )
    try:
        with open(args.api_key_file, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"--api-key-file: cannot read {args.api_key_file}: {getattr(exc, 'strerror', exc)}",
            param="--api-key-file",
        ) from None
    return lines[0].strip() if lines else ""


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The validated settings. Raises MistralError (InvalidRequestError) on a bad flag."""
    check_requested_dtype(args.dtype)
    if args.model is None:
        from mlx_mistral.demo import default_model
        from mlx_mistral.hub import DEFAULT_REPO

        model, is_demo = default_model()
        name = DEMO_NAME if is_demo else DEFAULT_REPO
    else:
        model, is_demo, name = args.model, False, served_name(args.model)
    return ServerConfig(
        model=model,
        model_name=name,
        is_demo=is_demo,
        host=args.host,
        port=args.port,
        ollama_port=args.ollama_port,
        api_key=read_api_key(args),
        allowed_hosts=tuple(args.allowed_hosts),
        cors_origins=tuple(args.cors_origins),
        allow_public=args.allow_public,
        max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_mib=args.prefix_cache_mib,
        dtype=args.dtype,
        kv_bits=args.kv_bits,
        speculation=args.speculation,
        prompt_cache_dir=None
        if (args.prompt_cache_dir or "").lower() == "off"
        else str(args.prompt_cache_dir or default_cache_dir()),
        prompt_cache_disk_bytes=parse_size(
            args.prompt_cache_disk_size, name="--prompt-cache-disk-size"
        ),
        warm_prompt=None
        if args.warm_prompt is None
        else read_text_flag(args.warm_prompt, "--warm-prompt", max_bytes=context_bytes(model)),
        prompt_price=args.prompt_price,
        completion_price=args.completion_price,
        default_max_tokens=args.default_max_tokens,
        keepalive_seconds=args.keepalive,
        send_timeout_seconds=args.send_timeout,
        drain_timeout_seconds=args.drain_timeout,
        max_header_bytes=args.max_header_bytes,
        idle_timeout_seconds=args.idle_timeout,
        header_timeout_seconds=args.header_timeout,
        body_timeout_seconds=args.body_timeout,
        strict_model_names=args.strict_model_names,
        keep_alive_seconds=parse_duration(args.keep_alive, name="--keep-alive"),
        max_memory_bytes=None
        if args.max_memory is None
        else parse_size(args.max_memory, name="--max-memory"),
        responses_store_bytes=parse_size(args.responses_store_size, name="--responses-store-size"),
        metrics=args.metrics,
        ui=not args.no_ui,
    )


def distributed_setup(
    config: ServerConfig, args: argparse.Namespace
) -> tuple[ServerConfig, object]:
    """This process's `mlx.launch` group, and the settings tensor parallelism allows.

    Raises:
        InvalidRequestError: not launched by `mlx.launch` (one rank), or a feature the ranks
            do not replicate yet was asked for.
    """
    import dataclasses

    import mlx.core as mx

    # The in-memory prefix cache is mirrored on every rank; the disk prompt cache is not (each
    # rank would need its own files, kept in step), and the default directory is not used.
    if (args.prompt_cache_dir or "off").lower() != "off":
        raise InvalidRequestError(
            "--prompt-cache-dir: the disk prompt cache is not replicated across ranks; leave it "
            "out with --distributed (the in-memory prefix cache is)",
            param="--prompt-cache-dir",
        )
    group = mx.distributed.init()
    if group.size() < 2:
        raise InvalidRequestError(
            "--distributed needs two or more ranks: start it with `mlx.launch` (e.g. "
            "`mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- mlx-mistral serve "
            "--distributed`)",
            param="--distributed",
        )
    return dataclasses.replace(config, prompt_cache_dir=None), group


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port). Raises OSError (e.g. the port is in use)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM. Returns the exit status (1 with one line on stderr on error)."""
    import uvicorn

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sockets: list[socket.socket] = []
    port = args.port
    group = None
    try:
        config = build_config(args)
        from mlx_mistral.hub import resolve_model_path

        resolve_model_path(config.model)  # a missing model fails before the port is taken
        if args.distributed:
            config, group = distributed_setup(config, args)
            if group.rank() != 0:  # no HTTP here: replay rank 0's steps on this shard
                from mlx_mistral.distributed_engine import run_follower

                return run_follower(config.model, group, kv_bits=config.kv_bits, dtype=config.dtype)
        if config.prompt_cache_dir is not None:  # a folder the cache cannot own: before loading
            from mlx_mistral.disk_cache_files import claim_cache_dir

            claim_cache_dir(Path(config.prompt_cache_dir).expanduser())
        # --ollama-port: a second listener of the same app, behind the same guards.
        for port in (config.port, config.ollama_port):
            if port is not None:
                sockets.append(bind_socket(config.host, port))
    except MistralError as exc:
        print(f"mlx-mistral serve: error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        for sock in sockets:
            sock.close()
        print(
            f"mlx-mistral serve: error: cannot listen on {args.host}:{port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1

    from mlx_mistral.loader import load

    from .app import begin_drain, create_app, start_engine

    try:
        engine = start_engine(config, lambda: load(config.model, group=group, dtype=config.dtype))
        if group is not None:
            from mlx_mistral.distributed_engine import attach_leader, leader_exit_hook

            engine.on_exit = leader_exit_hook(attach_leader(engine.generator, group))
            engine.slot.pinned = True  # no idle unload: every rank holds a share
    except MistralError as exc:
        for sock in sockets:
            sock.close()
        print(f"mlx-mistral serve: error: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable file: one line, not a traceback
        for sock in sockets:
            sock.close()
        print(
            f"mlx-mistral serve: error: cannot load {config.model}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    app = create_app(config, engine=engine)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # New requests get 503 + Retry-After while streams finish. Posted to the loop: a
            # signal handler must not take the engine queue's lock (the interrupted code may
            # hold it).
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(begin_drain, app)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # A drained SIGTERM is a clean exit (status 0), not death by the signal.
                self._captured_signals = [s for s in self._captured_signals if s != sig]

    limits = HttpLimits(
        max_header_bytes=config.max_header_bytes,
        idle_timeout=config.idle_timeout_seconds,
        header_timeout=config.header_timeout_seconds,
        body_timeout=config.body_timeout_seconds,
    )
    uv_config = uvicorn.Config(
        app,
        http=protocol_class(limits),  # head size limits and timeouts (see server.protocol)
        log_config=None,
        access_log=False,
        log_level=args.log_level,
        timeout_keep_alive=config.idle_timeout_seconds,  # type: ignore[arg-type]
        # The app ends every stream by --drain-timeout (the engine's error, then the stream's
        # terminator); uvicorn's own cut, which sends nothing, comes only after that ending had
        # time to be written.
        timeout_graceful_shutdown=config.drain_timeout_seconds + SHUTDOWN_MARGIN_SECONDS,
    )
    host, port = sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log = logging.getLogger("mlx_mistral.server")
    if args.api_key is not None:
        log.warning(
            "--api-key is visible to every user of this machine (ps, /proc); prefer $%s or "
            "--api-key-file",
            API_KEY_ENV,
        )
    if "*" in config.cors_origins and config.api_key is None:
        log.warning(
            "--cors-origins '*' without an API key: any web page open in a browser on this "
            "machine can use this server; set --api-key, or name the origins that may"
        )
    for sock in sockets:  # before saying so: a client that reads the line is not refused
        sock.listen(uv_config.backlog)
    log.info(
        "serving %s on http://%s:%d/v1%s",
        config.model_name,
        shown,
        port,
        "" if config.api_key else " (no API key)",
    )
    for sock in sockets[1:]:
        log.info("serving the Ollama API on http://%s:%d too", shown, sock.getsockname()[1])
    try:
        Server(uv_config).run(sockets=sockets)
    except KeyboardInterrupt:
        return 130
    finally:
        for sock in sockets:
            sock.close()
    return 0
