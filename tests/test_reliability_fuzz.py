"""Fuzzing a real server process: no request body may produce a 5xx or end the process.

Two fuzzers, one server (tiny random checkpoint, `--default-max-tokens 2`):
- hypothesis over the request schema: every field of the three generation endpoints (chat,
  completions, responses) takes either a plausible value or an arbitrary JSON value (nested
  lists and objects, huge integers, NaN, wrong types), plus unknown fields and arbitrary
  messages, tools and response formats;
- schemathesis over the OpenAPI document the server publishes (/openapi.json), in both its
  positive (schema-valid) and negative (schema-violating) modes, on every operation;
- hypothesis over Ollama's /api/chat and /api/generate bodies, whose errors are Ollama's shape.

Valid `max_tokens` values are clamped to 3 so the cases that pass validation generate only a
few tokens. Case counts: `RELIABILITY_FUZZ_SCALE` multiplies them. Scale 1 runs 10,453 cases
(the figure in docs/reliability.md, ~8 minutes on 2 cores: schemathesis spends ~50-100 ms
generating each case) plus 1,500 Responses bodies; the default run uses 0.3 (~3,550 cases,
~2.5 minutes).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_process import ServerProcess

SCALE = float(os.environ.get("RELIABILITY_FUZZ_SCALE", "0.3"))
CHAT_CASES = int(4000 * SCALE)
COMPLETION_CASES = int(2000 * SCALE)
RESPONSES_CASES = int(1500 * SCALE)
SCHEMATHESIS_CASES = int(550 * SCALE)  # per operation and mode; 4 operations x 2 modes
SCHEMATHESIS_GET_CASES = int(50 * SCALE)  # per GET operation and mode (6 in all)
MAX_FUZZ_TOKENS = 3

COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint, "--default-max-tokens", "2") as proc:
        yield proc
        log = proc.log()
        assert proc.alive, log[-5000:]
        assert "Traceback" not in log, log[-5000:]
        assert not re.search(r'" 5\d\d ', log), "a 5xx answer was logged"
        assert httpx.get(proc.url("/health")).json()["status"] == "ok"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def check_answer(response: httpx.Response, server: ServerProcess) -> None:
    """The invariants of any answer: no 5xx; an error is OpenAI's shape; a stream ends [DONE]."""
    assert server.alive, "the server process exited"
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.request.url.path == "/v1/responses":  # its own stream end, no [DONE]
        last = response.text.rsplit("data: ", 1)[-1] if "event: " in response.text else None
        body = json.loads(last or response.text)
        body = body.get("response", body)
        assert body["object"] == "response" and body["status"] in ("completed", "incomplete")
        assert body["usage"]["output_tokens"] <= MAX_FUZZ_TOKENS
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
    else:
        body = response.json()
        assert body["choices"] and body["usage"]["completion_tokens"] <= 16 * MAX_FUZZ_TOKENS


