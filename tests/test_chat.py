"""Chat format: token for token against mistral-common's v1 reference, errors, and tools."""

from __future__ import annotations

import json
import random

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mistral.chat import encode_chat, parse_chat, render_chat, render_tool_calls
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.tokenizer import Tokenizer
from mlx_mistral.tools.format import TOOL_CALLS_MARKER

# Texts chosen for the tokenizer's edge cases: dummy-prefix spaces, byte fallback (emoji, rare
# CJK, math letters), newlines and tabs, SentencePiece's own "▁", and spellings of control tokens.
SNIPPETS = [
    "Hello",
    "world",
    "How are you?",
    "café au lait",
    "naïve façade",
    "😀",
    "👍🏽",
    "🇫🇷",
    "🦙",
    "中文字符",
    "鬱",
    "日本語のテキスト",
    "한국어",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "مرحبا",
    "Ωmega",
    "e\u0301",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "[INST]",
    "[/INST]",
    "</s>",
    "<s>",
    "\u2581",
    "x\u2581y",
    "42",
    "3.14159",
    '{"a": 1}',
    "def f(x):\n    return x",
    "!!!",
    "—",
    "…",
    "\u00a0",
]


def random_text(rng: random.Random) -> str:
    """A short text with leading/trailing whitespace, unicode, and sometimes nothing at all."""
    if rng.random() < 0.05:
        return rng.choice(["", " ", "\n", "  \n  "])
    parts = [rng.choice(SNIPPETS) for _ in range(rng.randint(1, 6))]
    text = "".join(p + rng.choice(["", " ", " ", "\n", "  "]) for p in parts)
    return rng.choice(["", " ", "  ", "\n"]) + text if rng.random() < 0.3 else text


def random_content(rng: random.Random) -> str | list[dict]:
    if rng.random() < 0.2:
        return [{"type": "text", "text": random_text(rng)} for _ in range(rng.randint(1, 3))]
    return random_text(rng)


def random_conversation(rng: random.Random) -> list[dict]:
    """Multi-turn chat ending with a user turn; system messages (mostly one, sometimes two or
    three, in either role name) at random positions."""
    messages: list[dict] = []
    if rng.random() < 0.1:
        messages.append({"role": "assistant", "content": random_text(rng) or "a"})
    for _ in range(rng.randint(1, 4)):
        for _ in range(2 if rng.random() < 0.1 else 1):
            messages.append({"role": "user", "content": random_content(rng)})
        for _ in range(2 if rng.random() < 0.1 else 1):
            # An empty answer is refused by the reference and by us (checked by the caller).
            content = random_content(rng) if rng.random() < 0.97 else ""
            messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user", "content": random_content(rng)})
    for _ in range(rng.choice([0, 1, 1, 1, 1, 1, 2, 3])):
        at = rng.randint(0, len(messages))
        role = "developer" if rng.random() < 0.2 else "system"
        messages.insert(at, {"role": role, "content": random_content(rng)})
    return messages


