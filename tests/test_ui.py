"""The page at / in a real headless Chromium (the Debian package), against a real server.

Playwright drives /usr/bin/chromium (its own browser download is not used). Outside CI the
tests skip when that browser is missing; under CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlx_mistral.demo import demo_model_path
from tests.server_process import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
FOREIGN_HOST = "rebound.example"  # resolved to 127.0.0.1 by the browser, as DNS rebinding does

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs the chromium package", pytrace=False)
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install chromium) for the browser tests",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(demo_model_path()) as server:
        yield server


class Watched:
    """A page, with every console error, uncaught exception and failed request it met."""

    def __init__(self, browser):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on(
            "console",
            lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on(
            "response",
            lambda r: self.problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None,
        )

    def _failed(self, request) -> None:
        # Chromium's DevTools report a fetch body read to its end with a reader (our event
        # stream) as aborted once it was written in several pieces: the page got every byte
        # (its figures show the stream's last chunk), so a 200 stream counts as delivered.
        # A reload the test makes cancels what the old document still had in flight (its
        # icon, which the browser fetches on its own): aborted by navigation, not failed.
        response = request.response()
        streamed = response is not None and response.status == 200
        icon = request.url.endswith("/ui/icon.svg")
        if request.failure == "net::ERR_ABORTED" and (streamed or icon):
            return
        self.problems.append(f"failed: {request.url} {request.failure}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser) -> Iterator[Watched]:
    page = Watched(browser)
    yield page
    page.close()


def send(page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def last_answer(page):
    return page.locator("#messages li.assistant").last


def wait_for_idle(server: ServerProcess, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(server.url("/health")).json()
        if health["active"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_a_message_streams_in_with_its_figures_and_survives_a_reload(server, watched):
    page = watched.page
    page.goto(server.url("/"))
    sync_api.expect(page.locator("#model-badge")).to_contain_text("demo_model")
    sync_api.expect(page.get_by_role("button", name="Chat", exact=True)).to_have_attribute(
        "aria-pressed", "true"
    )
    send(page, "Hello")
    answer = last_answer(page)
    figures = answer.locator(".figures")
    sync_api.expect(figures).to_contain_text("finish: stop", timeout=30_000)
    for figure in ("first token", "tokens/s", "prompt", "cached", "generated"):
        sync_api.expect(figures).to_contain_text(figure)
    text = answer.locator(".content").inner_text()
    assert text.strip()
    assert page.locator("#messages li.user").last.inner_text().endswith("Hello")

    page.reload()
    sync_api.expect(last_answer(page).locator(".content")).to_have_text(text)
    sync_api.expect(last_answer(page).locator(".figures")).to_contain_text("finish: stop")
    stored = page.evaluate("localStorage.getItem('mlx-mistral.conversations')")
    assert "Hello" in stored
    assert watched.problems == []


def test_keyboard_regenerate_edit_and_a_refused_request(server, watched):
    page = watched.page
    page.goto(server.url("/"))
    page.get_by_role("button", name="New chat").click()
    box = page.get_by_role("textbox", name="Message")
    box.fill("Hello")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("there")
    assert box.input_value() == "Hello\nthere"
    assert page.locator("#messages li").count() == 0
    box.fill("Hello")
    box.press("Enter")
    figures = page.locator("#messages li.assistant .figures")
    sync_api.expect(figures).to_contain_text("finish: stop", timeout=30_000)

    page.get_by_role("button", name="Regenerate").click()
    sync_api.expect(figures).to_contain_text("finish: stop", timeout=30_000)
    assert page.locator("#messages li").count() == 2  # the answer replaced, not added

    assert watched.problems == []

    # A request the server refuses shows its error, naming the field; the question can then
    # be edited and sent again.
    page.get_by_text("Settings").click()
    page.get_by_role("spinbutton", name="Temperature").fill("5")
    send(page, "Hello again")
    sync_api.expect(page.locator("#chat-error")).to_contain_text("temperature")
    sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.get_by_role("spinbutton", name="Temperature").fill("0")
    page.get_by_role("button", name="Edit").click()
    assert box.input_value() == "Hello again"
    assert page.locator("#messages li").count() == 2
    box.press("Enter")
    sync_api.expect(figures.nth(1)).to_contain_text("finish: stop", timeout=30_000)
    sync_api.expect(page.locator("#chat-error")).to_be_empty()


def test_html_in_an_answer_is_shown_as_text_never_run(server, watched):
    page = watched.page
    page.goto(server.url("/"))
    payload = '<img src="/nothing" onerror="window.ran = 1"><script>window.ran = 2</script>'
    conversation = {
        "current": "c1",
        "conversations": [
            {
                "id": "c1",
                "title": "html",
                "messages": [
                    {"role": "user", "content": "show me html"},
                    {
                        "role": "assistant",
                        "content": f"Here:\n\n{payload}\n\n```html\n{payload}\n```",
                    },
                ],
            }
        ],
    }
    page.evaluate(
        "value => localStorage.setItem('mlx-mistral.conversations', value)",
        json.dumps(conversation),
    )
    page.reload()
    answer = last_answer(page)
    sync_api.expect(answer.locator(".content")).to_contain_text(f"Here:{payload}")
    sync_api.expect(answer.locator("pre code")).to_have_text(payload)
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.ran") is None
    assert watched.problems == []


def test_the_status_view_shows_the_model_and_its_chart_moves(server, watched):
    page = watched.page
    page.goto(server.url("/#status"))
    status = page.locator("#status-list")
    sync_api.expect(status).to_contain_text("demo_model")
    sync_api.expect(status).to_contain_text("bundled demo model")
    sync_api.expect(page.locator("#clients")).to_contain_text(server.url("/v1"))
    chart = page.locator("#rate-chart")
    before = int(chart.get_attribute("data-total") or 0)
    httpx.post(
        server.url("/v1/chat/completions"),
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20},
        timeout=60,
    ).raise_for_status()
    page.wait_for_function(
        "before => Number(document.getElementById('rate-chart').dataset.total) > before",
        arg=before,
        timeout=15_000,
    )
    assert "tokens/s" in chart.get_attribute("aria-label")
    assert watched.problems == []


def test_the_narrow_page_has_named_controls(server, browser):
    context = browser.new_context(viewport={"width": 360, "height": 640})
    page = context.new_page()
    try:
        page.goto(server.url("/"))
        page.get_by_text("Settings").click()
        for role, name in (
            ("textbox", "Message"),
            ("textbox", "System prompt"),
            ("spinbutton", "Top p"),
            ("combobox", "Conversation"),
            ("spinbutton", "Temperature"),
            ("spinbutton", "Max tokens"),
        ):
            sync_api.expect(page.get_by_role(role, name=name, exact=True)).to_be_attached()
        for name in ("Send", "Stop", "New chat", "Chat", "Status"):
            sync_api.expect(page.get_by_role("button", name=name, exact=True)).to_be_attached()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360
    finally:
        context.close()


def test_stop_ends_the_stream_and_frees_the_slot(tiny_hf_checkpoint, browser):
    # Greedy decoding of random weights never picks </s> here: the answer runs until stopped.
    with ServerProcess(tiny_hf_checkpoint) as server:
        page = Watched(browser).page
        page.goto(server.url("/"))
        page.locator("summary").click()
        page.get_by_label("Max tokens").fill("2000")
        page.get_by_label("Temperature").fill("0")
        send(page, "Count to a thousand")
        content = page.locator("#messages li.assistant .content").last
        sync_api.expect(content).not_to_be_empty(timeout=30_000)
        sync_api.expect(page.get_by_role("button", name="Stop")).to_be_enabled()
        page.keyboard.press("Escape")
        sync_api.expect(last_answer(page).locator(".figures")).to_contain_text(
            "finish: stopped", timeout=15_000
        )
        assert wait_for_idle(server)["active"] == 0
        sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_with_an_api_key_the_page_asks_for_it_and_the_api_stays_closed(browser):
    with ServerProcess(demo_model_path(), "--api-key", "sesame") as server:
        watched = Watched(browser)
        page = watched.page
        page.goto(server.url("/"))
        sync_api.expect(page.get_by_role("heading", name="API key")).to_be_visible()
        assert page.locator("#chat-view").is_hidden()
        assert page.locator("#status-view").is_hidden()
        for path in ("/v1/status", "/v1/models"):
            assert httpx.get(server.url(path)).status_code == 401
        refused = httpx.post(
            server.url("/v1/chat/completions"),
            json={"messages": [{"role": "user", "content": "x"}]},
        )
        assert refused.status_code == 401
        # Without an Accept: text/html, `/` stays the API's (Ollama's probe, behind the key).
        assert httpx.get(server.url("/")).status_code == 401

        page.get_by_role("textbox", name="Key").fill("wrong")
        page.get_by_role("textbox", name="Key").press("Enter")
        sync_api.expect(page.locator("#key-error")).to_contain_text("refused")
        page.get_by_role("textbox", name="Key").fill("sesame")
        page.get_by_role("button", name="Use key").click()
        sync_api.expect(page.locator("#model-badge")).to_contain_text("demo_model")
        assert page.evaluate("sessionStorage.getItem('mlx-mistral.api-key')") == "sesame"
        assert page.evaluate("localStorage.getItem('mlx-mistral.api-key')") is None
        send(page, "Hello")
        sync_api.expect(last_answer(page).locator(".figures")).to_contain_text(
            "finish: stop", timeout=30_000
        )
        watched.close()


def test_a_foreign_host_gets_the_page_refused_like_the_api(server, watched):
    page = watched.page
    port = server.base_url.rsplit(":", 1)[1]
    response = page.goto(f"http://{FOREIGN_HOST}:{port}/")
    assert response.status == 403
    assert "--allowed-hosts" in page.content()
    assert "<script" not in page.content()
    asset = page.goto(f"http://{FOREIGN_HOST}:{port}/ui/app.js")
    assert asset.status == 403


def test_the_page_headers_forbid_inline_code_and_framing(server):
    for path in ("/", "/ui/app.js", "/ui/style.css"):
        response = httpx.get(server.url(path), headers={"Accept": "text/html"})
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(server.url("/ui/missing.js")).status_code == 404
    assert httpx.get(server.url("/")).text == "Ollama is running"


def test_no_ui_gives_the_old_root(browser):
    with ServerProcess(demo_model_path(), "--no-ui") as server:
        browser_answer = httpx.get(server.url("/"), headers={"Accept": "text/html"})
        assert browser_answer.text == "Ollama is running"
        assert httpx.get(server.url("/ui/app.js")).status_code == 404
        assert httpx.get(server.url("/v1/status")).status_code == 200
