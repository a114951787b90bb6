"""OpenAI chat messages -> Mistral-7B-Instruct-v0.2 prompt token ids.

The conversation format is mistral-common's v1 instruct encoding (the reference for v0.2), token
for token:

    <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]

Each `[INST] ... [/INST]` turn and each answer is encoded separately by SentencePiece (so each
gets its own dummy-prefix space), and every answer ends with `</s>`. As in mistral-common's request
normalizer:

- consecutive user messages share one turn, their texts joined by a blank line ("\\n\\n"), and
  empty texts are skipped; consecutive assistant messages are joined the same way;
- an OpenAI content-part array `[{"type": "text", "text": ...}, ...]` is joined the same way
  (text parts only: images and audio are refused, v0.2 reads text);
- the system prompt is put at the head of the first user turn, followed by a blank line; a
  conversation that starts with an assistant message gets an empty first user turn;
- an assistant message with empty content (and no tool calls) is refused.

Where we differ from the reference, on purpose (the hosted API allows "one system message
anywhere"): a system message may sit at any position, even after an assistant message (the
reference refuses that), and its position never changes the prompt: `user, system, user` is
encoded as the reference encodes `system, user, user` (the reference would split the two users
into two turns). A conversation must end with a user or tool message (the reference also accepts
a lone system message).

Tools (v0.2 has no tool tokens, so tools are plain text in this fixed format):

- Tool definitions go at the end of the system prompt (after the system text and a blank line,
  or as the whole system prompt), so the prompt prefix stays the same from turn to turn:
  `[AVAILABLE_TOOLS] [{"name": ..., "description": ..., "parameters": ...}] [/AVAILABLE_TOOLS]`
  (each function object keeps only the keys the request gave, in that order).
- An assistant message with `tool_calls` is the answer `[TOOL_CALLS] [{"name": ..., "arguments":
  {...}, "id": ...}]` followed by `</s>`; content given too comes first, then one space.
- A tool message is `[TOOL_RESULTS] {"call_id": ..., "content": ...} [/TOOL_RESULTS]` inside the
  user-side turn: tool results and user messages next to each other share one `[INST]` turn,
  joined by a blank line. Its `tool_call_id` must name a call made by an earlier assistant message.

All JSON is `json.dumps(..., ensure_ascii=False, separators=(", ", ": "))`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .errors import InvalidRequestError

INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
AVAILABLE_TOOLS_OPEN = "[AVAILABLE_TOOLS]"
AVAILABLE_TOOLS_CLOSE = "[/AVAILABLE_TOOLS]"
TOOL_CALLS_PREFIX = "[TOOL_CALLS]"
TOOL_RESULTS_OPEN = "[TOOL_RESULTS]"
TOOL_RESULTS_CLOSE = "[/TOOL_RESULTS]"
JOIN = "\n\n"  # between merged messages, content parts, and system prompt / first user text

ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI's newer clients send the system prompt as a "developer" message: the same thing here.
SYSTEM_ROLES = ("system", "developer")


class TextEncoder(Protocol):
    """What the chat format needs from a tokenizer."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class ChatTurn:
    """One encoded unit: a whole `[INST] ... [/INST]` user turn, or an answer (gets `</s>`)."""

    role: Literal["user", "assistant"]
    text: str


