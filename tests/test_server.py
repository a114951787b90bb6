"""The server against the official openai client and httpx: shapes, sampling, streaming, load.

One real server process (uvicorn, tiny random checkpoint) serves the whole module. Outputs are
compared with the library's own `generate` on the same checkpoint, so a sampling field the
server dropped or changed shows up as a different text.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from starlette.testclient import TestClient

import mlx_mistral
from mlx_mistral.batch import TokenEvent
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.sampling.sampler import TokenLogprobs
from mlx_mistral.server import ServerConfig, create_app
from mlx_mistral.server.openai_writers import ChatCompletionWriter, CompletionWriter
from mlx_mistral.server.schemas import LogprobFormatter
from mlx_mistral.server.streaming import Served, with_keepalive
from tests.server_process import ServerProcess

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
TOKEN_O = 28709  # the piece "o": a logit bias on it shows plainly in the text


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="any-token", max_retries=0)


@pytest.fixture(scope="module")
def name(tiny_hf_checkpoint):
    return tiny_hf_checkpoint.name


def library(tiny_model, **kwargs) -> str:
    model, tokenizer = tiny_model
    prompt = kwargs.pop("prompt", MESSAGES)
    params = SamplingParams(**{"max_tokens": 8, **kwargs})
    return mlx_mistral.generate(model, tokenizer, prompt, params=params)


def test_health_and_models(server, client, name):
    health = httpx.get(server.url("/health")).json()
    assert {k: health.pop(k) for k in ("status", "model", "active")} == {
        "status": "ok",
        "model": name,
        "active": 0,
    }
    assert set(health) == {"loaded", "dtype", "memory", "responses_store", "unloads_at"}
    models = client.models.list()
    assert [m.id for m in models.data] == [name]
    card = models.data[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "mlx-mistral"
    assert card["demo"] is False and card["context_length"] == 2048
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion_shape_and_greedy_text(client, name, tiny_model):
    start = int(time.time())
    answer = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0, max_tokens=8
    )
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", answer.id)
    assert answer.object == "chat.completion" and answer.model == name
    assert start - 1 <= answer.created <= time.time() + 1
    (choice,) = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == library(tiny_model, temperature=0)
    assert choice.finish_reason == "length"
    prompt_tokens = len(tiny_model[1].encode_chat(MESSAGES))
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == prompt_tokens + 8
    assert answer.usage.model_dump()["estimated_cost"] == 0
    # Deterministic at temperature 0; the served path and the upstream name are accepted.
    for model in ("mistralai/Mistral-7B-Instruct-v0.2", name):
        again = client.chat.completions.create(
            model=model, messages=MESSAGES, temperature=0, max_tokens=8
        )
        assert again.choices[0].message.content == choice.message.content


def _stream(client, name, **kwargs):
    return list(
        client.chat.completions.create(model=name, messages=MESSAGES, stream=True, **kwargs)
    )


def test_streaming_matches_non_streaming(client, name, tiny_model):
    chunks = _stream(client, name, temperature=0, max_tokens=8)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == name for c in chunks)
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert last.choices[0].finish_reason == "length"
    assert last.choices[0].delta.content is None and last.choices[0].delta.role is None
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content for c in middle)
    assert text == library(tiny_model, temperature=0)


def test_streaming_include_usage(client, name, tiny_model):
    chunks = _stream(
        client, name, temperature=0, max_tokens=5, stream_options={"include_usage": True}
    )
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 5
    assert usage_chunk.usage.prompt_tokens == len(tiny_model[1].encode_chat(MESSAGES))
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 5
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    body = {
        "messages": MESSAGES,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = httpx.post(f"{client.base_url}chat/completions", json=body, timeout=30).text
    events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1]) and events[-1]["usage"]


GREEDY = {"temperature": 0}
SAMPLED = {"temperature": 1.0, "seed": 3}
BIASED = {"temperature": 0, "logit_bias": {TOKEN_O: 1.0}}

# (request fields, the same for the library, the library call it must differ from)
SAMPLING_CASES = {
    "logit_bias": ({"temperature": 0, "logit_bias": {str(TOKEN_O): 1.0}}, BIASED, GREEDY),
    "presence_penalty": (
        {"temperature": 0, "logit_bias": {str(TOKEN_O): 1.0}, "presence_penalty": 2.0},
        {**BIASED, "presence_penalty": 2.0},
        BIASED,
    ),
    "frequency_penalty": (
        {"temperature": 0, "logit_bias": {str(TOKEN_O): 1.0}, "frequency_penalty": 2.0},
        {**BIASED, "frequency_penalty": 2.0},
        BIASED,
    ),
    "repetition_penalty": (
        {"temperature": 0, "repetition_penalty": 0.5},
        {**GREEDY, "repetition_penalty": 0.5},
        GREEDY,
    ),
    "repeat_penalty": (
        {"temperature": 0, "repeat_penalty": 0.5},
        {**GREEDY, "repetition_penalty": 0.5},
        GREEDY,
    ),
    "temperature+seed": (SAMPLED, SAMPLED, GREEDY),
    "seed": ({"temperature": 1.0, "seed": 4}, {"temperature": 1.0, "seed": 4}, SAMPLED),
    "top_k": ({**SAMPLED, "top_k": 1}, {**SAMPLED, "top_k": 1}, SAMPLED),
    "top_p": ({**SAMPLED, "top_p": 0.001}, {**SAMPLED, "top_p": 0.001}, SAMPLED),
    "min_p": ({**SAMPLED, "min_p": 1.0}, {**SAMPLED, "min_p": 1.0}, SAMPLED),
    "max_completion_tokens": (
        {"temperature": 0, "max_completion_tokens": 3},
        {**GREEDY, "max_tokens": 3},
        GREEDY,
    ),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_field_reaches_the_sampler(client, name, tiny_model, case):
    fields, same, other = SAMPLING_CASES[case]
    expected = library(tiny_model, **same)
    assert expected != library(tiny_model, **other), "the field has no effect to check"
    standard = {
        k: v
        for k, v in fields.items()
        if k
        in (
            "temperature",
            "seed",
            "top_p",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "max_completion_tokens",
        )
    }
    extra = {k: v for k, v in fields.items() if k not in standard}
    kwargs = {} if "max_completion_tokens" in fields else {"max_tokens": 8}
    answer = client.chat.completions.create(
        model=name, messages=MESSAGES, extra_body=extra, **standard, **kwargs
    )
    assert answer.choices[0].message.content == expected


def test_stop_string_ends_the_text_and_never_shows(client, name, tiny_model):
    full = library(tiny_model, temperature=0, max_tokens=12)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = _stream(client, name, temperature=0, max_tokens=12, stop=[stop, "zzzz"])
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            answer = client.chat.completions.create(
                model=name, messages=MESSAGES, temperature=0, max_tokens=12, stop=stop
            )
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert text == expected and stop not in text and finish == "stop"


def test_n_choices(client, name):
    answer = client.chat.completions.create(
        model=name, messages=MESSAGES, n=3, seed=5, temperature=1.0, max_tokens=6
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) == 3  # one RNG stream per choice
    assert answer.usage.completion_tokens == 18
    chunks = _stream(client, name, n=3, seed=5, temperature=1.0, max_tokens=6)
    texts = {i: "" for i in range(3)}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in answer.choices]


def test_logprobs_shape(client, name, tiny_model):
    answer = client.chat.completions.create(
        model=name, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == 4
    tokenizer = tiny_model[1]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert entry.logprob == pytest.approx(tops[0])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert (
        "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).strip()
        == answer.choices[0].message.content.strip()
    )
    chunks = _stream(client, name, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert tokenizer.vocab_size == 32000


def test_completions_endpoint(client, name, tiny_model):
    answer = client.completions.create(
        model=name, prompt="Once upon a time", temperature=0, max_tokens=6, logprobs=2
    )
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    expected = library(tiny_model, prompt="Once upon a time", temperature=0, max_tokens=6)
    choice = answer.choices[0]
    assert choice.text == expected and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(tiny_model[1].encode("Once upon a time", bos=True))
    assert len(choice.logprobs.tokens) == 6 and len(choice.logprobs.top_logprobs[0]) == 2
    # text_offset counts characters of the returned text, where each token's text begins.
    offsets = choice.logprobs.text_offset
    # The text continues the prompt: the first token's leading space is kept, as OpenAI does.
    first = choice.logprobs.tokens[0]
    assert choice.text.startswith(first) or "\ufffd" in first, (choice.text, first)
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    stream = list(
        client.completions.create(
            model=name,
            prompt=["Once upon a time"],
            temperature=0,
            max_tokens=6,
            stream=True,
            logprobs=2,
        )
    )
    assert "".join(c.choices[0].text for c in stream) == expected
    assert stream[-1].choices[0].finish_reason == "length"
    streamed = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs]
    assert [o for lp in streamed for o in lp.text_offset] == offsets
    assert [t for lp in streamed for t in lp.tokens] == choice.logprobs.tokens
    starts = [0]
    for chunk in stream:  # each chunk's offset is the text streamed before it
        if chunk.choices[0].logprobs:
            assert chunk.choices[0].logprobs.text_offset[0] == starts[-1]
        starts.append(starts[-1] + len(chunk.choices[0].text))


def _sse_lines(body: str) -> list[str]:
    return [line for line in body.split("\n\n") if line.strip()]


def test_disconnect_mid_stream_frees_the_engine(server):
    # As many tokens as the tiny model's context holds: how many are made before the server
    # sees the client go depends on how soon the client gets a core to close its socket.
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 2000, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url("/v1/chat/completions"), json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-accel-buffering"] == "no"
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    break
        # Leaving the `with` closes the connection mid-stream.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if http.get(server.url("/health")).json()["active"] == 0:
                break
            time.sleep(0.02)
        assert http.get(server.url("/health")).json()["active"] == 0
    # The access log shows the stream stopped long before its 2,000 tokens.
    deadline = time.monotonic() + 5
    while "client-disconnected" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = [ln for ln in server.log().splitlines() if "client-disconnected" in ln][-1]
    generated = int(re.search(r"completion=(\d+)", line).group(1))
    assert generated < 1000, line
    assert "Traceback" not in server.log() and "ERROR" not in server.log()


async def _one_stream(http: httpx.AsyncClient, url: str, content: str) -> str:
    body = {
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
    }
    response = await http.post(url, json=body)
    assert response.status_code == 200
    events = _sse_lines(response.text)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(e.startswith("data: ") for e in events)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_32_concurrent_streams(server, tiny_model):
    prompts = [f"Question number {i}?" for i in range(4)]
    url = server.url("/v1/chat/completions")

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(
                *(_one_stream(http, url, prompts[i % 4]) for i in range(32))
            )

    texts = asyncio.run(run())
    # No cross-talk: each stream equals its prompt's greedy answer computed alone.
    expected = [
        library(tiny_model, prompt=[{"role": "user", "content": p}], temperature=0) for p in prompts
    ]
    assert texts == [expected[i % 4] for i in range(32)]
    assert httpx.get(server.url("/health")).json()["active"] == 0


def test_hostile_bodies_leave_the_server_serving(server, client, name):
    huge_nesting = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (huge_nesting, b"\xc3\x28", b"null"):
        response = httpx.post(
            server.url("/v1/chat/completions"),
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_sigterm_lets_streams_finish_then_exits_cleanly(tiny_hf_checkpoint):
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 300, "temperature": 0}
    with ServerProcess(tiny_hf_checkpoint) as server:
        url = server.url("/v1/chat/completions")

        async def run() -> list[list[str]]:
            async with httpx.AsyncClient(timeout=60) as http:
                started = [asyncio.Event() for _ in range(3)]

                async def one(i: int) -> list[str]:
                    events = []
                    async with http.stream("POST", url, json=body) as response:
                        async for line in response.aiter_lines():
                            if line.startswith("data: "):
                                events.append(line)
                                started[i].set()
                    return events

                tasks = [asyncio.create_task(one(i)) for i in range(3)]
                for event in started:  # every stream is in flight before the signal
                    await event.wait()
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        for events in asyncio.run(run()):
            assert events[-1] == "data: [DONE]"
            assert (
                json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
                == "length"
            )
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url("/health"))
        log = server.log()
        assert "Traceback" not in log and "shutting down" in log


def test_keepalive_while_waiting_for_the_first_token():
    """Keep-alives while the first token is awaited; after it, items pass straight through
    (tokens come every step, and a timer per token would cost the event loop more)."""

    async def slow_then_fast():
        await asyncio.sleep(0.25)  # a long prefill
        yield "a"
        await asyncio.sleep(0.15)
        yield "b"

    async def collect():
        return [item async for item in with_keepalive(slow_then_fast(), 0.05)]

    items = asyncio.run(collect())
    assert items[-2:] == ["a", "b"] and set(items[:-2]) == {None} and len(items) >= 3


def test_keepalive_closes_the_stream_it_wraps():
    """A client that leaves mid-stream closes the wrapper, and the wrapper closes the engine's
    event stream at once (whose close cancels the request), not when it is collected."""
    closed = []

    async def tokens():
        try:
            yield "a"
            yield "b"
            yield "c"
        finally:
            closed.append("tokens")

    async def read_two_then_leave():
        stream = with_keepalive(tokens(), 10)
        items = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return items, list(closed)

    assert asyncio.run(read_two_then_leave()) == (["a", "b"], ["tokens"])


def test_a_batch_of_events_becomes_one_chunk_per_choice():
    """When several tokens of a choice arrive together, they go out as one chunk: the same
    text, every token's logprobs in order, and the finish chunk after the content."""
    writer = ChatCompletionWriter(
        Served("m", (0.0, 0.0), LogprobFormatter([b"a", b"b", b"c"])),
        SamplingParams(n=2, logprobs=True),
        include_usage=False,
        stats={},
    )

    def event(index: int, token: int, finish: str | None = None) -> TokenEvent:
        return TokenEvent(0, index, "abc"[token], token, finish, TokenLogprobs(token, -0.5 * token))

    batches = [[event(0, 0), event(1, 2), event(0, 1)], [event(1, 1), event(0, 2, "length")]]

    async def stream() -> AsyncIterator[list[TokenEvent]]:
        for batch in batches:
            yield batch

    async def collect() -> list[dict]:
        return [
            json.loads(chunk[6:])
            async for chunk in writer.sse(stream())
            if chunk != b"data: [DONE]\n\n"
        ]

    chunks = [c["choices"][0] for c in asyncio.run(collect())][2:]  # after the two role chunks
    summary = [
        (
            c["index"],
            c["delta"].get("content"),
            c["finish_reason"],
            [e["token"] for e in (c.get("logprobs") or {}).get("content", [])],
        )
        for c in chunks
    ]
    assert summary == [
        (0, "ab", None, ["a", "b"]),
        (1, "c", None, ["c"]),  # first batch: one chunk per choice
        (0, "c", None, ["c"]),
        (0, None, "length", []),  # a finishing choice goes out at once
        (1, "b", None, ["b"]),
    ]