# -- hypothesis over the request schema -------------------------------------------------------
def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([-1, 0, 1, 2**31, 2**63, -(2**63), 10**9, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(["", "x", "../../etc/passwd", "\x00", "{{7*7}}"]),
    )


JSON = st.recursive(
    _scalars(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _small(value: Any) -> Any:
    """A token count that would generate more than a few tokens becomes MAX_FUZZ_TOKENS."""
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and MAX_FUZZ_TOKENS < value <= 1_000_000
    ):
        return MAX_FUZZ_TOKENS if isinstance(value, int) else float(MAX_FUZZ_TOKENS)
    return value


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value most of the time, any JSON value sometimes."""
    return st.one_of(plausible, plausible, plausible, JSON)


TOKENS = st.integers(0, MAX_FUZZ_TOKENS)
SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "min_p": st.floats(0, 1),
    "top_k": st.integers(0, 999),
    "max_tokens": TOKENS,
    "max_completion_tokens": TOKENS,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 5),
    "repeat_penalty": st.floats(0.01, 5),
    "seed": st.integers(0, 2**63),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5)),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(-5, 40000).map(str), st.text(max_size=4)),
        st.one_of(st.floats(-150, 150), JSON),
        max_size=3,
    ),
    "n": st.integers(0, 17),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())}),
    "model": st.sampled_from(["mistralai/Mistral-7B-Instruct-v0.2", "gpt-4", "../../etc/passwd"]),
    "user": JSON,
    "metadata": JSON,
}


NAME = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
CONTENT = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.fixed_dictionaries(
            {
                "type": field(st.sampled_from(["text", "image_url"])),
                "text": field(st.text(max_size=20)),
            }
        ),
        max_size=3,
    ),
    JSON,
)
# JSON inside a JSON string (tool-call arguments): hostile text the server parses a second time.
HOSTILE_JSON_TEXT = st.one_of(
    JSON.map(json.dumps),
    st.integers(1, 6000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.integers(1, 6000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 6000).map(lambda digits: '{"a": ' + "7" * digits + "}"),
    st.sampled_from(['{"a": "\\ud800"}', '{"\\udfff": 1}', '{"a": NaN}', "{", "", "null"]),
    st.text(max_size=20),
)
TOOL_CALLS = st.lists(
    st.fixed_dictionaries(
        {
            "id": field(st.just("call_abcdefghi")),
            "type": field(st.just("function")),
            "function": field(
                st.fixed_dictionaries({"name": field(NAME), "arguments": field(HOSTILE_JSON_TEXT)})
            ),
        }
    ),
    max_size=2,
)
MESSAGE = field(
    st.fixed_dictionaries(
        {"role": field(st.sampled_from(["system", "user", "user", "assistant", "tool"]))},
        optional={
            "content": field(CONTENT),
            "name": JSON,
            "tool_call_id": JSON,
            "tool_calls": st.one_of(JSON, TOOL_CALLS),
        },
    )
)
# Schemas the grammar engine cannot serve, or whose checks cost seconds (issue 19): each must be
# a 400 (or, if served, valid JSON), never a 5xx.
HOSTILE_SCHEMA = st.one_of(
    st.sampled_from([{"$ref": "#"}, {"const": "\u0001"}, {"not": {}}, {"$ref": "#/nope"}]),
    st.integers(1, 3000).map(lambda n: {"anyOf": [{"const": f"v{i}"} for i in range(n)]}),
    st.integers(1, 3000).map(lambda n: {"enum": list(range(n))}),
    st.integers(0, 2**33).map(lambda n: {"type": "string", "pattern": f"^a{{{n}}}$"}),
    st.integers(0, 10**7).map(lambda n: {"type": "string", "maxLength": n}),
    st.from_regex(r"[\\^$.|?*+()\[\]{}a0-9,]{1,12}", fullmatch=True).map(
        lambda p: {"type": "string", "pattern": p}
    ),
    st.integers(1, 200).map(lambda d: _nest({"type": "string"}, d)),
)


def _nest(schema: dict, depth: int) -> dict:
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


SCHEMA = field(
    st.fixed_dictionaries(
        {"type": st.just("object")},
        optional={
            "properties": st.dictionaries(
                st.text(max_size=6),
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(
                            [
                                "string",
                                "integer",
                                "number",
                                "boolean",
                                "array",
                                "object",
                                "null",
                                "nonsense",
                            ]
                        )
                    }
                ),
                max_size=3,
            ),
            "required": JSON,
        },
    )
)
TOOL = field(
    st.fixed_dictionaries(
        {
            "type": field(st.just("function")),
            "function": field(
                st.fixed_dictionaries(
                    {"name": field(NAME)},
                    optional={"description": JSON, "parameters": st.one_of(SCHEMA, HOSTILE_SCHEMA)},
                )
            ),
        }
    )
)
CHAT_FIELDS = {
    **SAMPLING,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 21),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.one_of(
        st.sampled_from(["none", "auto", "required"]),
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAME})}
        ),
    ),
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={
            "json_schema": st.fixed_dictionaries(
                {"name": st.text(max_size=8), "schema": st.one_of(SCHEMA, HOSTILE_SCHEMA)}
            )
        },
    ),
    "parallel_tool_calls": st.booleans(),
}
COMPLETION_FIELDS = {
    **SAMPLING,
    "logprobs": st.integers(0, 6),
    "echo": st.booleans(),
    "best_of": st.integers(0, 3),
    "suffix": st.text(max_size=3),
}


@st.composite
def bodies(
    draw: st.DrawFn,
    required: dict[str, tuple[st.SearchStrategy[Any], ...]],
    fields: dict[str, st.SearchStrategy[Any]],
) -> Any:
    """Request bodies, by kind: any JSON value as the whole body (1 in 10); an object without
    its required field (1 in 10); plausible objects, whose values are in range but whose
    combinations may not be (4 in 10); objects whose every value is plausible or, one time in
    four, any JSON value, sometimes with an unknown field (4 in 10). Valid token counts are
    clamped to MAX_FUZZ_TOKENS.

    `required` maps each required field to (its plausible values, its arbitrary ones)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(JSON)
    wild = kind >= 6
    body: dict[str, Any] = {}
    for name, (plausible, arbitrary) in required.items():
        if kind != 1:
            body[name] = draw(field(arbitrary) if wild else plausible)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[name] = draw(field(fields[name]) if wild else fields[name])
    if wild and draw(st.booleans()):
        body.update(draw(UNKNOWN))
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if name in body:
            body[name] = _small(body[name])
    return body


UNKNOWN = st.dictionaries(st.text(max_size=10), JSON, min_size=1, max_size=2)
TEXT = st.text(min_size=1, max_size=30)
PLAIN_MESSAGES = st.builds(
    lambda system, user: (
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": user}]
    ),
    st.one_of(st.none(), TEXT),
    st.one_of(TEXT, CONTENT),
)
CHAT_BODIES = bodies(
    {"messages": (PLAIN_MESSAGES, st.lists(MESSAGE, min_size=1, max_size=3))}, CHAT_FIELDS
)
COMPLETION_BODIES = bodies(
    {"prompt": (TEXT, st.one_of(TEXT, st.lists(st.integers(-2, 33000), min_size=1, max_size=8)))},
    COMPLETION_FIELDS,
)
PART = st.fixed_dictionaries(
    {"type": field(st.sampled_from(["input_text", "output_text", "input_image"])), "text": TEXT}
)
INPUT_ITEM = field(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": field(st.sampled_from(["user", "user", "assistant", "developer"])),
                "content": field(st.one_of(TEXT, st.lists(PART, max_size=2))),
            },
            optional={"type": st.just("message")},
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call"), "call_id": field(NAME), "name": field(NAME)},
            optional={"arguments": field(st.sampled_from(["{}", '{"a": 1}', "[", ""]))},
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call_output"), "call_id": field(NAME), "output": TEXT}
        ),
    )
)
FLAT_TOOL = field(
    st.fixed_dictionaries(
        {"type": field(st.sampled_from(["function", "function", "web_search"])), "name": NAME},
        optional={"description": JSON, "parameters": SCHEMA, "strict": JSON},
    )
)
RESPONSES_FIELDS = {
    **{name: SAMPLING[name] for name in ("temperature", "top_p", "stream", "model", "user")},
    "metadata": JSON,
    "max_output_tokens": TOKENS,
    "instructions": TEXT,
    "tools": st.lists(FLAT_TOOL, max_size=2),
    "tool_choice": st.one_of(
        st.sampled_from(["none", "auto", "required"]),
        st.fixed_dictionaries({"type": st.just("function"), "name": NAME}),
    ),
    "text": st.fixed_dictionaries(
        {},
        optional={
            "format": st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "json_object", "json_schema"])},
                optional={"name": NAME, "schema": SCHEMA},
            )
        },
    ),
    "parallel_tool_calls": st.booleans(),
    "store": st.booleans(),
    "previous_response_id": st.text(max_size=10),
    "reasoning": JSON,
    "include": st.lists(st.sampled_from(["message.output_text.logprobs", "x"]), max_size=2),
    "top_logprobs": st.integers(0, 21),
    "truncation": st.sampled_from(["auto", "disabled"]),
    "background": st.booleans(),
}
RESPONSES_BODIES = bodies(
    {"input": (TEXT, st.lists(INPUT_ITEM, min_size=1, max_size=3))}, RESPONSES_FIELDS
)

FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "print_blob": True,
    "suppress_health_check": list(HealthCheck),
}


def post_json(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # json.dumps writes NaN and Infinity as bare words, as some clients do.
    raw = json.dumps(body, allow_nan=True).encode()
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    "path, strategy, cases",
    [
        ("/v1/chat/completions", CHAT_BODIES, CHAT_CASES),
        ("/v1/completions", COMPLETION_BODIES, COMPLETION_CASES),
        ("/v1/responses", RESPONSES_BODIES, RESPONSES_CASES),
    ],
    ids=["chat", "completions", "responses"],
)
def test_hypothesis_request_fuzz(server, http, path, strategy, cases):
    statuses: dict[int, int] = {}

    @settings(max_examples=cases, **FUZZ_SETTINGS)
    @given(body=strategy)
    def one(body: Any) -> None:
        response = post_json(http, path, body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        check_answer(response, server)

    one()
    total = sum(statuses.values())
    COUNTS[path] = total
    print(f"{path}: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert total >= cases
    assert statuses.get(200, 0) >= cases // 50, "too few cases passed validation to fuzz the engine"


# -- hypothesis over Ollama's /api/chat and /api/generate ------------------------------------
OLLAMA_CASES = int(1000 * SCALE)  # per endpoint
OLLAMA_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        **{name: field(SAMPLING[name]) for name in ("temperature", "top_p", "min_p", "top_k")},
        **{name: field(SAMPLING[name]) for name in ("stop", "presence_penalty", "repeat_penalty")},
        "num_predict": field(st.integers(-3, 50)),
        "seed": field(st.integers(-2, 2**63)),
        "num_ctx": field(st.integers(-1, 40000)),
        "mirostat": field(st.integers(0, 2)),
        "repeat_last_n": field(st.integers(-2, 128)),
        "num_gpu": JSON,
    },
)
OLLAMA_MESSAGE = field(
    st.fixed_dictionaries(
        {"role": field(st.sampled_from(["system", "user", "assistant", "tool"]))},
        optional={
            "content": field(st.text(max_size=30)),
            "images": JSON,
            "tool_name": field(NAME),
            "tool_call_id": JSON,
            "tool_calls": field(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "function": field(
                                st.fixed_dictionaries({"name": field(NAME), "arguments": JSON})
                            )
                        }
                    ),
                    max_size=2,
                )
            ),
        },
    )
)
OLLAMA_FIELDS = {
    "stream": st.booleans(),
    "format": st.one_of(st.sampled_from(["json", "", "yaml"]), SCHEMA),
    "options": OLLAMA_OPTIONS,
    "keep_alive": st.one_of(st.text(max_size=4), st.integers(-1, 600)),
    "think": st.booleans(),
}
MODEL = (st.sampled_from(["mistral:7b", "m"]), JSON)


