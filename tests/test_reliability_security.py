"""Security of a local server: who may reach it, and what a request may make it touch.

tests/test_server_errors.py covers the basics (a foreign Host is 403, a wrong key 401, CORS
for one configured origin, 0.0.0.0 refused without a key). Here:
- DNS rebinding: the Host check runs before everything else (auth, body limit, routing, CORS
  preflight, the handlers), and no foreign Origin ever gets Access-Control-Allow-Origin;
- exposure: every non-loopback bind is refused without a key, allowed by a key or the flag;
- path traversal and SSRF: `../`, absolute paths, `%2e%2e`, NUL, file:// and http:// URLs in
  every string field never reach the file system or the network (watched three ways: a
  Python audit hook, a FIFO that notices any open from any language, a loopback listener
  that notices any connection);
- no template engine: a model directory carrying a hostile Jinja chat_template, and template
  syntax in messages, never get rendered; no template engine is even imported.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.parse
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

import mlx_mistral
from mlx_mistral.server import ServerConfig, create_app
from mlx_mistral.server.cli import add_arguments, build_config
from tests.server_process import ServerProcess

KEY = "k3y-for-tests"
ORIGIN = "http://allowed.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
REPO = Path(mlx_mistral.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint, "--api-key", KEY, "--cors-origins", ORIGIN, "--max-body-bytes", "4096"
    ) as proc:
        yield proc
        assert proc.alive and "Traceback" not in proc.log()


# -- DNS rebinding ------------------------------------------------------------------------
FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8000",
    "localhost.evil.example",
    "127.0.0.1.nip.io",
    "127.0.0.2",
    "0.0.0.0",
    "[::2]:80",
    "localhost.",
    "xn--localhost-8x2c",
    "allowed.example",
    # mDNS: any machine on the LAN may answer for a .local name, 127.0.0.1 included.
    "myhost.local",
    "printer.local:8000",
    # Names that only look like the private ones: a public name ending in them, the bare TLD,
    # the absolute (trailing-dot) form.
    "host.docker.internal.evil.example",
    "internal",
    "gateway.internal.",
    "app.localhost.",
    "a..localhost",
]

# Names only this machine can send: a container reaching its host (Open WebUI in Docker), any
# *.internal name (ICANN's private-use TLD: never in public DNS, so a page cannot rebind to it),
# and RFC 6761's *.localhost, which browsers resolve to loopback without asking DNS.
LOCAL_ONLY_HOSTS = [
    "host.docker.internal",
    "host.docker.internal:8000",
    "gateway.docker.internal",
    "host.containers.internal:11434",
    "HOST.DOCKER.INTERNAL",
    "evil.internal",
    "docker.internal",
    "gateway.internal",
    "app.localhost",
    "openwebui.localhost:3000",
]

# (method, path, headers, body): requests that, past the Host check, would each get a
# different answer: 200 from a handler, 401 from the key check, 413 from the body limit,
# 404/405 from the router, a CORS preflight answer.
BEFORE_EVERYTHING = {
    "handler": ("POST", CHAT, AUTH, json.dumps(GOOD).encode()),
    "auth": ("POST", CHAT, {}, json.dumps(GOOD).encode()),
    "body-limit": ("POST", CHAT, AUTH, b"x" * 10_000),
    "router-404": ("GET", "/nothing/here", AUTH, b""),
    "router-405": ("DELETE", CHAT, AUTH, b""),
    "preflight": (
        "OPTIONS",
        CHAT,
        {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        b"",
    ),
    "health": ("GET", "/health", {}, b""),
    "openapi": ("GET", "/openapi.json", AUTH, b""),
}


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
@pytest.mark.parametrize("what", list(BEFORE_EVERYTHING))
def test_foreign_host_is_403_before_anything_else_runs(server, host, what):
    method, path, headers, body = BEFORE_EVERYTHING[what]
    response = httpx.request(
        method,
        server.url(path),
        content=body or None,
        headers={**headers, "Host": host, "Content-Type": "application/json"},
    )
    assert response.status_code == 403, (what, response.status_code, response.text)
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("host", LOCAL_ONLY_HOSTS)
def test_container_and_localhost_names_are_served(server, host):
    response = httpx.post(server.url(CHAT), json=GOOD, headers={**AUTH, "Host": host})
    assert response.status_code == 200, response.text
    # The key is still needed: the name only passes the DNS-rebinding check.
    refused = httpx.post(server.url(CHAT), json=GOOD, headers={"Host": host})
    assert refused.status_code == 401


def test_refused_hosts_never_reach_the_engine(server):
    """The access log shows the refused requests with no token counts: no generation ran."""
    for host in FOREIGN_HOSTS:
        assert (
            httpx.post(server.url(CHAT), json=GOOD, headers={**AUTH, "Host": host}).status_code
            == 403
        )
    refused = [line for line in server.log().splitlines() if f'"POST {CHAT}" 403' in line]
    assert len(refused) >= len(FOREIGN_HOSTS)
    assert not any("prompt=" in line for line in refused)


FOREIGN_ORIGINS = [
    "http://evil.example",
    "null",
    "http://allowed.example.evil.example",
    "http://allowed.example:8080",
    "https://allowed.example",
    "http://localhost:3000",
    "file://",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_foreign_origin_never_gets_allow_origin(server, origin):
    headers = {**AUTH, "Origin": origin}
    answers = [
        httpx.post(server.url(CHAT), json=GOOD, headers=headers),  # 200
        httpx.post(server.url(CHAT), json={**GOOD, "stream": True}, headers=headers),  # SSE
        httpx.post(server.url(CHAT), json={"messages": 1}, headers=headers),  # 400
        httpx.get(server.url("/v1/models/nope"), headers=headers),  # 404
        httpx.post(server.url(CHAT), json=GOOD, headers={"Origin": origin}),  # 401
        httpx.options(
            server.url(CHAT),
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        ),
    ]
    assert [a.status_code for a in answers][:5] == [200, 200, 400, 404, 401]
    for answer in answers:
        assert "access-control-allow-origin" not in answer.headers, answer.headers
        assert "access-control-allow-credentials" not in answer.headers


def test_no_cors_at_all_by_default(tiny_hf_checkpoint):
    config = ServerConfig(model=str(tiny_hf_checkpoint), model_name="tiny")
    with TestClient(create_app(config), base_url="http://127.0.0.1") as http:
        for origin in [ORIGIN, "http://localhost:8000", "http://127.0.0.1"]:
            preflight = http.options(
                CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
            )
            assert preflight.status_code == 204  # answered, granting nothing
            answer = http.post(CHAT, json=GOOD, headers={"Origin": origin})
            assert answer.status_code == 200
            for response in (preflight, answer):
                assert not any(h.startswith("access-control-") for h in response.headers)


def test_a_preflight_without_cors_is_answered_without_granting_access(tiny_hf_checkpoint):
    """A real server started without --cors-origins (and with a key: the preflight carries
    none): 204, no Access-Control-Allow-* header, and the browser refuses the call itself."""
    with ServerProcess(tiny_hf_checkpoint, "--api-key", KEY) as proc:
        preflight = httpx.options(
            proc.url(CHAT),
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204 and preflight.content == b""
        assert not any(h.startswith("access-control-") for h in preflight.headers)
        # Not a preflight (no Origin): still the router's 405; a foreign Host: still 403.
        assert httpx.options(proc.url(CHAT), headers=AUTH).status_code == 405
        foreign = httpx.options(
            proc.url(CHAT),
            headers={
                "Host": "evil.example",
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
            },
        )
        assert foreign.status_code == 403


# -- exposure -----------------------------------------------------------------------------
def _config(*argv: str) -> ServerConfig:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_config(parser.parse_args(["--model", str(REPO), *argv]))


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "[::]", "127.0.0.1.nip.io"]
)
def test_non_loopback_bind_needs_a_key_or_the_flag(host):
    with pytest.raises(mlx_mistral.errors.InvalidRequestError) as info:
        _config("--host", host, "--api-key", "")
    assert info.value.param == "--api-key"
    with pytest.raises(mlx_mistral.errors.InvalidRequestError) as info:
        _config("--host", host)
    assert info.value.param == "--host"
    assert "--allow-public" in info.value.message and "--api-key" in info.value.message
    assert _config("--host", host, "--api-key", KEY).api_key == KEY
    assert _config("--host", host, "--allow-public").allow_public


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.8.9.10"])
def test_loopback_binds_need_no_key(host):
    assert _config("--host", host).api_key is None


def test_the_key_from_the_environment_counts(monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_API_KEY", KEY)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the default is read when the flags are declared
    config = build_config(parser.parse_args(["--model", str(REPO), "--host", "0.0.0.0"]))
    assert config.api_key == KEY


@pytest.mark.parametrize(
    "path", [CHAT, "/v1/completions", "/v1/models", "/v1/models/x", "/openapi.json", "/v1/nothing"]
)
@pytest.mark.parametrize(
    "auth",
    [None, "Bearer", f"Bearer {KEY[:-1]}", f"bearer{KEY}", f"Token {KEY}", f"Bearer {KEY} extra"],
)
def test_every_path_but_health_needs_the_key(server, path, auth):
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    response = httpx.post(
        server.url(path) + f"?api_key={KEY}", content=b"{not json", headers=headers
    )
    assert response.status_code == 401, (path, auth, response.text)
    assert response.json()["error"]["type"] == "authentication_error"


# -- nothing a request says becomes a path or a URL ------------------------------------------
class Tripwires:
    """Notices the server touching a canary path or address, by any means.

    - a Python audit hook flags any audited event (open, os.*, socket.*, urllib, subprocess,
      compile ...) whose arguments mention the canary or a passwd file;
    - the canary path is a FIFO: any process opening it for reading, from any language,
      releases a writer thread that counts the open;
    - a loopback listener counts every connection made to it.
    """

    def __init__(self, root: Path):
        self.mark = f"mlxcanary{os.getpid()}"
        self.fifo = root / self.mark / "passwd"
        self.fifo.parent.mkdir()
        os.mkfifo(self.fifo)
        self.events: list[tuple[str, tuple]] = []
        self.fifo_opens = 0
        self.connections = 0
        self.armed = False
        self._stop = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.settimeout(0.2)
        sys.addaudithook(self._audit)
        self._threads = [
            threading.Thread(target=self._watch_fifo, daemon=True),
            threading.Thread(target=self._listen, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _audit(self, event: str, args: tuple) -> None:
        if not self.armed or event.startswith(("sys._getframe", "object.", "cpython.")):
            return
        flat = []
        for arg in args:
            flat.extend(arg if isinstance(arg, tuple) else (arg,))
        for arg in flat:
            if isinstance(arg, os.PathLike):
                arg = os.fspath(arg)
            if isinstance(arg, bytes):
                arg = arg.decode("latin-1")
            if isinstance(arg, str) and (self.mark in arg or "passwd" in arg or "win.ini" in arg):
                self.events.append((event, args))

    def _watch_fifo(self) -> None:
        while not self._stop:
            fd = os.open(self.fifo, os.O_WRONLY)  # blocks until somebody opens it to read
            if not self._stop:
                self.fifo_opens += 1
            try:
                os.write(fd, b"{}")
            except OSError:
                pass
            os.close(fd)

    def _listen(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def payloads(self) -> list[str]:
        fifo = str(self.fifo)
        relative = os.path.relpath(fifo, os.getcwd())
        return [
            fifo,
            relative,
            "../" * 12 + "etc/passwd",
            "/etc/passwd",
            "%2e%2e%2f" * 12 + urllib.parse.quote(relative, safe=""),
            "..%2f..%2f..%2fetc%2fpasswd",
            "%2e%2e/%2e%2e/etc/passwd",
            fifo + "\x00.safetensors",
            "\x00" + relative,
            "a\x00/../../etc/passwd",
            "file://" + fifo,
            f"http://127.0.0.1:{self.port}/{self.mark}",
            f"http://{self.mark}.invalid/x.json",
            "~/../../etc/passwd",
            "..\\..\\..\\windows\\win.ini",
            "\\\\127.0.0.1\\share\\passwd",
        ]

    def close(self) -> None:
        self._stop = True
        self.armed = False
        reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)  # releases the writer
        self._threads[0].join(5)
        os.close(reader)
        self.listener.close()
        self._threads[1].join(5)


def _requests_with(value: str) -> list[tuple[str, str, dict]]:
    """(where, path, body): the payload in every string field of both endpoints."""
    user = {"role": "user", "content": "Hi"}
    ref_schema = {"type": "object", "properties": {"a": {"$ref": value}}}
    return [
        ("model", CHAT, {**GOOD, "model": value}),
        ("content", CHAT, {**GOOD, "messages": [{"role": "user", "content": value}]}),
        (
            "content-part",
            CHAT,
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": value}]}]},
        ),
        (
            "image-part",
            CHAT,
            {
                **GOOD,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": value}}],
                    }
                ],
            },
        ),
        ("system", CHAT, {**GOOD, "messages": [{"role": "system", "content": value}, user]}),
        ("name", CHAT, {**GOOD, "messages": [{**user, "name": value}]}),
        ("role", CHAT, {**GOOD, "messages": [{"role": value, "content": "Hi"}]}),
        (
            "tool_call_id",
            CHAT,
            {
                **GOOD,
                "messages": [
                    user,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": value,
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": value, "content": value},
                ],
            },
        ),
        ("stop", CHAT, {**GOOD, "stop": value}),
        ("stop-list", CHAT, {**GOOD, "stop": [value]}),
        ("user", CHAT, {**GOOD, "user": value}),
        ("metadata", CHAT, {**GOOD, "metadata": {"path": value}}),
        ("logit_bias-key", CHAT, {**GOOD, "logit_bias": {value: 1}}),
        ("seed", CHAT, {**GOOD, "seed": value}),
        ("unknown-field", CHAT, {**GOOD, value: 1}),
        ("tool-name", CHAT, {**GOOD, "tools": [{"type": "function", "function": {"name": value}}]}),
        (
            "tool-description",
            CHAT,
            {
                **GOOD,
                "tools": [{"type": "function", "function": {"name": "f", "description": value}}],
            },
        ),
        (
            "tool-$ref",
            CHAT,
            {
                **GOOD,
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": ref_schema}}
                ],
            },
        ),
        (
            "tool-$id",
            CHAT,
            {
                **GOOD,
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "$id": value,
                                "type": "object",
                                "properties": {"a": {"$ref": "#"}},
                            },
                        },
                    }
                ],
            },
        ),
        (
            "tool_choice",
            CHAT,
            {**GOOD, "tool_choice": {"type": "function", "function": {"name": value}}},
        ),
        (
            "json_schema-$ref",
            CHAT,
            {
                **GOOD,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": ref_schema},
                },
            },
        ),
        (
            "json_schema-name",
            CHAT,
            {
                **GOOD,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": value, "schema": {"type": "object"}},
                },
            },
        ),
        ("response_format-type", CHAT, {**GOOD, "response_format": {"type": value}}),
        ("prompt", "/v1/completions", {"prompt": value, "max_tokens": 2}),
        ("prompt-list", "/v1/completions", {"prompt": [value], "max_tokens": 2}),
        ("completion-model", "/v1/completions", {"prompt": "a", "model": value}),
        ("suffix", "/v1/completions", {"prompt": "a", "suffix": value}),
    ]


@pytest.fixture(scope="module")
def tripwires(tmp_path_factory):
    wires = Tripwires(tmp_path_factory.mktemp("canary"))
    yield wires
    wires.close()


def test_no_field_becomes_a_path_or_a_url(tiny_hf_checkpoint, tripwires):
    # Strict names: a model field is then looked up, which is where a path could be opened.
    config = ServerConfig(model=str(tiny_hf_checkpoint), model_name="tiny", strict_model_names=True)
    statuses: dict[int, int] = {}
    with TestClient(create_app(config), base_url="http://127.0.0.1") as http:
        tripwires.armed = True
        for value in tripwires.payloads():
            for where, path, body in _requests_with(value):
                response = http.post(path, json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (where, value, response.text)
                if where.endswith("model"):
                    error = response.json()["error"]
                    assert response.status_code == 404 and error["code"] == "model_not_found"
            quoted = urllib.parse.quote(value, safe="")
            for url in (f"/v1/models/{quoted}", f"/v1/models/{value.lstrip('/')}"):
                if "\x00" in url or "\\" in url:
                    continue
                response = http.get(url)
                assert response.status_code == 404, (url, response.text)
        tripwires.armed = False
    assert tripwires.events == []
    assert tripwires.fifo_opens == 0 and tripwires.connections == 0
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0


def test_the_tripwires_fire(tripwires):
    """The watchers above can fail: opening the canary or connecting to it is noticed."""
    opens, connections = tripwires.fifo_opens, tripwires.connections
    tripwires.armed = True
    try:
        with open(tripwires.fifo, "rb") as f:
            f.read()
        socket.create_connection(("127.0.0.1", tripwires.port), timeout=5).close()
    finally:
        tripwires.armed = False
    for _ in range(50):
        if tripwires.fifo_opens > opens and tripwires.connections > connections:
            break
        threading.Event().wait(0.05)
    assert tripwires.fifo_opens > opens and tripwires.connections == connections + 1
    assert any(event == "open" for event, _ in tripwires.events)
    tripwires.events.clear()


# -- no template engine ---------------------------------------------------------------------
HOSTILE_TEMPLATE = (
    "{% for m in messages %}{{ m.content }}{% endfor %}"
    "{{ cycler.__init__.__globals__.os.system('touch SENTINEL') }}"
)

CHILD = textwrap.dedent("""
    import json, sys
    import mlx_mistral
    from mlx_mistral.server import ServerConfig, create_app
    from starlette.testclient import TestClient

    model, messages = sys.argv[1], json.loads(sys.argv[2])
    config = ServerConfig(model=model, model_name="tiny")
    out = {}
    with TestClient(create_app(config), base_url="http://127.0.0.1") as http:
        answer = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        out["status"] = answer.status_code
        out["prompt_tokens"] = answer.json()["usage"]["prompt_tokens"]
        out["expected"] = len(http.app.state.server.engine.tokenizer.encode_chat(messages))
        text = http.post("/v1/completions", json={"prompt": messages[-1]["content"],
                                                 "max_tokens": 2})
        out["text_status"] = text.status_code
    out["modules"] = sorted(m for m in sys.modules
                            if m.split(".")[0] in ("jinja2", "mako", "chevron", "pystache",
                                                   "django", "tornado", "genshi", "cheetah"))
    print(json.dumps(out))
