"""Tools and structured output end to end: the openai client against a real server process.

The tiny checkpoint has random weights, so every guarantee here comes from constrained decoding,
not from the model: a call that is required or named always names a tool and carries arguments
valid against its schema, a json_schema answer always parses and validates. Each is checked over
100 seeds sent as concurrent requests (the engine decodes them as one batch). Schemas bound their
strings (maxLength, enum), as a random model would rarely close a free string within max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter

import jsonschema
import mlx.core as mx
import openai
import pytest

import mlx_mistral
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.server.app import chat_prompt
from mlx_mistral.server.schemas import ChatCompletionRequest
from mlx_mistral.tokenizer import Tokenizer
from mlx_mistral.tools.parsing import split_tool_calls
from tests.server_process import ServerProcess
from tests.tool_samples import PERSON, SCHEMAS, TIME, TOOLS

SEEDS = 100
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}
CALL_ID = re.compile(r"call_[A-Za-z0-9]{9}")


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint, "--max-batch", str(SEEDS), "--max-queue", str(2 * SEEDS)
    ) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def name(tiny_hf_checkpoint):
    return tiny_hf_checkpoint.name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_checkpoint):
    return Tokenizer.from_file(tiny_hf_checkpoint / "tokenizer.model")


def create_many(server, name: str, requests: list[dict]) -> list:
    """Send all requests at once (AsyncOpenAI); streamed ones come back accumulated."""

    async def one(aclient: openai.AsyncOpenAI, body: dict):
        if not body.get("stream"):
            return await aclient.chat.completions.create(model=name, **body)
        stream = await aclient.chat.completions.create(model=name, **body)
        return accumulate([chunk async for chunk in stream])

    async def run():
        async with openai.AsyncOpenAI(
            base_url=server.url("/v1"), api_key="k", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(one(aclient, body) for body in requests))

    return asyncio.run(run())


def accumulate(chunks) -> list[dict]:
    """Stream chunks -> per choice {content, tool_calls, finish_reason}, as a client adds up
    OpenAI deltas (a call's first delta has its id, type and name; later ones only arguments)."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            acc = out.setdefault(
                choice.index, {"content": "", "tool_calls": {}, "finish_reason": None}
            )
            delta = choice.delta
            acc["content"] += delta.content or ""
            for part in delta.tool_calls or []:
                if part.id is not None:
                    assert part.index not in acc["tool_calls"] and part.type == "function"
                    assert part.function.arguments == ""
                    acc["tool_calls"][part.index] = {
                        "id": part.id,
                        "type": "function",
                        "function": {"name": part.function.name, "arguments": ""},
                    }
                else:
                    assert part.function.name is None
                    acc["tool_calls"][part.index]["function"]["arguments"] += (
                        part.function.arguments
                    )
            if choice.finish_reason is not None:
                acc["finish_reason"] = choice.finish_reason
    return [
        {**acc, "tool_calls": [acc["tool_calls"][i] for i in sorted(acc["tool_calls"])] or None}
        for _, acc in sorted(out.items())
    ]


def as_dicts(answer) -> list[dict]:
    """A non-streamed answer in the shape of `accumulate`."""
    out = []
    for choice in answer.choices:
        calls = choice.message.tool_calls
        out.append(
            {
                "content": choice.message.content or "",
                "finish_reason": choice.finish_reason,
                "tool_calls": [c.model_dump() for c in calls] if calls else None,
            }
        )
    return out


def check_calls(choice, allowed: set[str]) -> list:
    """A finished call answer: no content, named tools, schema-valid arguments, fresh ids."""
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.type == "function" and CALL_ID.fullmatch(call.id)
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


