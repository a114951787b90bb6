"""The HTTP layer under hostile clients (issue 19, items 2, 3 and 9), on raw sockets.

An HTTP client would hide what these tests look at (how many bytes were sent before the
answer, whether the server closed the connection, a half-close, duplicate headers), so each
one speaks HTTP/1.1 by hand to a real server process:
- size: a long request target is 414, a large head 431, both in the API's JSON error shape
  and before the Host check and the key; an endless header is refused while it streams in;
- time: a silent connection, a slow head, a stalled body and an idle keep-alive connection
  are each closed (the head with a 408) and logged;
- shape: duplicate or malformed Host headers are 400, an absolute-form target naming another
  host is 403, parser errors are JSON; /health tells a caller without the key only that the
  server is up; a client that half-closes after its request still gets its response;
- the key: --api-key-file, and a warning when the key is on the command line.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_process import ServerProcess

KEY = "k3y-for-http-tests"
AUTH = f"Authorization: Bearer {KEY}\r\n"
IDLE, HEADER, BODY = 0.5, 1.5, 1.0
CHAT_BODY = json.dumps(
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
).encode()


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint,
        "--api-key",
        KEY,
        "--idle-timeout",
        str(IDLE),
        "--header-timeout",
        str(HEADER),
        "--body-timeout",
        str(BODY),
    ) as proc:
        yield proc
        assert proc.alive and "Traceback" not in proc.log(), proc.log()


def connect(server: ServerProcess, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(everything read, whether the server closed the connection within `timeout`)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def exchange(server: ServerProcess, request: bytes, *, timeout: float = 10.0) -> bytes:
    with connect(server) as sock:
        sock.sendall(request)
        data, _ = read_until_closed(sock, timeout)
        return data


def json_error(raw: bytes, status: int) -> dict:
    """The error object of a raw response, after checking its status and the API's shape."""
    assert raw, "no response"
    got, headers, body = parse(raw)
    assert got == status, raw[:500]
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- size ------------------------------------------------------------------------------------
def test_a_long_request_target_is_414_before_host_and_key(server):
    # Foreign Host, no key: the size limit answers first, in JSON.
    request = b"GET /v1/models?q=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    assert json_error(exchange(server, request), 414)["code"] == "uri_too_long"


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"b" * 40_000 + b"\r\n",  # one large header
        b"".join(b"X-%d: v\r\n" % i for i in range(5_000)),  # many small ones
    ],
    ids=["one-large", "many-small"],
)
def test_large_headers_are_431_before_host_and_key(server, headers):
    request = b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\n" + headers + b"\r\n"
    assert json_error(exchange(server, request), 431)["code"] == "headers_too_large"


def test_headers_just_under_the_limit_are_served(server):
    headers = b"X-Big: " + b"b" * 30_000 + b"\r\n"
    request = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + AUTH.encode() + headers
    got, _, _ = parse(exchange(server, request + b"Connection: close\r\n\r\n"))
    assert got == 200


def test_an_endless_header_is_refused_while_it_streams(server):
    """20 MiB of one header line, never ended: the server answers 431 after about its limit
    (today it buffers all of it and never answers), and its memory does not grow by it."""
    rss_before = _rss_kib(server.proc.pid)
    piece, limit, sent = b"h" * 65536, 20 * 2**20, 0
    answer = b""
    with connect(server) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        try:
            while sent < limit:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed) mid-header
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, closed = read_until_closed(sock, 3)
    assert answer, f"no answer after {sent} bytes of header"
    assert json_error(answer, 431)["code"] == "headers_too_large"
    assert closed and sent < limit / 2, sent  # the kernel's buffers hold a few MiB at most
    if rss_before is not None:
        growth_mib = (_rss_kib(server.proc.pid) - rss_before) / 1024
        assert growth_mib < 8, growth_mib


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None  # no /proc (macOS): the answer is still checked


