"""The bundled demo model behind a real server, through the official openai client: the answers
mean something (held-out phrasings, "Hello!", a tool round trip), streaming and not give the
same text, and the 4-bit demo model served alongside agrees with the float one.

Greedy decoding (temperature 0) throughout; the questions of a test go out concurrently, so the
server decodes them as one batch. The held-out items are `training.corpus.eval_items()`, the
ones `tests/test_demo_model.py` checks on the library directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import mlx_mistral
from mlx_mistral.chat import render_tool_calls
from mlx_mistral.tokenizer import Tokenizer
from tests.server_process import ServerProcess
from training.corpus import GREETING, TOOLS, eval_items, is_correct

DEMO_4BIT_DIR = mlx_mistral.demo_model_path().parent / "demo_model_4bit"
MAX_TOKENS = 48  # the longest expected answer (a tool call) is under 48 tokens
CALL_ID = re.compile(r"call_[A-Za-z0-9]{9}")
ITEMS = eval_items()


def serve(model: Path) -> ServerProcess:
    return ServerProcess(model, "--max-batch", "64", "--max-queue", "128")


@pytest.fixture(scope="module")
def server():
    with serve(mlx_mistral.demo_model_path()) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def server_4bit():
    with serve(DEMO_4BIT_DIR) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0, timeout=60)


def model_name(server: ServerProcess) -> str:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="k").models.list().data[0].id


def body(item: Any, **extra: Any) -> dict[str, Any]:
    """A greedy chat request for one eval item (its tools offered with tool_choice "auto")."""
    request = {"messages": item.messages, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}
    if item.tools:
        request["tools"] = item.tools
    return request


def ask_all(server: ServerProcess, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every request at once; each answer comes back as {text, calls, finish_reason}
    (streamed ones accumulated from their chunks)."""
    name = model_name(server)

    async def one(aclient: openai.AsyncOpenAI, request: dict[str, Any]) -> dict[str, Any]:
        if not request.get("stream"):
            answer = await aclient.chat.completions.create(model=name, **request)
            (choice,) = answer.choices
            calls = [
                {"name": c.function.name, "arguments": c.function.arguments, "id": c.id}
                for c in choice.message.tool_calls or []
            ]
            return {
                "text": choice.message.content or "",
                "calls": calls,
                "finish_reason": choice.finish_reason,
            }
        text, calls, finish = "", {}, None
        async for chunk in await aclient.chat.completions.create(model=name, **request):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                for part in choice.delta.tool_calls or []:
                    call = calls.setdefault(part.index, {"name": "", "arguments": "", "id": None})
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
                    call["id"] = part.id or call["id"]
                finish = choice.finish_reason or finish
        return {"text": text, "calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}

    async def run() -> list[dict[str, Any]]:
        async with openai.AsyncOpenAI(
            base_url=server.url("/v1"), api_key="k", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(one(aclient, r) for r in requests))

    return asyncio.run(run())


def as_text(answer: dict[str, Any], call_id: str | None = None) -> str:
    """The answer as the model wrote it: its content, or its calls in the chat format (with
    `call_id` in place of the ids, which the server's grammar writes, not the model)."""
    if not answer["calls"]:
        return answer["text"]
    return render_tool_calls(
        [
            {
                "id": call_id or c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in answer["calls"]
        ]
    )


def is_right(item: Any, answer: dict[str, Any]) -> bool:
    """A finished answer (not cut at max_tokens) with what the item expects; a call item must
    make exactly one call."""
    if item.topic == "tool_call":
        return (
            answer["finish_reason"] == "tool_calls"
            and len(answer["calls"]) == 1
            and is_correct(item, as_text(answer))
        )
    return (
        answer["finish_reason"] == "stop"
        and not answer["calls"]
        and is_correct(item, answer["text"])
    )


@pytest.fixture(scope="module")
def float_answers(server):
    return ask_all(server, [body(it) for it in ITEMS])


def test_held_out_phrasings_are_answered_right(float_answers):
    by_topic: dict[str, list[bool]] = {}
    for item, answer in zip(ITEMS, float_answers):
        by_topic.setdefault(item.topic, []).append(is_right(item, answer))
    wrong = [
        (it.messages[-1]["content"], as_text(a))
        for it, a in zip(ITEMS, float_answers)
        if not is_right(it, a)
    ]
    right = sum(sum(v) for v in by_topic.values())
    print(
        f"held-out phrasings: {right}/{len(ITEMS)} right ("
        + ", ".join(f"{t} {sum(v)}/{len(v)}" for t, v in by_topic.items())
        + ")"
    )
    assert len(ITEMS) >= 40 and set(by_topic) >= {
        "add",
        "capital",
        "convert",
        "tool_call",
        "tool_result",
    }
    assert right / len(ITEMS) >= 0.9, f"{right}/{len(ITEMS)} right; wrong: {wrong}"


def test_streaming_gives_the_same_answers(server):
    # One item of each topic; both forms of each go out together, in one batch.
    picked = list({it.topic: it for it in ITEMS}.values())
    answers = ask_all(
        server, [body(it) for it in picked] + [body(it, stream=True) for it in picked]
    )
    whole, streamed = answers[: len(picked)], answers[len(picked) :]
    assert any(a["calls"] for a in whole)
    for item, w, s in zip(picked, whole, streamed):
        assert s["text"] == w["text"], item.messages
        assert [(c["name"], c["arguments"]) for c in s["calls"]] == [
            (c["name"], c["arguments"]) for c in w["calls"]
        ]
        assert s["finish_reason"] == w["finish_reason"]
        assert all(CALL_ID.fullmatch(c["id"]) for c in s["calls"] + w["calls"])


def test_4bit_agrees_with_float_on_greedy_tokens(float_answers, server_4bit):
    """Each answer is tokenized (calls rendered with one fixed id) plus `</s>` when it ended;
    the tokens that agree are the common prefix of the two greedy answers (after the first
    difference, greedy decodes go separate ways), out of the longer answer's tokens."""
    tokenizer = Tokenizer.from_dir(mlx_mistral.demo_model_path())
    q4_answers = ask_all(server_4bit, [body(it) for it in ITEMS])

    def tokens(answer: dict[str, Any]) -> list[int]:
        ended = answer["finish_reason"] != "length"
        return tokenizer.encode(as_text(answer, "call_000000000")) + [tokenizer.eos_id] * ended

    same = total = 0
    for f, q in zip(float_answers, q4_answers):
        a, b = tokens(f), tokens(q)
        prefix = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += prefix
        total += max(len(a), len(b))
    print(f"4-bit vs float: {same}/{total} greedy tokens agree")
    assert total > 500
    assert same / total >= 0.95, f"4-bit agrees on {same}/{total} greedy tokens"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
def test_contract_hello_curl_gets_a_greeting(server):
    from tests.test_server_curl import HELLO, run_curl  # the contract's command, verbatim

    answer = json.loads(run_curl(server, HELLO))
    (choice,) = answer["choices"]
    assert choice["message"]["content"].strip() == GREETING
    assert choice["finish_reason"] == "stop"


def test_serve_without_a_model_serves_the_demo_and_says_so(tmp_path):
    """The README's run command on a machine without Mistral-7B: `serve` with no --model and
    nothing in the caches serves the demo model, says so, and the contract's Hello! is greeted."""
    from tests.test_server_curl import HELLO, run_curl

    empty = {
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MLX_MISTRAL_MODEL": None,
        "HF_HUB_CACHE": None,
        "HUGGINGFACE_HUB_CACHE": None,
    }
    with ServerProcess(None, env=empty) as proc:
        assert "Mistral-7B-Instruct-v0.2 was not found on this machine" in proc.log()
        assert "serving the bundled demo model" in proc.log()
        (model,) = httpx.get(proc.url("/v1/models")).json()["data"]
        assert model["demo"] is True, model
        answer = json.loads(run_curl(proc, HELLO))
        assert answer["choices"][0]["message"]["content"].strip() == GREETING
        assert "Traceback" not in proc.log()


def test_weather_tool_round_trip(client, server):
    name = model_name(server)
    messages = [{"role": "user", "content": "What is the weather like in Tokyo?"}]
    first = client.chat.completions.create(
        model=name,
        messages=messages,
        tools=[TOOLS["get_weather"]],
        tool_choice="auto",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and CALL_ID.fullmatch(call.id)
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}

    conversation = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature": 18, "condition": "sunny"}),
        },
    ]
    second = client.chat.completions.create(
        model=name,
        messages=conversation,
        tools=[TOOLS["get_weather"]],
        tool_choice="auto",
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    (final,) = second.choices
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "18" in final.message.content and "sunny" in final.message.content, final.message.content


def test_calls_close_after_any_forced_id(server):
    """The grammar writes a random id into every call (seeded per request here); the model must
    close the call array after it rather than start a second call (parallel_tool_calls is on)."""
    item = next(it for it in ITEMS if it.topic == "tool_call")
    answers = ask_all(server, [body(item, seed=seed) for seed in range(24)])
    ids = {a["calls"][0]["id"] for a in answers if a["calls"]}
    assert len(ids) == 24  # each seed forced a different id
    closed = [a["finish_reason"] == "tool_calls" and len(a["calls"]) == 1 for a in answers]
    assert all(closed), [as_text(a) for a, ok in zip(answers, closed) if not ok]