# -- a whole conversation ------------------------------------------------------------------------
def test_round_trip_call_result_answer(name, client, tokenizer):
    first = client.chat.completions.create(
        model=name,
        messages=ASK,
        tools=TOOLS,
        seed=3,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
    )
    (choice,) = first.choices
    (call,) = check_calls(choice, set(SCHEMAS))
    assert first.usage.prompt_tokens == len(tokenizer.encode_chat(ASK, tools=TOOLS))

    # The client sends the call back as it got it, then the tool's result for that call id.
    conversation = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    answer = client.chat.completions.create(
        model=name, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=12, seed=4
    )
    (final,) = answer.choices
    assert final.finish_reason in ("stop", "length") and final.message.tool_calls is None
    assert isinstance(final.message.content, str) and "[TOOL_CALLS]" not in final.message.content
    # "none" shows the model no tools: the prompt is the conversation alone.
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(conversation))

    answer = client.chat.completions.create(
        model=name, messages=conversation, tools=TOOLS, max_tokens=12, seed=4
    )  # tool_choice "auto"
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(conversation, tools=TOOLS))
    (final,) = answer.choices
    if final.message.tool_calls:
        check_calls(final, set(SCHEMAS))
    else:
        assert final.finish_reason in ("stop", "length")
        assert "[TOOL_CALLS]" not in final.message.content


def test_tool_messages_render_as_the_library_renders_them(name, client, tokenizer):
    calls = [
        {
            "id": "call_abc123XYZ",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        }
    ]
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_abc123XYZ", "content": "12:00"},
        {"role": "user", "content": "And in Tokyo?"},
    ]
    answer = client.chat.completions.create(
        model=name, messages=conversation, tools=TOOLS, max_tokens=1
    )
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(conversation, tools=TOOLS))


# -- guarantees over 100 seeds -------------------------------------------------------------------
@pytest.mark.parametrize(
    "tool_choice, allowed, max_tokens",
    [
        ("required", set(SCHEMAS), 120),
        (NAMED_TIME, {"get_time"}, 60),
    ],
)
def test_required_and_named_calls_are_always_valid(name, server, tool_choice, allowed, max_tokens):
    answers = create_many(
        server,
        name,
        [
            {
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": tool_choice,
                "seed": seed,
                "parallel_tool_calls": False,
                "max_tokens": max_tokens,
                "temperature": 1.0,
            }
            for seed in range(SEEDS)
        ],
    )
    names = Counter()
    ids = set()
    for answer in answers:
        (call,) = check_calls(answer.choices[0], allowed)
        names[call.function.name] += 1
        ids.add(call.id)
    assert set(names) == allowed  # the model picks among all the allowed tools
    assert len(ids) == SEEDS  # every answer its own call id


def test_parallel_calls_are_each_valid(name, server):
    answers = create_many(
        server,
        name,
        [
            {
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": NAMED_TIME,
                "seed": seed,
                "max_tokens": 320,
            }
            for seed in range(20)
        ],
    )  # 8 calls of <= 36 tokens fit
    counts = Counter(len(check_calls(a.choices[0], {"get_time"})) for a in answers)
    assert max(counts) > 1  # parallel_tool_calls defaults to true


def test_json_schema_answers_always_parse_and_validate(name, server):
    answers = create_many(
        server,
        name,
        [
            {"messages": ASK, "response_format": PERSON_FORMAT, "seed": seed, "max_tokens": 60}
            for seed in range(SEEDS)
        ],
    )
    for answer in answers:
        (choice,) = answer.choices
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None, choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_auto_with_a_json_answer_gives_json_or_a_valid_call(name, server):
    # With a JSON response_format, "auto" lets the model choose between the JSON answer and a
    # call right from the first token, so a random model takes both ways.
    answers = create_many(
        server,
        name,
        [
            {
                "messages": ASK,
                "tools": TOOLS,
                "response_format": PERSON_FORMAT,
                "seed": seed,
                "parallel_tool_calls": False,
                "max_tokens": 120,
            }
            for seed in range(40)
        ],
    )
    kinds = Counter()
    for answer in answers:
        (choice,) = answer.choices
        if choice.message.tool_calls:
            check_calls(choice, set(SCHEMAS))
            kinds["call"] += 1
        else:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), PERSON)
            kinds["json"] += 1
    assert kinds["call"] and kinds["json"]


