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
- every system (or developer) message goes into the system prompt, in order, joined by a blank
  line (empty ones skipped); the system prompt is put at the head of the first user turn,
  followed by a blank line; a conversation that starts with an assistant message gets an empty
  first user turn;
- an assistant message with empty content (and no tool calls) is refused;
- a conversation that ends with assistant messages asks for their continuation (the reference's
  `AssistantMessage(prefix=True)`): the prompt ends with that answer's text and no `</s>`, and
  the model goes on writing it.

Where we differ from the reference, on purpose (the hosted API allows system messages
anywhere): a system message may sit at any position, even after an assistant message (the
reference refuses that), and its position never changes the prompt: `user, system, user` is
encoded as the reference encodes `system, user, user` (the reference would split the two users
into two turns). A conversation must hold a user, tool or assistant message (the reference also
accepts lone system messages). The legacy `function` role (`{"role": "function", "name",
"content"}`, OpenAI's tool result before `tool_call_id` existed) is a tool result whose call id
is the function's name.

Tools (v0.2 has no tool tokens, so tools are plain text in the layout of
`mlx_mistral.tools.format`):

- Tool definitions go at the end of the system prompt (after the system text and a blank line,
  or as the whole system prompt), so the prompt prefix stays the same from turn to turn:
  `[AVAILABLE_TOOLS] [{"name": ..., "description": ..., "parameters": ...}] [/AVAILABLE_TOOLS]`
  (each function object keeps only the keys the request gave, in that order). They come
  validated (`ToolSpec`s from `mlx_mistral.tools.validation`).
- An assistant message with `tool_calls` is the answer `[TOOL_CALLS] [{"name": ..., "arguments":
  {...}, "id": ...}]` followed by `</s>`; content given too comes first, then one space.
- A tool message is `[TOOL_RESULTS] {"call_id": ..., "content": ...} [/TOOL_RESULTS]` inside the
  user-side turn: tool results and user messages next to each other share one `[INST]` turn,
  joined by a blank line. Its `tool_call_id` must name a call made by an earlier assistant message.

Messages are validated once (`parse_chat`) into a `Conversation`, which is rendered
(`render_chat`) and encoded (`encode_chat`), and which answers questions about the history (does
it hold tool calls?) without walking unvalidated messages again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .errors import InvalidRequestError
from .tools.format import check_name, render_answer, render_available_tools, render_tool_result
from .tools.spec import StructuredRequest, ToolCall, ToolSpec

INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
JOIN = "\n\n"  # between merged messages, content parts, and system prompt / first user text

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
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


@dataclass(frozen=True)
class MessageGroup:
    """Consecutive messages of one side: user texts and tool results, or assistant answers."""

    side: Literal["user", "assistant"]
    texts: tuple[str, ...]  # as rendered (a tool result in its markers), empty ones included
    calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """Validated messages: the system text and the groups of same-side messages.

    A conversation ending with an assistant-side group asks for that answer's continuation.
    """

    system: str
    groups: tuple[MessageGroup, ...]

    @property
    def continues(self) -> bool:
        """Whether the prompt ends inside an answer that the model is to go on writing."""
        return self.groups[-1].side == "assistant"

    @property
    def holds_tool_calls(self) -> bool:
        """Whether an assistant message made a tool call (every tool result answers one)."""
        return any(group.calls for group in self.groups)


def encode_chat(
    tokenizer: TextEncoder,
    conversation: Conversation,
    *,
    tools: Sequence[ToolSpec] | None = None,
) -> list[int]:
    """Encode a validated conversation into v0.2 prompt ids.

    Args:
        tokenizer: Anything with `encode(text)`, `bos_id` and `eos_id` (a `Tokenizer`).
        conversation: The messages, validated by `parse_chat`.
        tools: The validated tools to show the model, or None.

    Returns:
        Prompt token ids, starting with `<s>` and ending with the last `[/INST]` (or, for a
        conversation that `continues`, with the answer to continue, without `</s>`).

    Example:
        >>> encode_chat(tok, parse_chat([{"role": "user", "content": "Hi"}]))  # doctest: +SKIP
        [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793]
    """
    ids = [tokenizer.bos_id]
    turns = render_chat(conversation, tools=tools)
    for n, turn in enumerate(turns, start=1):
        ids.extend(tokenizer.encode(turn.text))
        if turn.role == "assistant" and not (n == len(turns) and conversation.continues):
            ids.append(tokenizer.eos_id)
    return ids


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request's prompt.

    Attributes:
        ids: The prompt's token ids.
        spec: The request's structured fields for this conversation.
        continues: The prompt ends inside an answer (a final assistant message), so generated
            text continues it: its first word keeps its leading space.
    """

    ids: list[int]
    spec: StructuredRequest
    continues: bool


def encode_chat_prompt(
    tokenizer: TextEncoder, messages: Any, spec: StructuredRequest
) -> ChatPrompt:
    """The prompt of a chat request, and its structured fields for this conversation.

    The messages are validated once; the conversation then says whether its history holds tool
    calls (`StructuredRequest.for_history`), and the prompt shows `spec.prompt_tools`.

    Raises:
        InvalidRequestError: If a message is malformed; `param` names it. Also when a final
            assistant message is to be continued under a grammar (tools, a JSON
            response_format): the grammar describes a whole answer, not the rest of one.
    """
    conversation = parse_chat(messages)
    spec = spec.for_history(conversation.holds_tool_calls)
    if conversation.continues and spec.constrained:
        raise InvalidRequestError(
            "the conversation ends with an assistant message to continue, which cannot be "
            "combined with tools or a JSON response_format (they shape a whole answer); end "
            "with a user message, or leave tools and response_format out",
            param="messages",
        )
    ids = encode_chat(tokenizer, conversation, tools=spec.prompt_tools)
    return ChatPrompt(ids, spec, conversation.continues)


def encode_chat_request(
    tokenizer: TextEncoder, messages: Any, spec: StructuredRequest
) -> tuple[list[int], StructuredRequest]:
    """The prompt of a chat request, and its structured fields for this conversation.

    See `encode_chat_prompt`, which also says whether the prompt continues a final answer.

    Raises:
        InvalidRequestError: If a message is malformed; `param` names it.
    """
    prompt = encode_chat_prompt(tokenizer, messages, spec)
    return prompt.ids, prompt.spec


def parse_chat(messages: Any) -> Conversation:
    """Validate OpenAI chat messages into a `Conversation` (see the module docstring).

    Args:
        messages: The OpenAI `messages` list.

    Returns:
        The conversation: the system text, and the groups of same-side messages.

    Raises:
        InvalidRequestError: If a message is malformed; `param` names it.

    Example:
        >>> chat = parse_chat(
        ...     [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"}])
        >>> chat.system, chat.groups[0].texts, chat.holds_tool_calls
        ('S', ('Hi',), False)
    """
    if not isinstance(messages, list):
        raise InvalidRequestError(
            f"messages must be a list of message objects, got {type(messages).__name__}",
            param="messages",
        )
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")

    system_texts: list[str] = []
    # Groups of consecutive same-side messages: (side, texts, calls).
    groups: list[tuple[Literal["user", "assistant"], list[str], list[ToolCall]]] = []
    calls_made: list[ToolCall] = []  # by earlier assistant messages, in order
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
            system_texts.append(content_text(msg.get("content"), param=f"{where}.content"))
            continue
        side = "assistant" if role == "assistant" else "user"
        if not groups or groups[-1][0] != side:
            groups.append((side, [], []))
        texts, calls = groups[-1][1], groups[-1][2]
        if role == "user":
            texts.append(content_text(msg.get("content"), param=f"{where}.content"))
        elif role == "tool":
            call_id = _tool_call_id(msg, where, calls_made)
            texts.append(_tool_result(msg, where, call_id))
        elif role == "function":
            call_id = _function_call_id(msg, where, calls_made)
            texts.append(_tool_result(msg, where, call_id))
        else:
            content = msg.get("content")
            text = "" if content is None else content_text(content, param=f"{where}.content")
            new_calls = _assistant_calls(msg, where, i)
            if not text and not new_calls:
                raise InvalidRequestError(
                    f"{where} is an assistant message with neither content nor tool_calls",
                    param=f"{where}.content",
                )
            texts.append(text)
            calls.extend(new_calls)
            calls_made.extend(new_calls)

    if not groups:
        raise InvalidRequestError("messages must contain a user message", param="messages")
    if groups[-1][0] == "assistant" and groups[-1][2]:
        raise InvalidRequestError(
            "the conversation ends with an assistant message that makes tool calls: send the "
            'tool results (role "tool") to get an answer; only an answer\'s text can be '
            "continued",
            param="messages",
        )
    return Conversation(
        JOIN.join(t for t in system_texts if t),
        tuple(MessageGroup(side, tuple(texts), tuple(calls)) for side, texts, calls in groups),
    )


def render_chat(
    conversation: Conversation, *, tools: Sequence[ToolSpec] | None = None
) -> tuple[ChatTurn, ...]:
    """Render a validated conversation into turns of text (see the module docstring).

    Args:
        conversation: The messages, validated by `parse_chat`.
        tools: The validated tools to show the model, or None.

    Returns:
        The turns, user and assistant alternating, starting with a user turn and ending with
        one (or with the answer to continue).
    """
    system_prompt = conversation.system
    if tools:
        tools_text = render_available_tools(tools)
        system_prompt = f"{system_prompt}{JOIN}{tools_text}" if system_prompt else tools_text

    groups = conversation.groups
    if groups[0].side == "assistant":
        groups = (MessageGroup("user", ()), *groups)
    turns = []
    for n, group in enumerate(groups):
        text = _join(group.texts)
        if group.side == "user":
            if n == 0 and system_prompt:
                text = system_prompt + JOIN + text
            turns.append(ChatTurn("user", f"{INST_OPEN} {text} {INST_CLOSE}"))
        else:
            turns.append(ChatTurn("assistant", render_answer(text, group.calls)))
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
    return render_answer("", _tool_calls(calls, "tool_calls"))


def _tool_call_id(msg: dict[str, Any], where: str, calls_made: Sequence[ToolCall]) -> str:
    """A tool message's `tool_call_id`, which must name a call made earlier."""
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequestError(
            f"{where}.tool_call_id must be a non-empty string",
            param=f"{where}.tool_call_id",
        )
    if all(call.id != call_id for call in calls_made):
        raise InvalidRequestError(
            f"{where}.tool_call_id {call_id!r} does not match any tool call of an earlier "
            "assistant message",
            param=f"{where}.tool_call_id",
        )
    return call_id


def _function_call_id(msg: dict[str, Any], where: str, calls_made: Sequence[ToolCall]) -> str:
    """The call a legacy function message answers: the latest earlier call of its `name` (the
    legacy format names the function, not the call)."""
    name = msg.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            f"{where}.name must be the name of the function whose result this is",
            param=f"{where}.name",
        )
    for call in reversed(calls_made):
        if call.name == name:
            return call.id
    raise InvalidRequestError(
        f"{where}.name {name[:100]!r} does not match any function called by an earlier "
        "assistant message",
        param=f"{where}.name",
    )


def _tool_result(msg: dict[str, Any], where: str, call_id: str) -> str:
    """A tool (or function) message as text."""
    return render_tool_result(call_id, content_text(msg.get("content"), param=f"{where}.content"))


def _assistant_calls(msg: dict[str, Any], where: str, position: int) -> list[ToolCall]:
    """The calls of an assistant message: its `tool_calls`, or its legacy `function_call`."""
    raw_calls = msg.get("tool_calls")
    calls = [] if raw_calls is None else _tool_calls(raw_calls, f"{where}.tool_calls")
    legacy = msg.get("function_call")
    if legacy is None:
        return calls
    if calls:
        raise InvalidRequestError(
            f"{where} has both tool_calls and the legacy function_call; send one",
            param=f"{where}.function_call",
        )
    # The legacy call has no id; the prompt shows one like the model's own, derived from the
    # message's position so the same history always renders the same prompt (prefix cache).
    call_id = "call_" + hashlib.sha256(f"{position}".encode()).hexdigest()[:9]
    return [_call(legacy, f"{where}.function_call", call_id)]


def _tool_calls(raw: Any, param: str) -> list[ToolCall]:
    """Validate OpenAI tool calls (arguments parsed)."""
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
        calls.append(_call(call.get("function"), f"{where}.function", call_id))
    return calls


def _call(fn: Any, param: str, call_id: str) -> ToolCall:
    """Validate one `{"name", "arguments"}` function object (arguments parsed)."""
    if not isinstance(fn, dict):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    name = check_name(fn.get("name"), f"{param}.name")
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"{param}.arguments is not valid JSON: {exc}", param=f"{param}.arguments"
            ) from exc
    if not isinstance(arguments, dict):
        raise InvalidRequestError(
            f"{param}.arguments must be a JSON object (as a string)", param=f"{param}.arguments"
        )
    return ToolCall(name, arguments, call_id)


def _join(texts: Sequence[str]) -> str:
    return JOIN.join(t for t in texts if t)