def conversations(n: int, seed: int = 1234) -> list[list[dict]]:
    rng = random.Random(seed)
    return [random_conversation(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(mistral_tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(mistral_tokenizer_path)


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.v1()


def reference_ids(reference: MistralTokenizer, messages: list[dict]) -> list[int]:
    """mistral-common v1 (validator + normalizer + encode_instruct), system messages moved first.

    The hosted API allows system messages anywhere and they always become the system prompt;
    the reference only accepts them before the first assistant message, so they are moved to the
    front, in order (the reference joins them with a blank line). "developer" is OpenAI's newer
    name for "system", which the reference does not know.
    """
    system = [{**m, "role": "system"} for m in messages if m["role"] in ("system", "developer")]
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    request = ChatCompletionRequest(messages=system + rest)
    return reference.encode_chat_completion(request).tokens


def joined(content: str | list[dict]) -> str:
    return (
        content
        if isinstance(content, str)
        else "\n\n".join(p["text"] for p in content if p["text"])
    )


def test_two_hundred_conversations_match_reference(tok, reference):
    matched = refused = 0
    for messages in conversations(260):
        try:
            expected = reference_ids(reference, messages)
        except MistralCommonException:
            # The only refusal the generator provokes: an assistant message with empty content.
            assert any(m["role"] == "assistant" and not joined(m["content"]) for m in messages)
            with pytest.raises(InvalidRequestError, match="neither content nor tool_calls"):
                tok.encode_chat(messages)
            refused += 1
            continue
        assert tok.encode_chat(messages) == expected, messages
        matched += 1
    assert matched >= 200 and refused >= 1


def test_system_message_at_every_position_is_the_system_prompt(tok, reference):
    turns = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    ]
    system = {"role": "system", "content": "Be brief."}
    expected = reference.encode_chat_completion(
        ChatCompletionRequest(messages=[system, *turns])
    ).tokens
    for at in range(len(turns) + 1):
        assert tok.encode_chat(turns[:at] + [system] + turns[at:]) == expected
    assert tok.decode(expected).startswith("[INST] Be brief.\n\none [/INST]")
    # OpenAI's "developer" message is the system prompt under another name.
    assert tok.encode_chat([{"role": "developer", "content": "Be brief."}, *turns]) == expected


def test_several_system_messages_join_like_the_reference(tok, reference):
    """OpenAI takes any number of system messages; the reference aggregates them in order,
    joined by a blank line, empty ones skipped, into the first user turn."""
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": ""},
        {
            "role": "system",
            "content": [{"type": "text", "text": "Use"}, {"type": "text", "text": "French."}],
        },
        {"role": "user", "content": "Hi"},
    ]
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert tok.encode_chat(messages) == expected
    assert tok.decode(expected) == "[INST] You are terse.\n\nUse\n\nFrench.\n\nHi [/INST]"
    # The same with OpenAI's "developer" name for one of them (pydantic-ai's instructions).
    as_developer = [{**messages[0], "role": "developer"}, *messages[1:]]
    assert tok.encode_chat(as_developer) == expected


def test_system_message_after_the_first_user_turn_matches_the_reference(tok, reference):
    """The reference accepts a system message after a user message, and adds it to the system
    prompt after those before it; given as is (not moved), it gives our ids."""
    messages = [
        {"role": "system", "content": "First."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "system", "content": "Second."},
    ]
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert tok.encode_chat(messages) == expected
    assert tok.decode(expected).startswith("[INST] First.\n\nSecond.\n\none [/INST]")
    # After an assistant message (the reference refuses that position): the same prompt.
    moved = [messages[0], messages[1], messages[2], {"role": "system", "content": "Second."}]
    assert tok.encode_chat([*moved, messages[3]]) == expected


# --- continuing a final assistant message --------------------------------------------------------


def prefix_ids(reference: MistralTokenizer, messages: list[dict]) -> list[int]:
    """The reference's ids with the final assistant message as a prefix to continue."""
    *head, last = messages
    request = ChatCompletionRequest(messages=[*head, {**last, "prefix": True}])
    return reference.encode_chat_completion(request).tokens


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Sure"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write JSON."},
            {"role": "assistant", "content": '{"name": "'},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": " 😀 leading space, trailing space "},
        ],
        # Consecutive final answers are one answer, joined by a blank line.
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "first"},
            {"role": "assistant", "content": [{"type": "text", "text": "second"}]},
        ],
    ],
)
def test_a_final_assistant_message_is_continued_like_the_reference_prefix(tok, reference, messages):
    expected = prefix_ids(reference, messages)
    assert tok.encode_chat(messages) == expected
    assert expected[-1] != tok.eos_id
    assert parse_chat(messages).continues
    assert not parse_chat([*messages, {"role": "user", "content": "x"}]).continues


def test_continuing_is_refused_with_tool_calls_or_a_grammar(tok):
    from mlx_mistral.chat import encode_chat_prompt
    from mlx_mistral.tools.spec import ResponseFormat, StructuredRequest

    ends_with_call = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [CALL]},
    ]
    with pytest.raises(InvalidRequestError, match="send the tool results") as info:
        tok.encode_chat(ends_with_call)
    assert info.value.param == "messages"
    prefill = [{"role": "user", "content": "JSON?"}, {"role": "assistant", "content": "{"}]
    json_mode = StructuredRequest(response_format=ResponseFormat(type="json_object"))
    with pytest.raises(InvalidRequestError, match="cannot be combined") as info:
        encode_chat_prompt(tok, prefill, json_mode)
    assert info.value.param == "messages"
    plain = encode_chat_prompt(tok, prefill, StructuredRequest())
    assert plain.continues and plain.ids == tok.encode_chat(prefill)


# --- the legacy function role ------------------------------------------------------------------


def test_function_role_is_a_tool_result_of_the_latest_call_of_that_name(tok):
    with_tool = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    as_function = [*with_tool[:2], {"role": "function", "name": "get_weather", "content": "sunny"}]
    assert tok.encode_chat(as_function) == tok.encode_chat(with_tool)