# -- streaming -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 120},
        {"tool_choice": NAMED_TIME, "max_tokens": 320},  # several calls in one answer
        {"response_format": PERSON_FORMAT, "parallel_tool_calls": False, "max_tokens": 120},  # auto
        {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 120, "n": 3},
    ],
    ids=["required", "parallel", "auto-json", "n3"],
)
def test_streaming_gives_the_same_calls(name, server, body):
    seeds = range(8)
    requests = [
        {"messages": ASK, "tools": TOOLS, "seed": seed, "stream": stream, **body}
        for stream in (False, True)
        for seed in seeds
    ]
    answers = create_many(server, name, requests)
    plain, streamed = answers[: len(seeds)], answers[len(seeds) :]
    for answer, chunks in zip(plain, streamed):
        assert chunks == as_dicts(answer)
        assert any(c["tool_calls"] for c in chunks) or body.get("response_format")
        for choice in chunks:
            if choice["tool_calls"]:
                assert choice["content"] == "" and choice["finish_reason"] == "tool_calls"


def test_calls_cut_by_max_tokens_are_the_same_streamed_or_not(name, server):
    """max_tokens ending an answer mid-call: both shapes give the call as generated so far
    (finish_reason "length"), and the marker's text never shows as content."""
    cuts = (3, 8, 14, 20, 26)
    requests = [
        {
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": "required",
            "seed": seed,
            "parallel_tool_calls": False,
            "max_tokens": cut,
            "stream": stream,
        }
        for stream in (False, True)
        for seed in range(4)
        for cut in cuts
    ]
    answers = create_many(server, name, requests)
    half = len(answers) // 2
    partial = 0
    for answer, chunks in zip(answers[:half], answers[half:]):
        assert chunks == as_dicts(answer)
        (choice,) = chunks
        assert "TOOL_CALLS" not in choice["content"]
        if choice["finish_reason"] == "length" and choice["tool_calls"]:
            partial += 1
            assert choice["tool_calls"][0]["function"]["name"] in SCHEMAS
    assert partial  # some answers were cut after the name, inside the arguments


def test_stream_deltas_follow_openai(name, server):
    events = []

    async def run():
        async with openai.AsyncOpenAI(
            base_url=server.url("/v1"), api_key="k", max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model=name,
                messages=ASK,
                tools=TOOLS,
                tool_choice=NAMED_TIME,
                seed=5,
                parallel_tool_calls=False,
                max_tokens=60,
                stream=True,
            )
            events.extend([c async for c in stream])

    asyncio.run(run())
    deltas = [c.choices[0].delta for c in events if c.choices]
    assert deltas[0].role == "assistant"
    parts = [p for d in deltas for p in d.tool_calls or []]
    head, *arguments = parts
    assert (head.index, head.type, head.function.name) == (0, "function", "get_time")
    assert CALL_ID.fullmatch(head.id) and head.function.arguments == ""
    assert len(arguments) > 1  # arguments stream as they are generated, not in one piece
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in arguments)
    assert (
        json.loads("".join(p.function.arguments for p in arguments))["tz"]
        in TIME["properties"]["tz"]["enum"]
    )
    assert not any(d.content for d in deltas)  # no call text leaks as content
    assert events[-1].choices[0].finish_reason == "tool_calls"