def test_completion_text_offsets_count_the_decoded_text_streamed_or_not():
    """A byte-fallback pair decodes to one character, emitted with the second byte: offsets
    count the text the client gets, the same in one body and in the stream."""
    pieces = [b"\xc3", b"\xa9", b" ok"]  # raw pieces: "\ufffd", "\ufffd", " ok"
    texts = ["", "\u00e9", " ok"]  # what the detokenizer emits for each token

    def writer() -> CompletionWriter:
        return CompletionWriter(
            Served("m", (0.0, 0.0), LogprobFormatter(pieces)),
            SamplingParams(logprobs=True),
            include_usage=False,
            stats={},
        )

    def events() -> list[TokenEvent]:
        return [
            TokenEvent(
                0, 0, text, token, "length" if token == 2 else None, TokenLogprobs(token, -1.0)
            )
            for token, text in enumerate(texts)
        ]

    async def one_body() -> dict:
        async def source():
            for event in events():
                yield event

        return await writer().collect(source())

    async def streamed() -> list[dict]:
        async def source():
            for event in events():
                yield [event]

        return [json.loads(c[6:]) async for c in writer().sse(source()) if c.startswith(b"data: {")]

    body = asyncio.run(one_body())["choices"][0]
    assert body["text"] == "\u00e9 ok"
    assert body["logprobs"]["text_offset"] == [0, 0, 1]
    chunks = [
        c["choices"][0]["logprobs"] for c in asyncio.run(streamed()) if c["choices"][0]["logprobs"]
    ]
    assert [o for lp in chunks for o in lp["text_offset"]] == [0, 0, 1]


def test_create_app_loads_the_model_in_its_lifespan(tiny_hf_checkpoint):
    config = ServerConfig(
        model=str(tiny_hf_checkpoint), model_name="tiny", allowed_hosts=("testserver",)
    )
    app = create_app(config)
    with TestClient(app) as http:
        assert http.get("/health").json()["status"] == "ok"
        answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny"
        assert http.get("/health", headers={"Host": "evil.example"}).status_code == 403
    assert not app.state.server.engine.alive  # stopped by the lifespan


def test_engine_stopping_mid_stream_sends_an_error_event_then_done(tiny_hf_checkpoint):
    config = ServerConfig(
        model=str(tiny_hf_checkpoint), model_name="tiny", allowed_hosts=("testserver",)
    )
    app = create_app(config)
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 1500}
    with TestClient(app) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            app.state.server.engine.shutdown(drain=False)  # the engine goes away mid-stream
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_dead"
        health = http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable"}
        failed = http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "engine_dead"