def encode_chat(
    tokenizer: TextEncoder,
    messages: Any,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """Encode OpenAI chat messages into v0.2 prompt ids.

    Args:
        tokenizer: Anything with `encode(text)`, `bos_id` and `eos_id` (a `Tokenizer`).
        messages: The OpenAI `messages` list.
        tools: The OpenAI `tools` list, or None.

    Returns:
        Prompt token ids, starting with `<s>` and ending with the last `[/INST]`.

    Raises:
        InvalidRequestError: If a message or tool is malformed; `param` names it.

    Example:
        >>> encode_chat(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793]
    """
    ids = [tokenizer.bos_id]
    for turn in render_chat(messages, tools=tools):
        ids.extend(tokenizer.encode(turn.text))
        if turn.role == "assistant":
            ids.append(tokenizer.eos_id)
    return ids


def render_chat(
    messages: Any, *, tools: Sequence[dict[str, Any]] | None = None
) -> tuple[ChatTurn, ...]:
    """Validate messages and render them into turns of text (see the module docstring).

    Args:
        messages: The OpenAI `messages` list.
        tools: The OpenAI `tools` list, or None.

    Returns:
        The turns, user and assistant alternating, starting and ending with a user turn.

    Raises:
        InvalidRequestError: If a message or tool is malformed; `param` names it.
    """
    if not isinstance(messages, list):
        raise InvalidRequestError(
            f"messages must be a list of message objects, got {type(messages).__name__}",
            param="messages",
        )
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")

    system_text = ""
    system_at: int | None = None
    # Groups of consecutive same-side messages: ("user", [texts]) or ("assistant", [texts], [calls]).
    groups: list[tuple[str, list[str], list[dict[str, Any]]]] = []
    call_ids: set[str] = set()
    last_role = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequestError(
                f"{where} must be an object with a role and content, got {type(msg).__name__}",
                param=where,
            )
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        if role in SYSTEM_ROLES:
            if system_at is not None:
                raise InvalidRequestError(
                    f"only one system (or developer) message is allowed; messages[{system_at}] "
                    f"is already one",
                    param=where,
                )
            system_at = i
            system_text = content_text(msg.get("content"), param=f"{where}.content")
            continue
        last_role = role
        side = "assistant" if role == "assistant" else "user"
        if not groups or groups[-1][0] != side:
            groups.append((side, [], []))
        texts, calls = groups[-1][1], groups[-1][2]
        if role == "user":
            texts.append(content_text(msg.get("content"), param=f"{where}.content"))
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(
                    f"{where}.tool_call_id must be a non-empty string",
                    param=f"{where}.tool_call_id",
                )
            if call_id not in call_ids:
                raise InvalidRequestError(
                    f"{where}.tool_call_id {call_id!r} does not match any tool call of an earlier "
                    "assistant message",
                    param=f"{where}.tool_call_id",
                )
            text = content_text(msg.get("content"), param=f"{where}.content")
            texts.append(render_tool_result(call_id, text))
        else:
            content = msg.get("content")
            text = "" if content is None else content_text(content, param=f"{where}.content")
            raw_calls = msg.get("tool_calls")
            new_calls = [] if raw_calls is None else _tool_calls(raw_calls, f"{where}.tool_calls")
            if not text and not new_calls:
                raise InvalidRequestError(
                    f"{where} is an assistant message with neither content nor tool_calls",
                    param=f"{where}.content",
                )
            texts.append(text)
            calls.extend(new_calls)
            call_ids.update(call["id"] for call in new_calls)

    if last_role is None:
        raise InvalidRequestError("messages must contain a user message", param="messages")
    if last_role == "assistant":
        raise InvalidRequestError(
            "the conversation must end with a user or tool message, not an assistant message",
            param="messages",
        )

    system_prompt = system_text
    if tools is not None:
        tools_text = render_available_tools(tools)
        system_prompt = f"{system_text}{JOIN}{tools_text}" if system_text else tools_text

    if groups[0][0] == "assistant":
        groups.insert(0, ("user", [], []))
    turns = []
    for n, (side, texts, calls) in enumerate(groups):
        text = _join(texts)
        if side == "user":
            if n == 0 and system_prompt:
                text = system_prompt + JOIN + text
            turns.append(ChatTurn("user", f"{INST_OPEN} {text} {INST_CLOSE}"))
        else:
            if calls:
                rendered = _render_calls(calls)
                text = f"{text} {rendered}" if text else rendered
            turns.append(ChatTurn("assistant", text))
    return tuple(turns)


def content_text(content: Any, *, param: str) -> str:
    """The text of a message `content`: a string, or text parts joined by a blank line.

    Args:
        content: A string or an OpenAI content-part list.
        param: The field's name, for errors.

    Returns:
        The text (empty parts skipped, as the reference does).

    Raises:
        InvalidRequestError: If content is missing, not text, or has a non-text part.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        what = "missing" if content is None else f"a {type(content).__name__}"
        raise InvalidRequestError(
            f"{param} must be a string or a list of text parts, got {what}", param=param
        )
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise InvalidRequestError(f"{where} must be an object with a type", param=where)
        if part["type"] != "text":
            raise InvalidRequestError(
                f"{where} has type {part['type']!r}: only text parts are supported "
                "(Mistral-7B-Instruct-v0.2 reads text only)",
                param=where,
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}.text must be a string", param=f"{where}.text")
        texts.append(part["text"])
    return _join(texts)


def render_available_tools(tools: Sequence[dict[str, Any]]) -> str:
    """`[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]` for OpenAI tool definitions.

    Args:
        tools: OpenAI `tools`: `[{"type": "function", "function": {"name", "description",
            "parameters"}}]`.

    Returns:
        The block of text appended to the system prompt.

    Raises:
        InvalidRequestError: If a tool is malformed (param `tools[i]...`).
    """
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools must be a non-empty list of tool objects", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequestError(
                f'{where} must be an object with "type": "function"', param=f"{where}.type"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(
                f"{where}.function must be an object", param=f"{where}.function"
            )
        _check_name(fn.get("name"), f"{where}.function.name")
        if not isinstance(fn.get("description", ""), str):
            raise InvalidRequestError(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidRequestError(
                f"{where}.function.parameters must be a JSON Schema object",
                param=f"{where}.function.parameters",
            )
        functions.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    return f"{AVAILABLE_TOOLS_OPEN} {_dumps(functions)} {AVAILABLE_TOOLS_CLOSE}"


def render_tool_calls(calls: Sequence[dict[str, Any]]) -> str:
    """`[TOOL_CALLS] [{"name", "arguments", "id"}, ...]` for OpenAI `tool_calls`.

    The decoder side parses model output in this same format.

    Args:
        calls: OpenAI tool calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`
            with `arguments` a JSON string (an object is accepted too).

    Returns:
        The answer text (without `</s>`).

    Raises:
        InvalidRequestError: If a call is malformed (param `tool_calls[j]...`).
    """
    return _render_calls(_tool_calls(calls, "tool_calls"))


def render_tool_result(call_id: str, content: str) -> str:
    """`[TOOL_RESULTS] {"call_id": ..., "content": ...} [/TOOL_RESULTS]` for one tool message."""
    return f"{TOOL_RESULTS_OPEN} {_dumps({'call_id': call_id, 'content': content})} {TOOL_RESULTS_CLOSE}"


def _tool_calls(raw: Any, param: str) -> list[dict[str, Any]]:
    """Validate OpenAI tool calls into `{"name", "arguments", "id"}` dicts (arguments parsed)."""
    if not isinstance(raw, list):
        raise InvalidRequestError(f"{param} must be a list of tool calls", param=param)
    calls = []
    for j, call in enumerate(raw):
        where = f"{param}[{j}]"
        if not isinstance(call, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if call.get("type", "function") != "function":
            raise InvalidRequestError(f'{where}.type must be "function"', param=f"{where}.type")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequestError(f"{where}.id must be a non-empty string", param=f"{where}.id")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(
                f"{where}.function must be an object", param=f"{where}.function"
            )
        _check_name(fn.get("name"), f"{where}.function.name")
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"{where}.function.arguments is not valid JSON: {exc}",
                    param=f"{where}.function.arguments",
                ) from exc
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                f"{where}.function.arguments must be a JSON object (as a string)",
                param=f"{where}.function.arguments",
            )
        calls.append({"name": fn["name"], "arguments": arguments, "id": call_id})
    return calls


def _render_calls(calls: list[dict[str, Any]]) -> str:
    return f"{TOOL_CALLS_PREFIX} {_dumps(calls)}"


def _check_name(name: Any, param: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{param} must be a non-empty string", param=param)


def _join(texts: list[str]) -> str:
    return JOIN.join(t for t in texts if t)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
