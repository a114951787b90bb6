"""Clients and load: disconnect storms, frozen readers, concurrency, engine death, SIGTERM, and
the one-thread rule for MLX.

Real servers throughout: a `python -m mlx_mistral.server` subprocess where the process itself
is what is measured (its RSS, its exit), and uvicorn on a thread of this process where the
engine must be watched from inside (the tokens it makes after a cancel, the threads that call
MLX, a fault injected into the model the engine runs). tests/test_server.py already covers one
disconnect, 32 streams that all fit, a clean engine stop mid-stream and SIGTERM with 3 streams.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import mlx.core as mx
import pytest
import uvicorn

import mlx_mistral
from mlx_mistral.server import ServerConfig, create_app
from tests.server_process import ServerProcess

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
ENGINE_THREAD = "mlx-mistral-engine"


# -- helpers ---------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] = str,
) -> None:
    """Poll `condition` until true; after `timeout` seconds fail, with `details()` said."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")
        time.sleep(0.01)


def active(base_url: str) -> int:
    return httpx.get(base_url + "/health", timeout=10).json()["active"]


def stream_request(body: dict[str, Any], port: int, path: str = CHAT) -> bytes:
    raw = json.dumps({"stream": True, **body}).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(raw))
    ) + raw


class RawResponse:
    """One HTTP/1.1 response read off a socket byte by byte: what the HTTP client would hide
    (a chunked body cut without its terminator, a half-sent event)."""

    def __init__(self, sock: socket.socket, *, pace: float = 0.0, read_size: int = 65536):
        self.sock = sock
        self.pace = pace  # seconds to sleep after each recv (a slow reader)
        self.read_size = read_size
        self.data = b""
        self.head = b""
        self.body = b""
        self.complete = False  # the chunked terminator (or Content-Length) was reached
        self.ended_at: float | None = None

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(self.read_size)
        except (TimeoutError, ConnectionError):
            return False
        if self.pace:
            time.sleep(self.pace)
        self.data += chunk
        return bool(chunk)

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.data:
            if not self._more():
                raise AssertionError(f"no response head: {self.data[:200]!r}")
        self.head, self.data = self.data.split(b"\r\n\r\n", 1)
        return self.head

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.encode():
                return value.strip().decode()
        return None

    def read_body(self) -> bytes:
        """The body, de-chunked; `complete` says whether its end arrived before EOF/timeout."""
        if not self.head:
            self.read_head()
        length = self.header("content-length")
        if length is not None:
            while len(self.data) < int(length) and self._more():
                pass
            self.body, self.complete = self.data[: int(length)], len(self.data) >= int(length)
        else:
            while True:
                line, sep, rest = self.data.partition(b"\r\n")
                if sep:
                    size = int(line, 16)
                    if len(rest) >= size + 2:
                        if size == 0:
                            self.complete = True
                            break
                        self.body += rest[:size]
                        self.data = rest[size + 2 :]
                        continue
                if not self._more():
                    break
        self.ended_at = time.monotonic()
        return self.body

    def events(self) -> list[str]:
        return [e for e in self.body.decode().split("\n\n") if e.startswith("data: ")]