# -- time ------------------------------------------------------------------------------------
def wait_for_log(server: ServerProcess, words: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [ln for ln in server.log().splitlines() if words in ln]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no log line with {words!r}:\n{server.log()[-2000:]}")


def test_a_silent_connection_is_closed_and_logged(server):
    with connect(server) as sock:
        started = time.monotonic()
        data, closed = read_until_closed(sock, IDLE + 3)
        assert closed and data == b"", data
        assert time.monotonic() - started < IDLE + 2
        port = sock.getsockname()[1]
    line = wait_for_log(server, f":{port}: no request within")
    assert "--idle-timeout" in line


def test_slow_headers_get_408_and_are_logged(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(int(HEADER / 0.2) + 10):  # one byte every 0.2 s: never idle, never done
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.sendall(b"X")
        data, closed = read_until_closed(sock, 3)
        assert closed and json_error(data, 408)["code"] == "request_timeout"
        assert time.monotonic() - started < HEADER + 2
        port = sock.getsockname()[1]
    assert "--header-timeout" in wait_for_log(server, f":{port}: request headers incomplete")


def test_a_stalled_body_is_closed_and_logged(server):
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{AUTH}"
        f"Content-Type: application/json\r\nContent-Length: {len(CHAT_BODY)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head + CHAT_BODY[:10])  # then nothing
        started = time.monotonic()
        _, closed = read_until_closed(sock, BODY + 3)
        assert closed and time.monotonic() - started < BODY + 2
        port = sock.getsockname()[1]
    assert "--body-timeout" in wait_for_log(server, f":{port}: no request body bytes")


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b'"status"' not in data:
            data += sock.recv(65536)
        assert parse(data)[0] == 200
        started = time.monotonic()
        _, closed = read_until_closed(sock, IDLE + 3)  # uvicorn's own default is 5 s
        assert closed and time.monotonic() - started < IDLE + 2


# -- shape -----------------------------------------------------------------------------------
def test_two_host_headers_are_400(server):
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
    assert json_error(exchange(server, request), 400)["code"] == "invalid_host"


@pytest.mark.parametrize(
    "host",
    [
        "[::1]evil.example",
        "localhost:evil",
        "localhost:8200@evil.example",
        "localhost:99999",
        "[::1",
        "[evil.example]",
        "localhost evil.example",
    ],
)
def test_malformed_host_values_are_400(server, host):
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n{AUTH}\r\n".encode()
    assert json_error(exchange(server, request), 400)["code"] == "invalid_host"


@pytest.mark.parametrize(
    "target",
    ["http://evil.example/v1/models", "http://localhost@evil.example/v1/models"],
)
def test_an_absolute_target_naming_another_host_is_refused(server, target):
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{AUTH}\r\n".encode()
    status = parse(exchange(server, request))[0]
    assert status in (400, 403), status


def test_an_absolute_target_naming_this_host_is_served(server):
    request = (
        f"GET http://localhost:{server.port}/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
        f"{AUTH}Connection: close\r\n\r\n"
    ).encode()
    assert parse(exchange(server, request))[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nNo colon here\r\n\r\n",
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: localhost\r\n\r\n",
    ],
)
def test_parser_errors_are_json(server, request_bytes):
    assert json_error(exchange(server, request_bytes), 400)["type"] == "invalid_request_error"


def test_health_details_need_the_key(server):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(server.url("/health"), headers=wrong).json() == {"status": "ok"}
    detailed = httpx.get(server.url("/health"), headers={"Authorization": f"Bearer {KEY}"})
    assert set(detailed.json()) == {
        "status",
        "model",
        "active",
        "loaded",
        "dtype",
        "memory",
        "responses_store",
        "unloads_at",
    }


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_gets_its_response(server, stream):
    body = CHAT_BODY if not stream else CHAT_BODY[:-1] + b', "stream": true}'
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{AUTH}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with connect(server) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # `nc -N`: done sending, still reading
        data, closed = read_until_closed(sock, 30)
    assert closed and parse(data)[0] == 200, data[:500]
    assert (b"data: [DONE]" in data) if stream else (b'"finish_reason"' in data)


# -- the key -------------------------------------------------------------------------------
def test_a_key_on_the_command_line_is_warned_about(server):
    assert "--api-key is visible" in server.log()


def test_the_key_file(tiny_hf_checkpoint, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with ServerProcess(tiny_hf_checkpoint, "--api-key-file", str(key_file)) as proc:
        assert httpx.get(proc.url("/v1/models")).status_code == 401
        ok = httpx.get(proc.url("/v1/models"), headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert "--api-key is visible" not in proc.log()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--api-key-file", "/nonexistent/key"], "--api-key-file"),
        (["--api-key", "k", "--api-key-file", "/dev/null"], "not both"),
        (["--idle-timeout", "0"], "--idle-timeout"),
        (["--header-timeout", "inf"], "--header-timeout"),
        (["--max-header-bytes", "10"], "--max-header-bytes"),
        (["--allowed-hosts", "localhost:8200@evil.example"], "--allowed-hosts"),
    ],
)
def test_bad_flags_are_refused_at_start_up(tiny_hf_checkpoint, args, words):
    argv = [sys.executable, "-m", "mlx_mistral.server", "--model", str(tiny_hf_checkpoint)]
    result = subprocess.run(
        [*argv, "--port", "0", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("mlx-mistral serve: error:") and words in lines[0]