def _clamp_num_predict(body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("options"), dict):
        if "num_predict" in body["options"]:
            body["options"]["num_predict"] = _small(body["options"]["num_predict"])
    return body


OLLAMA_CHAT_BODIES = bodies(
    {"model": MODEL, "messages": (PLAIN_MESSAGES, st.lists(OLLAMA_MESSAGE, max_size=3))},
    {**OLLAMA_FIELDS, "tools": st.lists(TOOL, max_size=2)},
).map(_clamp_num_predict)
OLLAMA_GENERATE_BODIES = bodies(
    {"model": MODEL, "prompt": (TEXT, JSON)},
    {
        **OLLAMA_FIELDS,
        "system": TEXT,
        "raw": st.booleans(),
        "context": st.lists(st.integers(-2, 33000), max_size=8),
        "suffix": st.text(max_size=3),
        "images": JSON,
    },
).map(_clamp_num_predict)


def check_ollama_answer(response: httpx.Response, server: ServerProcess) -> None:
    """No 5xx; an error is Ollama's {"error": "..."}; a stream's lines are JSON objects, the
    last one done (or an error)."""
    assert server.alive, "the server process exited"
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()
        assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]
        return
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines and all(isinstance(line, dict) for line in lines)
    assert lines[-1].get("done") is True or "error" in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "path, strategy",
    [("/api/chat", OLLAMA_CHAT_BODIES), ("/api/generate", OLLAMA_GENERATE_BODIES)],
    ids=["ollama-chat", "ollama-generate"],
)
def test_hypothesis_ollama_fuzz(server, http, path, strategy):
    statuses: dict[int, int] = {}

    @settings(max_examples=OLLAMA_CASES, **FUZZ_SETTINGS)
    @given(body=strategy)
    def one(body: Any) -> None:
        response = post_json(http, path, body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        check_ollama_answer(response, server)

    one()
    COUNTS[path] = sum(statuses.values())
    print(f"{path}: {COUNTS[path]} cases, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) >= OLLAMA_CASES // 50, "too few cases passed validation"


# -- schemathesis over /openapi.json ------------------------------------------------------
def _clamp_tokens(case: Any) -> Any:
    if isinstance(case.body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if name in case.body:
                case.body[name] = _small(case.body[name])
    return case


def test_schemathesis_openapi_fuzz(server, http):
    schemathesis = pytest.importorskip("schemathesis")
    import requests

    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    session = requests.Session()
    statuses: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models/{model}",
        "/health",
    }
    for operation in operations:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if len(operation.body):  # a path parameter is a string whatever it holds
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            cases = SCHEMATHESIS_CASES if len(operation.body) else SCHEMATHESIS_GET_CASES

            @settings(max_examples=cases, **FUZZ_SETTINGS)
            @given(case=operation.as_strategy(generation_mode=mode).map(_clamp_tokens))
            def one(case: Any) -> None:
                response = case.call(base_url=server.base_url, session=session, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert server.alive, "the server process exited"
                assert response.status_code < 500, (case.path, case.body, response.text[:300])

            one()
    total = sum(statuses.values())
    COUNTS["schemathesis"] = total
    print(
        f"schemathesis: {total} cases over {len(operations)} operations, "
        f"statuses {dict(sorted(statuses.items()))}"
    )
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0


# -- Anthropic's /v1/messages: the same fuzzer, Anthropic's fields and error shape -----------------
MESSAGES_CASES = int(1000 * SCALE)
BLOCK = field(
    st.fixed_dictionaries(
        {"type": field(st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking"]))},
        optional={
            "text": field(TEXT),
            "id": JSON,
            "name": JSON,
            "input": JSON,
            "tool_use_id": JSON,
        },
    )
)
ANTHROPIC_MESSAGE = field(
    st.fixed_dictionaries(
        {"role": field(st.sampled_from(["user", "user", "assistant", "system"]))},
        optional={"content": field(st.one_of(TEXT, st.lists(BLOCK, max_size=3)))},
    )
)
ANTHROPIC_FIELDS = {
    "model": st.sampled_from(["claude-sonnet-4-5", "../../etc/passwd"]),
    "system": st.one_of(TEXT, st.lists(BLOCK, max_size=2)),
    "stop_sequences": st.lists(st.text(max_size=5), max_size=5),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 999),
    "stream": st.booleans(),
    "tools": st.lists(
        field(st.fixed_dictionaries({"name": field(NAME), "input_schema": SCHEMA})), max_size=2
    ),
    "tool_choice": st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "none", "tool"])}, optional={"name": NAME}
    ),
    "thinking": st.fixed_dictionaries(
        {"type": st.sampled_from(["enabled", "disabled", "adaptive"])},
        optional={"budget_tokens": JSON},
    ),
    "metadata": JSON,
    "mcp_servers": JSON,
}
MESSAGES_BODIES = bodies(
    {
        "messages": (
            st.builds(lambda text: [{"role": "user", "content": text}], TEXT),
            st.lists(ANTHROPIC_MESSAGE, min_size=1, max_size=3),
        ),
        "max_tokens": (st.integers(1, MAX_FUZZ_TOKENS), JSON),
    },
    ANTHROPIC_FIELDS,
)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_hypothesis_anthropic_fuzz(server, http, path):
    """Never a 5xx; an error is Anthropic's shape; a stream ends with message_stop."""
    statuses: dict[int, int] = {}

    @settings(max_examples=MESSAGES_CASES, **FUZZ_SETTINGS)
    @given(body=MESSAGES_BODIES)
    def one(body: Any) -> None:
        response = post_json(http, path, body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert server.alive, "the server process exited"
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            error = response.json()
            assert error["type"] == "error" and error["error"]["message"], error
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith('event: message_stop\ndata: {"type": "message_stop"}\n\n')
        else:
            answer = response.json()  # a message, or count_tokens' {"input_tokens": n}
            assert "input_tokens" in answer.get("usage", answer), answer

    one()
    COUNTS[path] = sum(statuses.values())
    print(f"{path}: {COUNTS[path]} cases, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) >= MESSAGES_CASES // 50, "too few cases passed validation"


def test_total_fuzz_cases(server):
    """The fuzzers above together ran the number of cases the project promises (at scale 1)."""
    if len(COUNTS) < 3:
        pytest.skip("needs the fuzz tests of this module to have run")
    total = sum(COUNTS.values())
    print(f"fuzz cases in all: {total}")
    assert total >= 10_000 * min(SCALE, 1)