def read_one_chunk_and_close(port: int, request: bytes) -> None:
    """Open a connection, send a streaming chat request, read until the first chunk with
    generated text (after the role chunk), close: the generation is under way when the client
    leaves."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while data.count(b"data: ") < 2:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]


class ThreadServer:
    """uvicorn serving `app` on a thread of this process (real sockets on 127.0.0.1).

    `sndbuf`: a fixed kernel send buffer for the accepted connections (they inherit the
    listener's), as small as macOS's; Linux otherwise grows it to megabytes, which would hide
    what the server itself buffers for a slow client."""

    def __init__(self, app: Any, sndbuf: int = 0):
        self.app = app
        self.sock = socket.create_server(("127.0.0.1", 0))
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True
        )

    def __enter__(self) -> ThreadServer:  # noqa: PYI034
        self.thread.start()
        wait_for(lambda: self.server.started, 60, "the server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def engine(self) -> mlx_mistral.Engine:
        return self.app.state.server.engine


def tiny_config(checkpoint, **kwargs: Any) -> ServerConfig:
    return ServerConfig(model=str(checkpoint), model_name="tiny", **kwargs)


# -- disconnect storm ---------------------------------------------------------------------
STORM_CYCLES = 1000


def test_disconnect_storm_1000_cycles(tiny_hf_checkpoint):
    """1,000 times: a streaming request, one SSE chunk read, the connection closed. The engine
    ends up idle, the next request is served, and RSS comes back within 10% of its baseline."""
    body = {"messages": MESSAGES, "max_tokens": 2000, "temperature": 0}
    with ServerProcess(tiny_hf_checkpoint) as server:
        request = stream_request(body, server.port)
        pid = server.proc.pid

        def settle() -> int:
            wait_for(lambda: active(server.base_url) == 0, 10, "the engine to go idle")
            # The engine hands its buffer pool back once it is idle, a moment after the last
            # request ends (later on a busy machine): the smallest RSS over 2 s is the settled one.
            samples = []
            for _ in range(10):
                samples.append(rss_kib(pid))
                time.sleep(0.2)
            return min(samples)

        # Warm-up: the one-off timing of the forward's cost (wide buffers, +5-15% RSS once), which
        # a long answer's prompt-lookup draft would otherwise set off in the storm's first idle
        # moment: a predicted answer asks for it now, and the engine times it once idle.
        predicted = {
            **body,
            "max_tokens": 16,
            "prediction": {"type": "content", "content": "a " * 16},
        }
        assert httpx.post(server.url(CHAT), json=predicted, timeout=60).status_code == 200
        wait_for(lambda: "measured the forward" in server.log(), 60, "the forward's timing")
        for _ in range(50):  # then allocator pools, caches, the prefix cache entry
            read_one_chunk_and_close(server.port, request)
        baseline = settle()
        started = time.monotonic()
        for _ in range(STORM_CYCLES):
            read_one_chunk_and_close(server.port, request)
        storm_seconds = time.monotonic() - started
        after = settle()
        answer = httpx.post(server.url(CHAT), json={**body, "max_tokens": 4}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        requests = STORM_CYCLES + 50 + 2
        wait_for(lambda: server.log().count('"POST') >= requests, 10, "the access log")
        log = server.log()
        lines = [line for line in log.splitlines() if '"POST' in line]
        storm_lines = lines[1:-1]  # without the predicted and the final answers
        generated = [int(re.search(r"completion=(\d+)", line).group(1)) for line in storm_lines]
        left = ["client-disconnected" in line for line in storm_lines]
        print(
            f"storm: {STORM_CYCLES} cycles in {storm_seconds:.1f}s; RSS {baseline} KiB -> "
            f"{after} KiB ({100 * (after - baseline) / baseline:+.1f}%); tokens made per "
            f"request: max {max(generated)}, mean {sum(generated) / len(generated):.1f}; "
            f"{left.count(False)} not seen to leave"
        )
        # Each request stopped soon after its client left, of the 2,000 tokens it asked. How
        # soon, in tokens, depends on how soon the client got a core to close its socket (the
        # test below pins the server's part to one step); a client the OS left waiting for a
        # whole generation (seen once in ~4,000 cycles with two busy loops on both cores) is
        # answered in full, not seen to leave.
        assert all(gone or made == 2000 for gone, made in zip(left, generated, strict=True))
        assert left.count(False) <= STORM_CYCLES // 100, [ln for ln in lines if "2000" in ln]
        assert sum(generated) / len(generated) < 50
        # The allocator's noise, measured: +0.5% on a quiet machine; under two busy loops one
        # step of +7% (the malloc arenas of the server's threads), flat for 4,000 cycles after.
        # A leak grows with the cycles: 10 KiB a request would be +10% here.
        assert after <= baseline * 1.10, (baseline, after)
        assert "Traceback" not in log and " ERROR " not in log


def test_each_disconnect_stops_generation_within_one_decode_step(tiny_hf_checkpoint):
    """Watched from inside: after the server cancels a request (its client went away), the
    engine makes tokens for it in at most one more step (the step already running: one token,
    or a verified draft's few when it speculates)."""
    app = create_app(tiny_config(tiny_hf_checkpoint))
    made: dict[int, int] = {}  # request number -> tokens delivered so far
    at_cancel: dict[int, int] = {}  # tokens delivered when the cancel was sent
    cancel_step: dict[int, int] = {}  # the engine's step count just after the cancel was sent
    steps_after: dict[int, set[int]] = {}  # the steps that delivered tokens after that
    lock = threading.Lock()

    with ThreadServer(app) as server:
        engine = server.engine
        submit = engine.submit

        def watched_submit(*args: Any, **kwargs: Any) -> Any:
            handle = submit(*args, **kwargs)
            with lock:
                key = len(made)
                made[key] = 0
            add_event, cancel = handle._add_event, handle.cancel

            def count(event: Any, outbox: list) -> bool:  # engine thread, in its step
                with lock:
                    if event.token is not None:
                        made[key] += 1
                        if key in cancel_step:
                            steps_after[key].add(engine.steps)
                return add_event(event, outbox)

            def cancel_and_note() -> None:  # event-loop thread
                with lock:
                    at_cancel.setdefault(key, made[key])
                cancel()
                with lock:  # noted once the command is queued: a later step must not deliver
                    cancel_step.setdefault(key, engine.steps)
                    steps_after.setdefault(key, set())

            handle._add_event, handle.cancel = count, cancel_and_note
            return handle

        engine.submit = watched_submit
        request = stream_request(
            {"messages": MESSAGES, "max_tokens": 1500, "temperature": 0}, server.port
        )
        for _ in range(300):
            read_one_chunk_and_close(server.port, request)
        wait_for(lambda: engine.num_active == 0, 20, "the engine to go idle")
    # A request cancelled before the engine picked it up ends without any event (0 tokens).
    extra = [made[k] - at_cancel[k] for k in at_cancel]
    print(
        f"tokens made after the cancel: max {max(extra)}, histogram "
        f"{ {n: extra.count(n) for n in sorted(set(extra))} }"
    )
    assert len(at_cancel) == 300 and min(at_cancel.values()) >= 1
    late = {k: steps for k, steps in steps_after.items() if steps - {cancel_step[k]}}
    assert not late, (late, {k: cancel_step[k] for k in late})
    assert max(made.values()) < 1500


# -- a client that stops reading -----------------------------------------------------------
def test_frozen_reader_is_cut_off_by_the_send_timeout(tiny_hf_checkpoint):
    """A client that never reads (tiny receive buffer, no recv): once the socket buffers fill,
    a send waits --send-timeout seconds, then the generation is cancelled and its slot freed
    while the connection is still open. When the client reads again, the stream it finds ends
    well-formed: the rest of the event being sent, an error event, `[DONE]`, the terminator."""
    body = {
        "messages": MESSAGES,
        "max_tokens": 2000,
        "n": 16,
        "temperature": 1.0,
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 20,
    }
    with ServerProcess(tiny_hf_checkpoint, "--send-timeout", "1") as server:
        frozen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        frozen.connect(("127.0.0.1", server.port))
        try:
            started = time.monotonic()
            frozen.sendall(stream_request(body, server.port))
            wait_for(lambda: "client stopped reading" in server.log(), 60, "the send timeout")
            cut_after = time.monotonic() - started
            wait_for(lambda: active(server.base_url) == 0, 5, "the slot to be freed")
            # Reading again lets the stream's ending through; the request is logged after it.
            frozen.settimeout(10)
            cut = RawResponse(frozen)
            cut.read_body()
            assert cut.complete, cut.body[-300:]
            wait_for(lambda: "client-disconnected" in server.log(), 10, "the access log")
            line = next(
                ln
                for ln in server.log().splitlines()
                if "client-disconnected" in ln and "completion=" in ln
            )
            generated = int(re.search(r"completion=(\d+)", line).group(1))
            print(
                f"frozen reader cut off after {cut_after:.1f}s, {generated} of "
                f"{16 * 2000} tokens made"
            )
            assert generated < 16 * 2000
            events = cut.events()
            assert events[-1] == "data: [DONE]", events[-2:]
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "request_timeout" and "--send-timeout" in error["message"]
            assert all(json.loads(e.removeprefix("data: ")) for e in events[:-1])  # none cut
            answer = httpx.post(server.url(CHAT), json={"messages": MESSAGES, "max_tokens": 3})
            assert answer.status_code == 200
        finally:
            frozen.close()
        assert "Traceback" not in server.log()


# -- concurrency --------------------------------------------------------------------------
def _prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}: say something about the number {i * 7}."}]


async def _stream_until_served(http: httpx.AsyncClient, i: int, counts: dict[str, int]) -> str:
    """One stream; on 503 it waits Retry-After seconds and tries again (as the openai client
    does with 5xx answers)."""
    body = {"messages": _prompt(i), "stream": True, "temperature": 0, "max_tokens": 6 + i % 5}
    while True:
        async with http.stream("POST", CHAT, json=body) as response:
            if response.status_code == 503:
                counts["503"] += 1
                error = json.loads(await response.aread())["error"]
                assert error["code"] == "engine_overloaded"
                await asyncio.sleep(int(response.headers["retry-after"]))
                continue
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        counts["200"] += 1
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.fixture(scope="module")
def small_server(tiny_hf_checkpoint):
    """Room for 4 running sequences and 4 waiting requests: more concurrent requests get 503."""
    with ServerProcess(tiny_hf_checkpoint, "--max-batch", "4", "--max-queue", "4") as proc:
        yield proc
        assert proc.alive and "Traceback" not in proc.log()


@pytest.mark.parametrize("streams", [8, 16, 32])
def test_concurrent_streams_complete_or_get_503_and_never_mix(small_server, tiny_model, streams):
    counts = {"200": 0, "503": 0}

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            base_url=small_server.base_url, timeout=120, limits=limits
        ) as http:
            return await asyncio.gather(
                *(_stream_until_served(http, i, counts) for i in range(streams))
            )

    texts = asyncio.run(run())
    model, tokenizer = tiny_model
    alone = [
        mlx_mistral.generate(
            model,
            tokenizer,
            _prompt(i),
            params=mlx_mistral.SamplingParams(temperature=0, max_tokens=6 + i % 5),
        )
        for i in range(streams)
    ]
    print(f"{streams} streams: {counts['503']} answers were 503 + Retry-After, then retried")
    assert counts["200"] == streams
    if streams > 8:  # more than 4 running + 4 queued at once: the full-queue path was taken
        assert counts["503"] > 0
    assert texts == alone  # each equals the same request run alone: no cross-talk
    assert active(small_server.base_url) == 0


