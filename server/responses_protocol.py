"""OpenAI's Responses API, request side: a `POST /v1/responses` body -> a chat request.

`ResponsesRequest.from_json` validates the body once and translates it into what the chat path
already serves: OpenAI chat messages for the chat encoder, a `StructuredRequest` (tools,
tool_choice, `text.format`) and `SamplingParams`, held as a `ChatCompletionRequest`.

Translation:
- `instructions` is the system prompt; system/developer messages of `input` join it (the chat
  format has one system prompt, and its position never changes the prompt).
- `input`: a string is one user message; a list holds messages (content a string or
  input_text / output_text parts), `function_call` items (consecutive ones, and the assistant
  message just before them, become one assistant message with `tool_calls`, exactly as the
  model wrote them) and `function_call_output` items (tool messages).
- Tools (function, namespace and hosted tools, `tool_choice`): see `responses_tools`.

Errors name the Responses field (`tools[0].name`, `text.format.schema`, `max_output_tokens`,
`input[2].call_id`), never the chat field the value was translated into.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.errors import InvalidRequestError, MistralError

from .response_items import check_input_item
from .responses_tools import ResponsesTools, flat_name, responses_tools
from .schemas import ChatCompletionRequest

# Fields that tag, route or tune a request on a hosted service and change no output here.
NO_OP_FIELDS = frozenset(
    {
        "metadata",
        "user",
        "store",  # decides whether the response is kept; read separately
        "service_tier",
        "prompt_cache_key",
        "client_metadata",  # a client's tags for the request (Codex sends its session ids)
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "stream_options",  # include_obfuscation: padding of events, none is added here
        "max_tool_calls",  # counts built-in tool calls, which this server never makes
        "reasoning",  # effort / summary for reasoning models; vLLM and llama.cpp ignore it too
        "include",  # read for message.output_text.logprobs; the rest name items never produced
        "top_logprobs",  # used only with include message.output_text.logprobs
        "truncation",  # checked: "auto" is refused
        "background",  # checked: true is refused
    }
)
FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "previous_response_id",
        *NO_OP_FIELDS,
    }
)
# Fields that ask for something this server cannot do: a 400 naming them.
REFUSED_FIELDS = {
    "conversation": "the Conversations API is not served here; use previous_response_id",
    "prompt": "stored prompt templates are not served here; send instructions and input",
    "context_management": "server-side context compaction is not supported",
    "background_options": "background responses are not supported",
}
LOGPROBS_INCLUDE = "message.output_text.logprobs"
TEXT_PARTS = ("input_text", "output_text", "text")


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated POST /v1/responses body.

    Attributes:
        chat: the translated request (its messages hold only this request's `input`, without the
            system prompt; `messages()` adds those and a previous response's history).
        instructions: the system prompt, or None.
        input_messages: `input` as chat messages (system/developer ones moved to `instructions`).
        origins: for each input message, the `input[i]` it came from (for error names).
        previous_response_id: the response this one continues, or None.
        store: keep the response so it can be retrieved and continued.
        echo: the request fields the response object states back (tools, text, ...).
        tools: the tools as offered to the model (namespaced names, hosted tools left out).
    """

    chat: ChatCompletionRequest
    instructions: str | None = None
    input_messages: tuple[dict[str, Any], ...] = ()
    origins: tuple[str, ...] = ()
    previous_response_id: str | None = None
    store: bool = True
    echo: dict[str, Any] = field(default_factory=dict)
    tools: ResponsesTools = field(default_factory=ResponsesTools)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ResponsesRequest:
        """Raises InvalidRequestError naming the first bad field (by its Responses name)."""
        fields = {k: v for k, v in body.items() if v is not None}
        for key in fields:
            if key in REFUSED_FIELDS:
                raise _bad(f"{key}: {REFUSED_FIELDS[key]}", key)
            if key not in FIELDS:
                raise InvalidRequestError(
                    f"unrecognized request argument: {key[:100]!r}",
                    param=key[:100],
                    code="unknown_parameter",
                )
        _check_no_ops(fields)
        if "input" not in fields:
            raise _bad("input is required (a string or a list of items)", "input")
        instructions = fields.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _bad("instructions must be a string", "instructions")
        messages, origins, system = _input_messages(fields["input"])
        prompt = "\n\n".join([instructions, *system] if instructions else system) or instructions
        previous = fields.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise _bad("previous_response_id must be a string", "previous_response_id")
        store = fields.get("store", True)
        if not isinstance(store, bool):
            raise _bad(f"store must be a boolean, got {store!r:.100}", "store")
        _check_max_output_tokens(fields.get("max_output_tokens"))
        tools = responses_tools(fields)
        chat = _chat_request(fields, messages, tools)
        echo = {
            "instructions": instructions,
            "tools": fields.get("tools", []),
            "tool_choice": fields.get("tool_choice", "auto"),
            "parallel_tool_calls": chat.structured.parallel_tool_calls,
            "text": {"format": fields.get("text", {}).get("format", {"type": "text"})},
            "temperature": fields.get("temperature", 1.0),
            "top_p": fields.get("top_p", 1.0),
            "max_output_tokens": fields.get("max_output_tokens"),
            "metadata": fields.get("metadata", {}),
            "user": fields.get("user"),
            "store": store,
            "truncation": "disabled",
            "previous_response_id": previous,
            "top_logprobs": chat.params.top_logprobs,
        }
        return cls(chat, prompt, tuple(messages), tuple(origins), previous, store, echo, tools)

    def messages(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat messages to encode: the system prompt, `history` (a previous response's
        conversation, its output included), then this request's input."""
        system = (
            [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        )
        return [*system, *history, *self.input_messages]

    def rename_error(self, exc: InvalidRequestError, history_len: int) -> InvalidRequestError:
        """`exc` from the chat encoder (naming `messages[k]`) renamed to the input item."""
        match = re.match(r"messages\[(\d+)\]", exc.param or "")
        if match is None:
            if exc.param == "messages":
                return _renamed(exc, "messages", "input")
            return _rename_field(exc, self.tools.origins)  # a tool or text.format schema
        k = int(match.group(1)) - (self.instructions is not None) - history_len
        where = self.origins[k] if 0 <= k < len(self.origins) else "previous_response_id"
        return _renamed(exc, match.group(0), where)


def _renamed(exc: InvalidRequestError, old: str, new: str) -> InvalidRequestError:
    param = (exc.param or "").replace(old, new, 1).replace(".tool_call_id", ".call_id")
    out = type(exc)(exc.message.replace(old, new).replace("tool_call_id", "call_id"), param=param)
    out.code = exc.code
    return out


def _check_no_ops(fields: dict[str, Any]) -> None:
    """The no-op fields that would ask for something this server cannot do."""
    if fields.get("background") not in (None, False):
        raise _bad(
            "background: true is not supported; responses run in the request (use stream: true "
            "for long ones)",
            "background",
        )
    if fields.get("truncation") not in (None, "disabled"):
        raise _bad(
            f'truncation: only "disabled" is supported (an input over the context window is a '
            f"400), got {fields['truncation']!r:.100}",
            "truncation",
        )
    include = fields.get("include", [])
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise _bad("include must be a list of strings", "include")
    for name in ("metadata", "client_metadata", "reasoning", "stream_options"):
        if name in fields and not isinstance(fields[name], dict):
            raise _bad(f"{name} must be an object", name)
    for name in ("user", "service_tier", "prompt_cache_key", "safety_identifier"):
        if name in fields and not isinstance(fields[name], str):
            raise _bad(f"{name} must be a string", name)
    top = fields.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise _bad(f"top_logprobs must be an integer in [0, 20], got {top!r:.100}", "top_logprobs")


def _check_max_output_tokens(value: Any) -> None:
    """OpenAI refuses a budget of no tokens at all (the chat path answers it with nothing)."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise _bad(
            f"max_output_tokens must be a positive integer, got {value}", "max_output_tokens"
        )


def _chat_request(
    fields: dict[str, Any], messages: list[dict[str, Any]], tools: ResponsesTools
) -> ChatCompletionRequest:
    """The chat request the Responses fields translate into (errors renamed back)."""
    chat: dict[str, Any] = {"messages": messages, "stream": fields.get("stream", False)}
    for name in ("model", "temperature", "top_p", "parallel_tool_calls"):
        if name in fields:
            chat[name] = fields[name]
    if "max_output_tokens" in fields:
        chat["max_tokens"] = fields["max_output_tokens"]
    if LOGPROBS_INCLUDE in fields.get("include", []):
        chat["logprobs"] = True
        chat["top_logprobs"] = fields.get("top_logprobs", 0)
    if tools.chat_tools:
        chat["tools"] = tools.chat_tools
    if tools.tool_choice is not None:
        chat["tool_choice"] = tools.tool_choice
    if "text" in fields:
        chat["response_format"] = _text_format(fields["text"])
    try:
        return ChatCompletionRequest.from_json(chat)
    except InvalidRequestError as exc:
        raise _rename_field(exc, tools.origins) from None


_FIELD_NAMES = (
    (re.compile(r"\bmax_tokens\b"), "max_output_tokens"),
    (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
    (re.compile(r"\bresponse_format\b"), "text.format"),
    (re.compile(r"\btool_choice\.function\b"), "tool_choice"),
)
_CHAT_TOOL = re.compile(r"\btools\[(\d+)\](?:\.function\b)?")


def _rename_field(exc: MistralError, tool_origins: tuple[str, ...]) -> InvalidRequestError:
    """`exc` naming chat fields renamed to the Responses fields they came from: the k-th chat
    tool is `tool_origins[k]` (hosted tools are left out, namespaces hold several)."""

    def tool_origin(match: re.Match[str]) -> str:
        k = int(match.group(1))
        return tool_origins[k] if k < len(tool_origins) else f"tools[{k}]"

    message, param = exc.message, exc.param or ""
    for pattern, new in _FIELD_NAMES:
        message, param = pattern.sub(new, message), pattern.sub(new, param)
    message, param = _CHAT_TOOL.sub(tool_origin, message), _CHAT_TOOL.sub(tool_origin, param)
    out = InvalidRequestError(message, param=param or None)
    out.code = exc.code
    return out


def _text_format(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad("text must be an object", "text")
    verbosity = raw.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise _bad('text.verbosity must be "low", "medium" or "high"', "text.verbosity")
    fmt = raw.get("format", {"type": "text"})
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    if fmt.get("type") != "json_schema":
        return fmt
    keys = ("name", "schema", "strict", "description")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}


def _input_messages(raw: Any) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """`input` -> (chat messages, the input item each came from, system texts)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}], ["input"], []
    if not isinstance(raw, list) or not raw:
        raise _bad("input must be a string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    system: list[str] = []
    open_call = False  # messages[-1] is an assistant message that function_call items extend
    ids: set[str] = set()
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", where)
        check_input_item(item, where, ids)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            content = _content(item.get("content"), role, f"{where}.content")
            if role in ("system", "developer"):
                system.append(content if isinstance(content, str) else _joined(content))
                continue
            if role not in ("user", "assistant"):
                raise _bad(
                    f"{where}.role must be user, assistant, system or developer, got {role!r:.100}",
                    f"{where}.role",
                )
            if role == "assistant" and not (
                content if isinstance(content, str) else _joined(content)
            ):
                # An empty answer (ours, sent back by a client): the chat format cannot hold an
                # empty assistant turn; without it the user turns around it are joined.
                open_call = False
                continue
            messages.append({"role": role, "content": content})
            origins.append(where)
            open_call = role == "assistant"
        elif kind == "function_call":
            call = _function_call(item, where)
            if not open_call:
                messages.append({"role": "assistant", "content": None})
                origins.append(where)
            messages[-1] = {
                **messages[-1],
                "tool_calls": [*messages[-1].get("tool_calls", []), call],
            }
            open_call = True
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.call_id must be a non-empty string", f"{where}.call_id")
            output = _content(item.get("output"), "tool", f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            origins.append(where)
            open_call = False
        elif kind == "reasoning":
            continue  # another model's reasoning summary: nothing this model can read or render
        else:
            raise _bad(
                f"{where}.type {kind!r:.100} is not supported; send message, function_call or "
                "function_call_output items",
                f"{where}.type",
            )
    return messages, origins, system


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str) or (name != "arguments" and not item[name]):
            raise _bad(f"{where}.{name} must be a non-empty string", f"{where}.{name}")
    try:
        arguments = json.loads(item["arguments"] or "{}")
    except json.JSONDecodeError as exc:
        raise _bad(f"{where}.arguments is not valid JSON: {exc}", f"{where}.arguments") from None
    if not isinstance(arguments, dict):
        raise _bad(f"{where}.arguments must be a JSON object", f"{where}.arguments")
    namespace = item.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise _bad(f"{where}.namespace must be a non-empty string", f"{where}.namespace")
    name = item["name"] if namespace is None else flat_name(namespace, item["name"])
    fn = {"name": name, "arguments": item["arguments"] or "{}"}
    return {"id": item["call_id"], "type": "function", "function": fn}


def _content(raw: Any, role: Any, param: str) -> str | list[dict[str, str]]:
    """A message content (or a function_call_output's output): a string, or text parts as chat
    text parts. Images, files and audio are refused (Mistral-7B-Instruct-v0.2 reads text)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise _bad(f"{param} must be a string or a list of content parts", param)
    parts = []
    for j, part in enumerate(raw):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and role == "assistant":
            kind, part = "output_text", {"text": part.get("refusal")}
        if kind not in TEXT_PARTS:
            raise _bad(
                f"{where}.type {kind!r:.100} is not supported: only text parts (input_text, "
                "output_text) are read (Mistral-7B-Instruct-v0.2 reads text only)",
                f"{where}.type",
            )
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text must be a string", f"{where}.text")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _joined(parts: list[dict[str, str]]) -> str:
    return "\n\n".join(p["text"] for p in parts if p["text"])