""")


def test_no_template_engine_renders_anything(tiny_hf_checkpoint, tmp_path):
    """A checkpoint whose tokenizer_config.json has a hostile Jinja chat_template (as in
    llama-cpp-python's CVE-2024-34359) is served with the package's own v0.2 chat format;
    template syntax in a message is text. Run in a fresh interpreter so sys.modules shows what
    serving imported."""
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_hf_checkpoint.iterdir():
        (model / item.name).symlink_to(item)
    sentinel = tmp_path / "rendered"
    template = HOSTILE_TEMPLATE.replace("SENTINEL", str(sentinel))
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (model / "chat_template.jinja").write_text(template)
    messages = [
        {"role": "system", "content": "{{ 7*7 }} {% raw %}"},
        {"role": "user", "content": template + " ${7*7} #{7*7} <%= 7*7 %>"},
    ]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), json.dumps(messages)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == 200 and out["text_status"] == 200
    assert out["prompt_tokens"] == out["expected"]  # the template text was encoded as text
    assert out["modules"] == []
    assert not sentinel.exists()


TEMPLATE_USE = re.compile(
    r"^\s*(import|from)\s+(jinja2|mako|chevron|pystache|genshi)\b|apply_chat_template"
    r"|string\.Template|(?<![\w.])(eval|exec)\(",
    re.MULTILINE,
)


def test_the_package_source_uses_no_template_engine():
    sources = [*(REPO / "mlx_mistral").rglob("*.py"), *(REPO / "server").rglob("*.py")]
    assert len(sources) > 20
    found = {
        str(s.relative_to(REPO)): m.group(0)
        for s in sources
        if (m := TEMPLATE_USE.search(s.read_text(encoding="utf-8")))
    }
    assert found == {}
    assert TEMPLATE_USE.search("from jinja2 import Template") and not TEMPLATE_USE.search(
        "mx.eval(x)"
    )


@pytest.mark.parametrize(
    "path, escaped",
    [
        ("/v1/models/a%0aFORGED%20LINE", "/v1/models/a\\x0AFORGED LINE"),
        ("/v1/models/a%0d%0aFORGED", "/v1/models/a\\x0D\\x0AFORGED"),
        ("/v1/models/%1b[2J%1b]0;pwned%07", "/v1/models/\\x1B[2J\\x1B]0;pwned\\x07"),
        ("/v1/models/q%22%5c%c3%a9", "/v1/models/q\\x22\\x5C\\xC3\\xA9"),
    ],
)
def test_access_log_escapes_control_characters_in_the_path(server, path, escaped):
    """The decoded path goes to the log as nginx writes it (`\\xHH`): no forged line, no escape
    sequence for a terminal tailing the log."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        while sock.recv(65536):
            pass
    log = server.log()
    assert f'"GET {escaped}"' in log
    assert "\x1b" not in log and "\x07" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