# -- the engine thread dies ---------------------------------------------------------------
class FaultyModel:
    """The real model, except that once armed its k-th forward raises (a stand-in for a Metal
    error or an OOM inside MLX). Injected through `create_app(load=...)`."""

    def __init__(self, model: Any, k: int):
        self._model = model
        self.k = k
        self.armed = False
        self.calls = 0

    def hidden_states(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.calls += 1
            if self.calls >= self.k:
                raise RuntimeError("injected fault in the forward pass")
        return self._model.hidden_states(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def test_engine_thread_death_ends_every_request_and_health_turns_unhealthy(tiny_hf_checkpoint):
    holder: dict[str, FaultyModel] = {}

    def load() -> tuple[Any, Any]:
        model, tokenizer = mlx_mistral.load(tiny_hf_checkpoint)
        holder["model"] = FaultyModel(model, k=20)
        return holder["model"], tokenizer

    app = create_app(tiny_config(tiny_hf_checkpoint, max_batch=2), load=load)
    long = {"messages": MESSAGES, "max_tokens": 1500, "temperature": 0}
    with ThreadServer(app) as server:
        url = server.base_url

        async def run() -> tuple[list[tuple[int, Any]], list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                first = asyncio.Event()

                async def stream() -> tuple[int, Any]:
                    events = []
                    async with http.stream("POST", CHAT, json={**long, "stream": True}) as r:
                        if r.status_code == 503:  # refused before its first byte (see below)
                            return 503, json.loads(await r.aread())["error"]
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line)
                                if '"content": ""' not in line:
                                    first.set()
                    return 200, events

                async def until_active(n: int) -> None:
                    while server.engine.num_active < n:
                        await asyncio.sleep(0.005)

                # Two stream in the batch, two wait for room (max_batch 2), two non-streaming
                # wait behind them; the fault is armed once all six are in the engine, so none
                # can finish first whatever order the connections arrive in.
                streams = [asyncio.create_task(stream()) for _ in range(4)]
                await until_active(4)
                await first.wait()
                plain = [asyncio.create_task(http.post(CHAT, json=long)) for _ in range(2)]
                await asyncio.wait_for(until_active(6), 10)
                holder["model"].armed = True
                done = await asyncio.wait_for(asyncio.gather(*streams), 30)
                return done, await asyncio.wait_for(asyncio.gather(*plain), 30)

        started = time.monotonic()
        streamed, plain = asyncio.run(run())
        ended_in = time.monotonic() - started
        # A stream that was still waiting for batch room has sent nothing yet (its status line
        # waits for its first token), so it gets the error as its status: 503 engine_dead. The
        # ones under way end with the error event, then [DONE].
        for status, events in streamed:
            if status == 503:
                error = events
            else:
                assert events[-1] == "data: [DONE]", events[-3:]
                error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "engine_dead" and "injected fault" in error["message"]
        assert sum(status == 200 for status, _ in streamed) >= 1
        for response in plain:
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_dead"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        again = httpx.post(url + CHAT, json=long, timeout=10)
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
        assert ended_in < 30
    assert not server.engine.alive and isinstance(server.engine.error, RuntimeError)


# -- SIGTERM ------------------------------------------------------------------------------
def test_sigterm_during_10_streams_refuses_new_requests_finishes_the_rest(tiny_hf_checkpoint):
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 400, "temperature": 0}
    with ServerProcess(tiny_hf_checkpoint) as server:
        url = server.base_url

        async def run() -> tuple[list[list[str]], Any]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                started = [asyncio.Event() for _ in range(10)]

                async def one(i: int) -> list[str]:
                    events = []
                    async with http.stream("POST", CHAT, json=body) as response:
                        async for line in response.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line)
                                if '"content": ""' not in line:
                                    started[i].set()
                    return events

                tasks = [asyncio.create_task(one(i)) for i in range(10)]
                await asyncio.gather(*(e.wait() for e in started))
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                async with httpx.AsyncClient(base_url=url, timeout=10) as fresh:
                    try:
                        late: Any = await fresh.post(CHAT, json={**body, "stream": False})
                    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                        # Refused by the socket: closed before connecting, or a connection still
                        # in the listen backlog when the listener closed (reset, no answer).
                        late = exc
                return await asyncio.gather(*tasks), late

        streams, late = asyncio.run(run())
        if isinstance(late, httpx.Response):  # got in before the listening socket closed
            assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
            assert late.json()["error"]["code"] == "engine_overloaded"
        for events in streams:
            assert events[-1] == "data: [DONE]"
            last = json.loads(events[-2].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
        log = server.log()
        assert "Traceback" not in log and "shutting down" in log


# -- all MLX work on the engine thread ----------------------------------------------------
@contextmanager
def mlx_calls_by_thread() -> Iterator[dict[str, int]]:
    """Wrap every function of mlx.core (and mlx.core.fast, .random, .linalg) to count calls per
    thread name. Arrays' methods and operators are not seen; the functions the model, the cache
    and the sampler call (matmul, rope, attention, eval, ...) are."""
    seen: dict[str, int] = {}
    lock = threading.Lock()
    patched: list[tuple[Any, str, Any]] = []

    def wrap(fn: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            name = threading.current_thread().name
            with lock:
                seen[name] = seen.get(name, 0) + 1
            return fn(*args, **kwargs)

        return spy

    for module in (mx, mx.fast, mx.random, mx.linalg):
        for attr in dir(module):
            fn = getattr(module, attr)
            if attr.startswith("_") or isinstance(fn, type) or not callable(fn):
                continue
            patched.append((module, attr, fn))
            setattr(module, attr, wrap(fn))
    try:
        yield seen
    finally:
        for module, attr, fn in patched:
            setattr(module, attr, fn)


def test_all_mlx_work_happens_on_the_engine_thread(tiny_hf_checkpoint):
    app = create_app(tiny_config(tiny_hf_checkpoint))
    with mlx_calls_by_thread() as seen:
        with ThreadServer(app) as server:  # the model loads inside, on the engine thread
            url = server.base_url
            with httpx.Client(base_url=url, timeout=60) as http:
                assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 4}).is_success
                assert http.post(
                    CHAT,
                    json={
                        "messages": MESSAGES,
                        "max_tokens": 4,
                        "n": 3,
                        "logprobs": True,
                        "top_logprobs": 2,
                        "temperature": 0.7,
                        "seed": 1,
                        "presence_penalty": 1,
                    },
                ).is_success
                streamed = http.post(
                    CHAT, json={"messages": MESSAGES, "max_tokens": 4, "stream": True}
                )
                assert streamed.text.endswith("data: [DONE]\n\n")
                assert http.post(
                    "/v1/completions",
                    json={"prompt": [1, 415, 2936], "max_tokens": 3, "logprobs": 2},
                ).is_success
            request = stream_request({"messages": MESSAGES, "max_tokens": 500}, server.port)
            read_one_chunk_and_close(server.port, request)  # a cancel
            wait_for(lambda: server.engine.num_active == 0, 10, "the cancel")
        probe = threading.Thread(target=lambda: mx.eval(mx.zeros((1,))), name="probe")
        probe.start()
        probe.join()
    assert seen.pop("probe") >= 2  # the spy sees calls from any thread
    print(f"MLX calls by thread: {seen}")
    assert set(seen) == {ENGINE_THREAD} and seen[ENGINE_THREAD] > 100


