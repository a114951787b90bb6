"""The tool format as text: v0.2 has no tool tokens, so tools, calls and results are plain text.

`mlx_mistral.chat` writes it into prompts, `mlx_mistral.tools.grammar` forces it while decoding
and `mlx_mistral.tools.parsing` reads it back; all three are built from the pieces here, so a
generated call re-renders byte for byte into the next prompt:

    [AVAILABLE_TOOLS] [{"name": ..., "description": ..., "parameters": ...}] [/AVAILABLE_TOOLS]
    Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {...}, "id": "call_AbC123xyz"}]
    [TOOL_RESULTS] {"call_id": ..., "content": ...} [/TOOL_RESULTS]

All JSON is `dumps`: `json.dumps(..., ensure_ascii=False, separators=(", ", ": "))`.

Example:
    >>> from mlx_mistral.tools.spec import ToolCall
    >>> render_answer("Sure.", [ToolCall("f", {"x": 1}, "call_1")])
    'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}, "id": "call_1"}]'
"""

from __future__ import annotations

import json
import random
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequestError
from .spec import ToolCall, ToolSpec

AVAILABLE_TOOLS_OPEN = "[AVAILABLE_TOOLS]"
AVAILABLE_TOOLS_CLOSE = "[/AVAILABLE_TOOLS]"
TOOL_CALLS_MARKER = "[TOOL_CALLS]"
TOOL_RESULTS_OPEN = "[TOOL_RESULTS]"
TOOL_RESULTS_CLOSE = "[/TOOL_RESULTS]"

ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
# The escapes `dumps` writes; every other character is written raw (ensure_ascii=False), except
# the control characters, which it writes as "\u00XX".
STRING_ESCAPES = '"\\bfnrt'
CONTENT_SEPARATOR = " "  # between an answer's content and its calls
CALLS_HEAD = TOOL_CALLS_MARKER + " "  # the call array follows


def dumps(value: Any) -> str:
    """JSON as the format writes it (see the module docstring)."""
    return json.dumps(value, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))


def _key(name: str) -> str:
    return dumps(name) + KEY_SEPARATOR


# A call's keys, in their order: {"name": ..., "arguments": ..., "id": ...}.
CALL_OPEN = "{" + _key("name")
ARGUMENTS_KEY = ITEM_SEPARATOR + _key("arguments")  # after the name
ID_KEY = ITEM_SEPARATOR + _key("id")  # after the arguments
CALL_CLOSE = "}"


def call_tail(call_id: str) -> str:
    """What follows a call's arguments: its id and the closing brace."""
    return ID_KEY + dumps(call_id) + CALL_CLOSE


def render_calls(calls: Sequence[ToolCall]) -> str:
    """`[TOOL_CALLS] [{"name", "arguments", "id"}, ...]`: an answer's calls (without `</s>`)."""
    rendered = (
        CALL_OPEN + dumps(call.name) + ARGUMENTS_KEY + dumps(call.arguments) + call_tail(call.id)
        for call in calls
    )
    return CALLS_HEAD + "[" + ITEM_SEPARATOR.join(rendered) + "]"


def render_answer(content: str, calls: Sequence[ToolCall]) -> str:
    """An assistant answer: its content, then (after one space) its calls, if any."""
    if not calls:
        return content
    rendered = render_calls(calls)
    return content + CONTENT_SEPARATOR + rendered if content else rendered


def render_available_tools(tools: Sequence[ToolSpec]) -> str:
    """`[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]`: each function with only the keys it has."""
    functions = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        functions.append(function)
    return f"{AVAILABLE_TOOLS_OPEN} {dumps(functions)} {AVAILABLE_TOOLS_CLOSE}"


def render_tool_result(call_id: str, content: str) -> str:
    """`[TOOL_RESULTS] {"call_id": ..., "content": ...} [/TOOL_RESULTS]` for one tool message."""
    result = dumps({"call_id": call_id, "content": content})
    return f"{TOOL_RESULTS_OPEN} {result} {TOOL_RESULTS_CLOSE}"


# OpenAI's rule for function names; it also keeps names free of quotes and backslashes, so a
# name is written as it is and the streaming reader can take it without decoding escapes.
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def check_name(name: Any, param: str) -> str:
    """`name` if it is a valid function (or schema) name.

    Raises:
        InvalidRequestError: It is not; `param` names the field.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(
            f"{param} must be 1 to 64 letters, digits, underscores or dashes, got {name!r}",
            param=param,
        )
    return name


CALL_ID_PREFIX = "call_"
CALL_ID_CHARS = 9  # ~62 bits; 24 would cost ~12 more forced tokens per call
_ALPHANUM = string.ascii_letters + string.digits


def new_call_id(rng: random.Random | None = None) -> str:
    """A tool-call id: "call_" and `CALL_ID_CHARS` random letters and digits.

    Args:
        rng: Where the randomness comes from (default: the OS's secure source).

    Example:
        >>> new_call_id(random.Random(0))
        'call_2yW4Acq9G'
    """
    choose = rng.choice if rng is not None else secrets.choice
    return CALL_ID_PREFIX + "".join(choose(_ALPHANUM) for _ in range(CALL_ID_CHARS))