def test_legacy_function_call_and_function_result_round(tok):
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    turns = render_chat(parse_chat(messages))
    call = json.loads(turns[1].text[len(TOOL_CALLS_MARKER) :])[0]
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Zürich"}
    assert call["id"].startswith("call_")
    result = turns[2].text
    assert f'{{"call_id": "{call["id"]}", "content": "sunny"}}' in result
    # The same history renders the same prompt every time (the prefix cache relies on it).
    assert tok.encode_chat(messages) == tok.encode_chat(json.loads(json.dumps(messages)))


def test_direct_encode_instruct_agrees(tok, reference):
    """The InstructRequest route of the reference gives the same ids for alternating turns."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest

    request = InstructRequest(
        messages=[
            UserMessage(content=" hi "),
            AssistantMessage(content="😀 yo"),
            UserMessage(content="中文"),
        ],
        system_prompt="sys",
    )
    expected = reference.instruct_tokenizer.encode_instruct(request).tokens
    messages = [
        {"role": "user", "content": " hi "},
        {"role": "system", "content": "sys"},
        {"role": "assistant", "content": "😀 yo"},
        {"role": "user", "content": "中文"},
    ]
    assert tok.encode_chat(messages) == expected


def test_consecutive_users_merge_like_the_reference(tok, reference):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": ""},
        {"role": "user", "content": "b"},
    ]
    assert tok.encode_chat(messages) == reference_ids(reference, messages)
    assert tok.decode(tok.encode_chat(messages)) == "[INST] a\n\nb [/INST]"


def test_system_between_users_does_not_split_the_turn(tok):
    # The reference would encode two [INST] turns here; position never matters for us.
    a = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "S"},
        {"role": "user", "content": "b"},
    ]
    b = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    assert tok.encode_chat(a) == tok.encode_chat(b)


def test_leading_assistant_gets_an_empty_user_turn(tok):
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "u"}]
    turns = render_chat(parse_chat(messages))
    assert [t.text for t in turns] == ["[INST]  [/INST]", "hi", "[INST] u [/INST]"]


def test_encode_chat_starts_with_bos_and_ends_after_inst(tok):
    ids = encode_chat(tok, parse_chat([{"role": "user", "content": "Hi"}]))
    assert ids == [tok.bos_id, *tok.encode("[INST] Hi [/INST]")]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
}


@pytest.mark.parametrize(
    ("messages", "param", "match"),
    [
        ([], "messages", "at least one"),
        ("hello", "messages", "must be a list"),
        ({"role": "user", "content": "x"}, "messages", "must be a list"),
        (["hello"], "messages[0]", "must be an object"),
        ([{"content": "x"}], "messages[0].role", "one of"),
        ([{"role": "moderator", "content": "x"}], "messages[0].role", "'moderator'"),
        ([{"role": "user"}], "messages[0].content", "got missing"),
        ([{"role": "user", "content": 3}], "messages[0].content", "got a int"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
            "only text parts",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            "messages[0].content[0].text",
            "string",
        ),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0]", "object with a type"),
        ([{"role": "system", "content": "a"}], "messages", "user message"),
        (
            [{"role": "user", "content": "x"}, {"role": "function", "content": "r"}],
            "messages[1].name",
            "name of the function",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "function", "name": "other", "content": "r"},
            ],
            "messages[2].name",
            "'other' does not match",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "function_call": {"name": "f", "arguments": "{x"}},
                {"role": "user", "content": "y"},
            ],
            "messages[1].function_call.arguments",
            "not valid JSON",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [CALL], "function_call": CALL["function"]},
                {"role": "user", "content": "y"},
            ],
            "messages[1].function_call",
            "both",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "z"},
            ],
            "messages[1].content",
            "neither content nor tool_calls",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant"},
                {"role": "user", "content": "z"},
            ],
            "messages[1].content",
            "neither content nor tool_calls",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "nope", "content": "r"},
            ],
            "messages[1].tool_call_id",
            "'nope' does not match",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
            "messages[1].tool_call_id",
            "non-empty",
        ),
    ],
)
def test_invalid_messages(tok, messages, param, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        tok.encode_chat(messages)
    assert info.value.param == param
    assert info.value.status == 400


# --- tools -------------------------------------------------------------------------------------

TOOLS_TEXT = (
    '[AVAILABLE_TOOLS] [{"name": "get_weather", "description": "Current weather in a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
    '"required": ["city"]}}] '
    "[/AVAILABLE_TOOLS]"
)
CALL_TEXT = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "call_1"}]'
)


def test_tools_append_to_system_prompt(tok):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Weather?"}]
    expected = [tok.bos_id, *tok.encode(f"[INST] Be kind.\n\n{TOOLS_TEXT}\n\nWeather? [/INST]")]
    assert tok.encode_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_tools_without_system_are_the_system_prompt(tok):
    messages = [{"role": "user", "content": "Weather?"}]
    expected = [tok.bos_id, *tok.encode(f"[INST] {TOOLS_TEXT}\n\nWeather? [/INST]")]
    assert tok.encode_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_tool_call_and_results_round(tok):
    messages = [
        {"role": "user", "content": "Weather in Zürich and Bern?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                CALL,
                {
                    **CALL,
                    "id": "call_2",
                    "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21°C"},
        {
            "role": "tool",
            "tool_call_id": "call_2",
            "content": [{"type": "text", "text": '{"t": 19}'}],
        },
        {"role": "user", "content": "Thanks!"},
    ]
    expected = (
        [tok.bos_id]
        + tok.encode(f"[INST] {TOOLS_TEXT}\n\nWeather in Zürich and Bern? [/INST]")
        + tok.encode(
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}, '
            '"id": "call_1"}, '
            '{"name": "get_weather", "arguments": {"city": "Bern"}, "id": "call_2"}]'
        )
        + [tok.eos_id]
        + tok.encode(
            '[INST] [TOOL_RESULTS] {"call_id": "call_1", "content": "21°C"} [/TOOL_RESULTS]\n\n'
            '[TOOL_RESULTS] {"call_id": "call_2", "content": "{\\"t\\": 19}"} [/TOOL_RESULTS]\n\n'
            "Thanks! [/INST]"
        )
    )
    assert tok.encode_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_tool_turn_can_end_the_conversation_and_content_precedes_calls(tok):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    expected = (
        [tok.bos_id]
        + tok.encode("[INST] Weather? [/INST]")
        + tok.encode(f"Let me check. {CALL_TEXT}")
        + [tok.eos_id]
        + tok.encode(
            '[INST] [TOOL_RESULTS] {"call_id": "call_1", "content": "sunny"} [/TOOL_RESULTS] '
            "[/INST]"
        )
    )
    assert tok.encode_chat(messages) == expected


def test_render_tool_calls_is_the_answer_format():
    assert render_tool_calls([CALL]) == CALL_TEXT
    assert render_tool_calls([CALL]).startswith(TOOL_CALLS_MARKER + " ")
    # Arguments given as an object are accepted and render the same.
    as_object = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    assert render_tool_calls([as_object]) == CALL_TEXT
    payload = json.loads(CALL_TEXT[len(TOOL_CALLS_MARKER) :])
    assert payload == [{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "call_1"}]


def test_prompt_prefix_is_stable_across_turns_with_tools(tok):
    first = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather?"}]
    second = first + [
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    a = tok.encode_chat(first, tools=[WEATHER_TOOL])
    b = tok.encode_chat(second, tools=[WEATHER_TOOL])
    assert b[: len(a)] == a


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([], "tools"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"description": "x"}}], "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": 1}}],
            "tools[0].function.description",
        ),
    ],
)
def test_invalid_tools(tok, tools, param):
    with pytest.raises(InvalidRequestError) as info:
        tok.encode_chat([{"role": "user", "content": "x"}], tools=tools)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("call", "param"),
    [
        ("x", "messages[1].tool_calls[0]"),
        ({**CALL, "id": ""}, "messages[1].tool_calls[0].id"),
        ({**CALL, "type": "code"}, "messages[1].tool_calls[0].type"),
        ({"id": "c", "function": "f"}, "messages[1].tool_calls[0].function"),
        ({"id": "c", "function": {"arguments": "{}"}}, "messages[1].tool_calls[0].function.name"),
        # One rule for function names, in tools and in the calls of the history alike.
        (
            {"id": "c", "function": {"name": "get weather", "arguments": "{}"}},
            "messages[1].tool_calls[0].function.name",
        ),
        (
            {"id": "c", "function": {"name": "f", "arguments": "{oops"}},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"id": "c", "function": {"name": "f", "arguments": "[1]"}},
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_invalid_tool_calls(tok, call, param):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "user", "content": "y"},
    ]
    with pytest.raises(InvalidRequestError) as info:
        tok.encode_chat(messages)
    assert info.value.param == param


def test_tool_result_must_follow_its_call(tok):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "call_1", "content": "early"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "user", "content": "y"},
    ]
    with pytest.raises(InvalidRequestError, match="'call_1'") as info:
        tok.encode_chat(messages)
    assert info.value.param == "messages[1].tool_call_id"