# -- shutdown past the drain timeout, queued requests, slow readers (issue 19, 7 and 8) -------
def open_stream(port: int, body: dict[str, Any], path: str = CHAT, rcvbuf: int = 0) -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(60)
    sock.sendall(stream_request(body, port, path))
    return sock


def test_sigterm_past_the_drain_timeout_ends_every_stream_with_an_error_then_done(
    tiny_hf_checkpoint,
):
    """Streams still running when --drain-timeout 0.5 runs out (a fraction: not truncated to
    0) end, in both dialects, with the error event, `[DONE]` and the chunked terminator."""
    chat = {"messages": MESSAGES, "n": 8, "max_tokens": 1900, "temperature": 1.0}
    text = {"prompt": "Once upon a time", "n": 8, "max_tokens": 1900, "temperature": 1.0}
    with ServerProcess(tiny_hf_checkpoint, "--drain-timeout", "0.5") as server:
        requests = [(CHAT, chat), ("/v1/completions", text)] * 2
        answers = [RawResponse(open_stream(server.port, b, path)) for path, b in requests]
        for answer in answers:
            assert answer.read_head().startswith(b"HTTP/1.1 200"), answer.head
        readers = [threading.Thread(target=a.read_body) for a in answers]
        for reader in readers:
            reader.start()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(30)
        assert server.proc.wait(30) == 0
        log = server.log()
    ended = sorted(a.ended_at - signalled for a in answers)
    print(f"streams ended {ended[0]:.2f}-{ended[-1]:.2f}s after SIGTERM (--drain-timeout 0.5)")
    for answer in answers:
        answer.sock.close()
        assert answer.complete, answer.body[-300:]
        events = answer.events()
        assert events[-1] == "data: [DONE]", events[-2:]
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_overloaded" and "drain time ran out" in error["message"]
    assert 0.4 < ended[0] and ended[-1] < 5
    assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log


