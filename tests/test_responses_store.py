"""The Responses store's memory against real server processes: bounded in bytes (counted in
/health and /metrics), input items refused for unknown keys and bad or duplicate ids as OpenAI
refuses them, and a `reasoning` item's summary never kept."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


def respond(server: ServerProcess, input: Any, **extra: Any) -> httpx.Response:
    body = {"model": "m", "input": input, "max_output_tokens": 2, **extra}
    return httpx.post(server.url("/v1/responses"), json=body, timeout=120)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize(
    "item, param",
    [
        ({"role": "user", "content": "hi", "colour": "red"}, "input[0].colour"),
        (
            {"type": "message", "role": "user", "content": "hi", "extra": [1] * 100},
            "input[0].extra",
        ),
        (
            {"type": "function_call_output", "call_id": "c", "output": "5", "blob": "x"},
            "input[0].blob",
        ),
        ({"type": "reasoning", "summary": [], "notes": "x" * 1000}, "input[0].notes"),
    ],
)
def test_an_unknown_key_on_an_input_item_is_refused(tiny, item, param):
    answer = respond(tiny, [item, {"role": "user", "content": "hi"}])
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == "unknown_parameter"
    assert param in error["message"]


@pytest.mark.parametrize("bad_id", [5, {"a": 1}, ["msg_1"], "", "m" * 100_000])
def test_an_input_item_id_must_be_a_short_string(tiny, bad_id):
    answer = respond(tiny, [{"role": "user", "content": "hi", "id": bad_id}])
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "input[0].id"
    assert len(answer.text) < 1000  # the id is named, not echoed


def test_a_null_id_is_named_by_the_server_and_duplicates_are_refused(tiny):
    kept = respond(tiny, [{"role": "user", "content": "hi", "id": None}])
    assert kept.status_code == 200, kept.text
    listed = httpx.get(tiny.url(f"/v1/responses/{kept.json()['id']}/input_items")).json()
    assert listed["first_id"].startswith("msg_") and listed["first_id"] == listed["last_id"]
    twice = [
        {"role": "user", "content": "hi", "id": "msg_1"},
        {"role": "assistant", "content": "hello", "id": "msg_1"},
        {"role": "user", "content": "again"},
    ]
    answer = respond(tiny, twice)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "input"
    assert error["message"].startswith("Duplicate item found with id msg_1.")


def test_the_store_is_bounded_in_bytes_and_counted(tiny_hf_checkpoint):
    limit = 20_000
    with ServerProcess(tiny_hf_checkpoint, "--responses-store-size", str(limit)) as server:
        text = "the quick brown fox jumps over the lazy dog " * 70  # ~3 KB, ~700 tokens
        ids = []
        for i in range(6):
            answer = respond(server, f"{i} {text}")
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["id"])
        store = httpx.get(server.url("/health")).json()["responses_store"]
        assert store["limit_bytes"] == limit and 0 < store["bytes"] <= limit
        assert 1 <= store["responses"] < 6
        assert httpx.get(server.url(f"/v1/responses/{ids[-1]}")).status_code == 200
        assert httpx.get(server.url(f"/v1/responses/{ids[0]}")).status_code == 404
        metrics = httpx.get(server.url("/metrics")).text
        assert f"mlx_mistral_responses_store_bytes {float(store['bytes'])}" in metrics
        assert "Traceback" not in server.log()


def test_reasoning_summaries_are_not_kept(tiny):
    """The attack that grew a server by 1.9 GiB: large reasoning summaries, never tokenized,
    kept verbatim by every stored response. 20 requests of 6 MB would hold 120 MB."""
    summary = [{"type": "summary_text", "text": "x" * (6 * 2**20)}]
    respond(tiny, [{"type": "reasoning", "summary": summary}, {"role": "user", "content": "a"}])
    before = rss_bytes(tiny.proc.pid)
    for _ in range(20):
        item = {"type": "reasoning", "id": "rs_1", "summary": summary, "encrypted_content": None}
        answer = respond(tiny, [item, {"role": "user", "content": "hi"}])
        assert answer.status_code == 200, answer.text
    grown = rss_bytes(tiny.proc.pid) - before
    assert grown < 40 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"
    listed = httpx.get(tiny.url(f"/v1/responses/{answer.json()['id']}/input_items")).json()
    assert listed["data"][-1] == {"id": "rs_1", "type": "reasoning", "summary": []}
    store = httpx.get(tiny.url("/health")).json()["responses_store"]
    assert store["bytes"] < 2**20
