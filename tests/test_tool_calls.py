"""Request validation of tools / tool_choice / response_format, and reading calls back out."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_mistral.chat import render_tool_calls
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.tools.parsing import ToolCallStreamer, parse_tool_calls, split_tool_calls
from mlx_mistral.tools.spec import ResponseFormat, ToolSpec
from mlx_mistral.tools.validation import parse_structured_request
from tests.tool_samples import WEATHER, assemble


def tool(name="get_weather", **fn):
    return {"type": "function", "function": {"name": name, **fn}}


# -- request side --------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"tools": []}, "tools"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [tool("has space")]}, "tools[0].function.name"),
    ({"tools": [tool("x" * 65)]}, "tools[0].function.name"),
    ({"tools": [tool(""), tool()]}, "tools[0].function.name"),
    ({"tools": [tool(), tool("b"), tool("get_weather")]}, "tools[2].function.name"),
    ({"tools": [tool(description=3)]}, "tools[0].function.description"),
    (
        {"tools": [tool(), tool("b"), tool("c", parameters={"type": "objekt"})]},
        "tools[2].function.parameters",
    ),
    (
        {"tools": [tool(parameters={"type": "object", "required": "city"})]},
        "tools[0].function.parameters",
    ),
    ({"tools": [tool(parameters=[])]}, "tools[0].function.parameters"),
    ({"tools": [tool(parameters={"type": "string"})]}, "tools[0].function.parameters"),
    # Valid JSON Schema the grammar engine cannot compile: refused up front, not at decode time
    # (for a strict tool; any other has the format relaxed: tests/test_tool_schema_relaxing.py).
    (
        {
            "tools": [
                tool(
                    parameters={
                        "type": "object",
                        "properties": {"d": {"type": "string", "format": "weird"}},
                    },
                    strict=True,
                )
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        {"tools": [tool(parameters={"$ref": "https://example.com/schema.json"})]},
        "tools[0].function.parameters",
    ),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [tool()], "tool_choice": "any"}, "tool_choice"),
    ({"tools": [tool()], "tool_choice": {"type": "function"}}, "tool_choice"),
    (
        {"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": 5}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {}, "strict": "yes"},
            }
        },
        "response_format.json_schema.strict",
    ),
]


@pytest.mark.parametrize("fields, param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_fields_name_the_param(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_structured_request(**fields)
    assert info.value.param == param
    assert info.value.status == 400 and info.value.message


def test_defaults_follow_the_openai_api():
    spec = parse_structured_request()
    assert (spec.tools, spec.tool_choice, spec.parallel_tool_calls) == ((), "none", True)
    assert spec.response_format == ResponseFormat("text") and not spec.constrained
    assert spec.prompt_tools is None
    spec = parse_structured_request(tools=[tool(description="Weather", parameters=WEATHER)])
    assert spec.tool_choice == "auto" and spec.constrained
    assert spec.prompt_tools == (ToolSpec("get_weather", "Weather", WEATHER),)


def test_named_choice_and_formats_normalise():
    spec = parse_structured_request(
        tools=[tool(), tool("b")],
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "b"}},
    )
    assert (spec.tool_choice, spec.function_name, spec.parallel_tool_calls) == (
        "function",
        "b",
        False,
    )
    assert parse_structured_request(tools=[tool()], tool_choice="none").prompt_tools is None
    assert parse_structured_request(tool_choice="none").tool_choice == "none"
    fmt = parse_structured_request(response_format={"type": "json_object"}).response_format
    assert fmt == ResponseFormat("json_object")
    fmt = parse_structured_request(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": WEATHER, "strict": True},
        }
    ).response_format
    assert fmt == ResponseFormat("json_schema", "p", WEATHER, True)
    with pytest.raises(AttributeError):
        fmt.type = "text"  # frozen


# -- output side ---------------------------------------------------------------------------------
def test_parse_reads_the_rendered_format():
    calls = [
        {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "f", "arguments": '{"x": [1, {"y": "}"}]}'},
        },
        {"id": "call_def", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    text = render_tool_calls(calls)
    assert text.startswith("[TOOL_CALLS] [")
    assert parse_tool_calls(text) == calls
    assert split_tool_calls("Checking. " + text) == ("Checking.", calls)


def test_parse_is_lenient_on_layout_and_makes_missing_ids():
    text = '[TOOL_CALLS]\n[ { "arguments" : {"a":1} , "name": "f" } ]\n'
    (call,) = parse_tool_calls(text)
    assert call["function"] == {"name": "f", "arguments": '{"a":1}'}  # the raw JSON text
    assert re.fullmatch(r"call_[A-Za-z0-9]{9}", call["id"])


@pytest.mark.parametrize(
    "text",
    [
        "Just text.",
        "[TOOL_CALLS] [",  # cut by max_tokens
        '[TOOL_CALLS] [{"name": "f", "arguments": {}, "id": "c"}',
        '[TOOL_CALLS] [{"name": "f", "arguments": "{}", "id": "c"}]',  # arguments must be an object
        '[TOOL_CALLS] [{"arguments": {}, "id": "c"}]',
        "[TOOL_CALLS] [] ",
        '[TOOL_CALLS] [{"name": "f", "arguments": {}}] trailing',
    ],
)
def test_text_without_a_complete_call_is_content(text):
    assert parse_tool_calls(text) is None
    assert split_tool_calls(text) == (text, None)


def stream(text, pieces, call_ids):
    streamer = ToolCallStreamer(call_ids=call_ids)
    deltas = [streamer.feed(p) for p in pieces] + [streamer.finish()]
    return deltas


def chunks(text, rng):
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 30))))
        if len(text) > 1
        else []
    )
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
call_st = st.tuples(
    st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    st.from_regex(r"call_[a-zA-Z0-9]{9}", fullmatch=True),
)


@settings(max_examples=150, deadline=None)
@given(
    content=st.sampled_from(["", "Sure.", "a [TOOL_CALL b", "[", "x [TOOL_"]),
    raw_calls=st.lists(call_st, max_size=3),
    seed=st.integers(0, 2**32),
)
def test_streaming_gives_what_parsing_gives(content, raw_calls, seed):
    calls = [
        {
            "id": i,
            "type": "function",
            "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)},
        }
        for n, a, i in raw_calls
    ]
    text = content
    if calls:
        text = (content + " " if content else "") + render_tool_calls(calls)
    expected = split_tool_calls(text)
    rng = random.Random(seed)
    pieces = chunks(text, rng)
    ids = [c["id"] for c in calls]
    # With ids (under a grammar) calls stream incrementally; without, they come whole at the end.
    for call_ids in (ids, None):
        content_out, calls_out = assemble(stream(text, pieces, call_ids))
        expected_calls = expected[1]
        if expected_calls is not None:
            expected_calls = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.dumps(
                            json.loads(c["function"]["arguments"]),
                            ensure_ascii=False,
                            separators=(", ", ": "),
                        ),
                    },
                }
                for c in expected_calls
            ]
        assert (content_out, calls_out) == (expected[0], expected[1])
        assert expected[1] == expected_calls  # arguments as rendered: the text round-trips


def test_streaming_starts_each_call_before_its_arguments_end():
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"a": "xyz"}'},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "g", "arguments": '{"b": [1, 2]}'},
        },
    ]
    text = render_tool_calls(calls)
    streamer = ToolCallStreamer(call_ids=["call_1", "call_2"])
    seen = [part for ch in text for part in streamer.feed(ch).tool_calls]
    assert seen[0] == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert len([p for p in seen if p["index"] == 0]) > 3  # argument fragments, as they come
    assert streamer.finish().tool_calls == ()
    assert assemble([type(streamer.finish())(tool_calls=tuple(seen))]) == ("", calls)


def test_content_is_held_only_while_it_may_be_the_marker():
    streamer = ToolCallStreamer()
    assert streamer.feed("Hello [TO").content == "Hello"
    assert streamer.feed("day] ok").content == " [TOday] ok"
    assert streamer.finish().content == ""
    streamer = ToolCallStreamer()
    assert streamer.feed("trailing ").content == "trailing"
    assert streamer.finish().content == " "


# -- imports -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    ["mlx_mistral.tools.parsing", "mlx_mistral.tools.format", "mlx_mistral.tools.spec"],
)
def test_reading_and_writing_calls_loads_neither_mlx_nor_llguidance(module):
    """The plain-text side of tools is pure Python: a client-side parser, or a process that only
    renders prompts, must not pay for (or need) MLX and the grammar engine."""
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'llguidance')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