def test_sigterm_refuses_queued_requests_at_once_with_503(tiny_hf_checkpoint):
    """With one batch place: a running stream and two requests waiting for it (a stream and a
    plain one). SIGTERM answers the two waiting at once with 503 + Retry-After (the stream too:
    its status waited for its first token), while the running one finishes."""
    long = {"messages": MESSAGES, "max_tokens": 500, "temperature": 0}
    args = ("--max-batch", "1", "--drain-timeout", "60")
    with ServerProcess(tiny_hf_checkpoint, *args) as server:
        running = RawResponse(open_stream(server.port, long))
        assert running.read_head().startswith(b"HTTP/1.1 200")
        queued_stream = RawResponse(open_stream(server.port, long))
        plain = json.dumps({**long, "max_tokens": 5}).encode()
        plain_sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        plain_sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % len(plain) + plain
        )
        queued_plain = RawResponse(plain_sock)
        wait_for(lambda: active(server.base_url) == 3, 10, "both requests to queue")
        reader = threading.Thread(target=running.read_body)
        reader.start()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for queued in (queued_stream, queued_plain):
            queued.read_body()
            assert queued.complete and queued.status == 503, queued.head + queued.body
            assert int(queued.header("retry-after")) >= 1
            error = json.loads(queued.body)["error"]
            assert error["code"] == "engine_overloaded" and "had not started" in error["message"]
        refused_after = time.monotonic() - signalled
        reader.join(60)
        finished_after = running.ended_at - signalled
        assert server.proc.wait(30) == 0
        log = server.log()
    print(
        f"queued refused {refused_after:.2f}s after SIGTERM; running ended at {finished_after:.2f}s"
    )
    assert refused_after < 2 and refused_after < finished_after
    events = running.events()
    assert running.complete and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in log


