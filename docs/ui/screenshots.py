"""Take the page's screenshots in docs/ui/ (chat and status, light and dark).

Run from the repository root: `python docs/ui/screenshots.py` (needs /usr/bin/chromium, or
another Chromium given as the first argument, and `pip install playwright`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlx_mistral.demo import demo_model_path  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

OUT = Path(__file__).resolve().parent
VIEWPORT = {"width": 720, "height": 560}


def main(chromium: str = "/usr/bin/chromium") -> None:
    with ServerProcess(demo_model_path()) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        for scheme in ("light", "dark"):
            page = browser.new_page(viewport=VIEWPORT, color_scheme=scheme)
            page.goto(server.url("/"))
            for question in ("Hello", "What is the capital of France?"):
                box = page.get_by_role("textbox", name="Message")
                box.fill(question)
                box.press("Enter")
                answer = page.locator("#messages li.assistant .figures").last
                expect(answer).to_contain_text("finish:", timeout=60_000)
            page.screenshot(path=OUT / f"chat-{scheme}.png")
            httpx.post(
                server.url("/v1/chat/completions"),
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40},
                timeout=60,
            )
            page.get_by_role("button", name="Status", exact=True).click()
            expect(page.locator("#status-list")).to_contain_text("demo")
            page.wait_for_timeout(2500)  # one refresh: the chart shows the last request
            page.screenshot(path=OUT / f"status-{scheme}.png")
            page.close()
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