def raw_chunks(server, name: str, body: dict) -> list[dict]:
    """The chunks of a stream, read from the raw bytes (no client in between)."""
    import httpx

    with httpx.stream(
        "POST", server.url("/v1/chat/completions"), json={"model": name, **body}, timeout=120
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


@pytest.mark.parametrize("parallel", [False, True])
def test_a_chunk_holds_one_tool_call_entry_per_index(name, server, parallel):
    """OpenAI never sends a call's header and an arguments fragment in one chunk; instructor's
    create_partial keeps one of them (and lost the opening '{"'). The stream opens with a null
    content, as OpenAI's does for an answer that may be tool calls."""
    whole = 0
    for seed in range(8):
        body = {
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": "required",
            "parallel_tool_calls": parallel,
            "seed": seed,
            "max_tokens": 120,
            "stream": True,
        }
        chunks = raw_chunks(server, name, body)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        calls: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                entries = choice["delta"].get("tool_calls") or []
                indexes = [entry["index"] for entry in entries]
                assert len(indexes) == len(set(indexes)), chunk
                for entry in entries:
                    calls[entry["index"]] = (
                        calls.get(entry["index"], "") + entry["function"]["arguments"]
                    )
                    if "id" in entry:
                        assert entry["function"]["arguments"] == ""
        finished = chunks[-1]["choices"][0]["finish_reason"]
        assert finished in ("tool_calls", "length")  # parallel calls may run past max_tokens
        assert calls and all(arguments.startswith("{") for arguments in calls.values())
        if finished == "tool_calls":
            assert all(isinstance(json.loads(a), dict) for a in calls.values())
            whole += 1
    assert whole >= 4


def test_the_openai_stream_helper_sees_no_empty_content_and_whole_arguments(name, client):
    with client.chat.completions.stream(
        model=name,
        messages=ASK,
        tools=TOOLS,
        tool_choice=NAMED_TIME,
        seed=3,
        max_tokens=60,
    ) as stream:
        events = list(stream)
    assert not [e for e in events if e.type == "content.delta"]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_time"
    assert json.loads(done[0].arguments)["tz"] in TIME["properties"]["tz"]["enum"]


# -- the Python API gives what the server gives ---------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [
        {
            "tools": TOOLS,
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 120,
        },
        {"response_format": PERSON_FORMAT, "max_tokens": 60},
    ],
    ids=["call", "json"],
)
def test_library_generate_matches_the_server(name, client, tiny_model, fields):
    model, tokenizer = tiny_model
    answer = client.chat.completions.create(model=name, messages=ASK, seed=11, **fields)
    structured = {k: v for k, v in fields.items() if k != "max_tokens"}
    params = SamplingParams(seed=11, max_tokens=fields["max_tokens"])
    text = mlx_mistral.generate(model, tokenizer, ASK, params=params, **structured)
    content, calls = split_tool_calls(text)
    assert calls or "response_format" in fields
    assert as_dicts(answer)[0]["tool_calls"] == calls
    assert (answer.choices[0].message.content or "") == (content if calls else text)


def test_library_refuses_tools_without_chat_messages(tiny_model):
    model, tokenizer = tiny_model
    two_tokens = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError) as caught:
        mlx_mistral.generate(model, tokenizer, "raw text", tools=TOOLS, params=two_tokens)
    assert caught.value.param == "tools"
    with pytest.raises(InvalidRequestError) as caught:
        mlx_mistral.generate(model, tokenizer, ASK, tool_choice="maybe", params=two_tokens)
    assert caught.value.param == "tool_choice"


def test_constraints_built_off_the_engine_thread_work_on_it(tokenizer):
    # The server builds constraints on a worker thread and the engine thread computes masks
    # from them: nothing in them may be a lazy MLX array of the building thread.
    req = ChatCompletionRequest.from_json(
        {"messages": ASK, "tools": TOOLS, "n": 2, "tool_choice": "required"}
    )
    built = []
    worker = threading.Thread(target=lambda: built.append(chat_prompt(tokenizer, req)))
    worker.start()
    worker.join()
    ((prompt, constraints),) = built
    assert prompt.ids == tokenizer.encode_chat(ASK, tools=TOOLS) and len(constraints) == 2
    masks = []

    def engine_side():
        stacked = mx.stack([c.allowed_mask() for c in constraints])
        masks.append(stacked.sum(axis=-1).tolist())

    engine = threading.Thread(target=engine_side)
    engine.start()
    engine.join()
    (counts,) = masks
    assert 0 < counts[0] == counts[1] <= 3  # only spellings of the marker's start: "▁[", "[", "▁"


# -- bad input -----------------------------------------------------------------------------------
def tool(name: str, parameters: dict | None = None) -> dict:
    fn = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": fn}


@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"tools": [tool("f", {"type": "object", "properties": {"a": {"type": "nonsense"}}})]},
            "tools[0].function.parameters",
            "not a valid JSON Schema",
        ),
        ({"tools": [tool("f", {"type": "string"})]}, "tools[0].function.parameters", "object"),
        (
            {"tools": [tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice.function.name",
            "'g'",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [tool("f")], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "p",
                        "schema": {"type": "object", "minProperties": "two"},
                    },
                }
            },
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_nobody00", "content": "1"}]},
            "messages[1].tool_call_id",
            "call_nobody00",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_b", "content": "1"},
                ]
            },
            "messages[2].tool_call_id",
            "call_b",
        ),
    ],
)
def test_bad_tool_fields_are_400_naming_them(name, client, body, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": name, "messages": ASK, "max_tokens": 1, **body})
    error = caught.value
    assert error.param == param and words in error.message, error.body