def test_slow_steady_reader_is_served_to_the_end(tiny_hf_checkpoint):
    """A client reading steadily at ~40 KB/s gets all of a ~400 KB answer, though the model
    outruns it and what it made takes longer than the 4 s send timeout to read: the timeout
    measures reading that stopped (less than 64 KiB in the timeout), not reading that is slow.
    Kernel buffers of 16 KiB on each side, so the server's own buffering is what counts."""
    body = {
        "messages": MESSAGES,
        "max_tokens": 300,
        "temperature": 1.0,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 20,
    }
    app = create_app(tiny_config(tiny_hf_checkpoint, send_timeout_seconds=4))
    with ThreadServer(app, sndbuf=16384) as server:
        socket_ = open_stream(server.port, body, rcvbuf=16384)
        answer = RawResponse(socket_, pace=0.0375, read_size=1500)
        reading = time.monotonic()
        answer.read_body()
        took = time.monotonic() - reading
    rate = len(answer.body) / took / 1000
    print(f"slow reader: {len(answer.body)} bytes in {took:.1f}s ({rate:.1f} KB/s)")
    events = answer.events()
    assert answer.complete and events[-1] == "data: [DONE]", events[-2:]
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert len(answer.body) > 4 * rate * 1000 * 2 and rate < 50


def test_stalled_readers_hold_bounded_memory_and_count_against_the_queue(tiny_hf_checkpoint):
    """Three clients that stop reading while their long answers are made: the engine finishes
    them, and what waits for each reader is merged text, not an event object per token (kernel
    buffers of 16 KiB, so the answers stay in the server). RSS is printed for the record, not
    asserted: in this process it also moves with whatever ran before.
    The three unread answers fill max_queue 3: a fourth request is a 503 until they go."""
    body = {"messages": MESSAGES, "n": 16, "max_tokens": 400, "temperature": 1.0, "seed": 5}
    quick = {"messages": MESSAGES, "max_tokens": 2}
    config = tiny_config(tiny_hf_checkpoint, max_queue=3, send_timeout_seconds=300)
    app = create_app(config)
    pid = os.getpid()  # the server runs in this process
    with ThreadServer(app, sndbuf=16384) as server:
        warm = RawResponse(open_stream(server.port, body))  # allocator pools, prefix cache
        warm.read_body()
        assert warm.complete
        gc.collect()
        baseline = rss_kib(pid)
        stalled = [open_stream(server.port, body, rcvbuf=4096) for _ in range(3)]
        try:
            for sock in stalled:
                assert sock.recv(12) == b"HTTP/1.1 200"  # its generation is under way
            started = time.monotonic()
            wait_for(lambda: server.engine.num_active == 0, 120, "the engine to finish them")
            made_in = time.monotonic() - started
            gc.collect()
            held = rss_kib(pid)
            growth = (held - baseline) / 1024
            # What waits for the three readers: merged past 256 events, one per choice.
            unread = [len(handle._backlog) for handle in list(server.engine._unread)]
            print(
                f"3 stalled readers (16 x 400 tokens each, made in {made_in:.1f}s): RSS "
                f"{baseline / 1024:.0f} -> {held / 1024:.0f} MiB ({growth:+.1f} MiB); "
                f"events held per reader: {unread}"
            )
            assert len(unread) == 3 and max(unread) <= 256 + 16 + 1, unread  # + the end
            refused = httpx.post(server.base_url + CHAT, json=quick, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "engine_overloaded"
        finally:
            for sock in stalled:
                sock.close()
        wait_for(
            lambda: httpx.post(server.base_url + CHAT, json=quick, timeout=30).status_code == 200,
            10,
            "the queue places to be given back",
        )
