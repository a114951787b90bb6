"""Anthropic's Messages API, request side: a `/v1/messages` body -> the engine's chat request.

`MessagesRequest.from_json` validates the body once and translates it into what the chat path
takes: OpenAI-shaped messages for `encode_chat`, a `StructuredRequest` (tools, tool_choice, an
`output_config.format` schema) and `SamplingParams`. Every error names the Anthropic field
("messages[2].content[0].type", "tools[1].input_schema", "stop_sequences").

Translation:
- `system` (a string or text blocks) is the system message, less any block that is only Claude
  Code's attribution line (`ATTRIBUTION_PREFIX`): it carries no instruction and changes with
  every session, so keeping it would make each new session miss the prefix cache.
- A `role: "system"` message inside `messages` (Anthropic's mid-conversation system messages) is
  a system message where it stands; the chat format folds every system text into the system
  prompt, as it does for Chat Completions.
- A user message's blocks become, in order, user messages (runs of text blocks) and tool
  messages (each `tool_result`); an assistant message's `text` and `tool_use` blocks become one
  assistant message with its `tool_calls`. `thinking` blocks in the history (from another
  model) are dropped: this model has no thinking phase to continue, and an assistant turn that
  held only those is left out. A final assistant message with no content is no prefill.
- `tools`, `tool_choice`, `output_config.format` and `output_format`: `anthropic_tools`.
- `max_tokens` (required), `stop_sequences`, `temperature`, `top_p`, `top_k` are the sampling
  parameters; `stream` asks for the event stream.

Fields that change nothing here are accepted and dropped (`NO_OP_FIELDS`); fields that ask for
what this server cannot do are a 400 naming them (`REFUSED_FIELDS`); any other field is a 400
naming it. `thinking` is accepted and answered without a thinking block: the model has no
thinking phase, and Claude Code sends `thinking` by default (refusing it would refuse Claude Code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tools.spec import StructuredRequest
from mlx_mistral.tools.validation import parse_structured_request

from .anthropic_tools import (
    call_id_of,
    translate_output_format,
    translate_tool_choice,
    translate_tools,
)
from .schemas import ChatCompletionRequest

NO_OP_FIELDS = frozenset(
    {
        "metadata",  # user_id: tags the request on a hosted service
        "service_tier",
        "cache_control",  # the prefix cache here is automatic
        "context_management",  # a conversation too long for the window is a 400 anyway
        "inference_geo",
        "speed",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
    }
)
"""Fields that route, tag or tune a request on Anthropic's service: they change no output here."""

REFUSED_FIELDS = {
    "container": "code-execution containers are not available on this server",
    "mcp_servers": "this server does not connect to MCP servers; give the tools in `tools`",
}
"""Fields that ask for something this server cannot do, with why."""

_SAMPLING_FIELDS = ("max_tokens", "stop_sequences", "temperature", "top_p", "top_k")
_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        *_SAMPLING_FIELDS,
    }
)
_THINKING_TYPES = ("enabled", "disabled", "adaptive")
# Blocks that an Anthropic model may have written into the history: nothing to replay here.
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
ATTRIBUTION_PREFIX = "x-anthropic-billing-header:"
"""How Claude Code's per-session attribution line in `system` begins (left out of the prompt)."""


@dataclass(frozen=True)
class MessagesRequest:
    """A validated /v1/messages (or /v1/messages/count_tokens) body, translated.

    Attributes:
        messages: OpenAI-shaped chat messages for `encode_chat`.
        params: the sampling parameters (max_tokens always set, except for count_tokens).
        structured: tools, tool_choice and the output format.
        model: the model name the client sent (any name is served).
        stream: answer with Anthropic's event stream.
    """

    messages: list[dict[str, Any]]
    params: SamplingParams
    structured: StructuredRequest
    model: str | None = None
    stream: bool = False

    @classmethod
    def from_json(cls, body: dict[str, Any], *, count_only: bool = False) -> MessagesRequest:
        """Raises InvalidRequestError naming the first bad field (max_tokens is required unless
        `count_only`, for /v1/messages/count_tokens)."""
        fields = _fields(body)
        if "max_tokens" not in fields and not count_only:
            raise InvalidRequestError("max_tokens is required", param="max_tokens")
        if "messages" not in fields:
            raise InvalidRequestError("messages is required", param="messages")
        model = fields.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequestError(f"model must be a string, got {model!r:.100}", param="model")
        stream = fields.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequestError(
                f"stream must be a boolean, got {stream!r:.100}", param="stream"
            )
        _check_thinking(fields.get("thinking"))
        tools = translate_tools(fields.get("tools"))
        choice, parallel = translate_tool_choice(fields.get("tool_choice"), has_tools=bool(tools))
        try:
            structured = parse_structured_request(
                tools=tools,
                tool_choice=choice,
                parallel_tool_calls=parallel,
                response_format=translate_output_format(
                    fields.get("output_config"), fields.get("output_format")
                ),
            )
        except InvalidRequestError as exc:
            raise _in_anthropic_terms(exc, "output_format" in fields) from None
        messages = _system(fields.get("system")) + _messages(fields["messages"])
        return cls(messages, _params(fields), structured, model, stream)

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as the chat path takes it (`app.chat_prompt`)."""
        return ChatCompletionRequest(self.messages, self.params, structured=self.structured)

    def with_max_tokens(self, max_tokens: int) -> MessagesRequest:
        return replace(self, params=replace(self.params, max_tokens=max_tokens))


# The OpenAI names that `parse_structured_request`'s errors use, and the fields they are here.
_RENAMES = (
    (".function.parameters", ".input_schema"),
    (".function.description", ".description"),
    (".function.name", ".name"),
    (".function.strict", ".strict"),
    ("response_format.json_schema.schema", "output_config.format.schema"),
)


def _in_anthropic_terms(exc: InvalidRequestError, beta_format: bool) -> InvalidRequestError:
    message, param = exc.message, exc.param or ""
    renames = _RENAMES + ((("output_config.format", "output_format"),) if beta_format else ())
    for openai_name, name in renames:
        message, param = message.replace(openai_name, name), param.replace(openai_name, name)
    return InvalidRequestError(message, param=param or None)


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    """The body without nulls and no-op fields; a refused or unknown field is a 400 naming it."""
    out = {}
    for key, value in body.items():
        if value is None or key in NO_OP_FIELDS:
            continue
        if key in REFUSED_FIELDS:
            raise InvalidRequestError(f"{key} is not supported: {REFUSED_FIELDS[key]}", param=key)
        if key not in _FIELDS:
            raise InvalidRequestError(
                f"{key[:100]}: extra inputs are not permitted", param=key[:100]
            )
        out[key] = value
    return out


def _params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams under Anthropic's names (a `stop` error is about `stop_sequences`)."""
    max_tokens = fields.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise InvalidRequestError(
            f"max_tokens must be an integer of at least 1, got {max_tokens!r:.100}",
            param="max_tokens",
        )
    stops = fields.get("stop_sequences", [])
    if not isinstance(stops, list):
        raise InvalidRequestError(
            f"stop_sequences must be a list of strings, got {stops!r:.100}", param="stop_sequences"
        )
    kwargs = {k: fields[k] for k in ("temperature", "top_p", "top_k") if k in fields}
    try:
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stops), **kwargs)
    except InvalidRequestError as exc:
        if exc.param != "stop":
            raise
        message = exc.message.replace("stop strings", "stop_sequences").replace("stop ", "", 1)
        raise InvalidRequestError(f"stop_sequences: {message}", param="stop_sequences") from None


def _check_thinking(thinking: Any) -> None:
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in _THINKING_TYPES:
        raise InvalidRequestError(
            f"thinking must be an object whose type is one of {', '.join(_THINKING_TYPES)}",
            param="thinking",
        )
    budget = thinking.get("budget_tokens")
    if thinking["type"] == "enabled" and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise InvalidRequestError(
            "thinking.budget_tokens must be an integer", param="thinking.budget_tokens"
        )


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if not isinstance(system, list):
        raise InvalidRequestError(
            "system must be a string or a list of text blocks", param="system"
        )
    texts = [_text_block(block, f"system[{j}]") for j, block in enumerate(system)]
    kept = [t for t in texts if t and not t.startswith(ATTRIBUTION_PREFIX)]
    return [{"role": "system", "content": "\n\n".join(kept)}] if kept else []


def _text_block(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        got = block.get("type") if isinstance(block, dict) else type(block).__name__
        raise InvalidRequestError(f"{where} must be a text block, got {got!r:.100}", param=where)
    if not isinstance(block.get("text"), str):
        raise InvalidRequestError(f"{where}.text must be a string", param=f"{where}.text")
    return block["text"]


_BLOCK_SIDES = {"tool_use": "an assistant", "tool_result": "a user"}


def _refuse_block(kind: Any, where: str) -> InvalidRequestError:
    if kind in ("image", "document"):
        reason = "not supported: Mistral-7B-Instruct-v0.2 reads text only"
    elif kind in _BLOCK_SIDES:
        reason = f"allowed only in {_BLOCK_SIDES[kind]} message"
    else:
        reason = "not supported here (text, tool_use and tool_result blocks are)"
    return InvalidRequestError(f"{where} has type {kind!r:.100}, which is {reason}", param=where)


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Anthropic messages -> OpenAI chat messages (see the module docstring)."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("messages must be a non-empty list of messages", param="messages")
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise InvalidRequestError(
                f'{where}.role must be "user", "assistant" or "system", got {role!r:.100}',
                param=f"{where}.role",
            )
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise InvalidRequestError(
                f"{where}.content must be a string or a list of content blocks",
                param=f"{where}.content",
            )
        if not content and not (role == "assistant" and i == len(raw) - 1):
            raise InvalidRequestError(
                f"{where}.content is empty: every message needs content, except a final "
                "assistant message",
                param=f"{where}.content",
            )
        blocks = [(f"{where}.content[{j}]", block) for j, block in enumerate(content)]
        if role == "system":
            texts = [_text_block(block, at) for at, block in blocks]
            out.append({"role": "system", "content": "\n\n".join(texts)})
        elif role == "user":
            out += _user(blocks, call_ids)
        elif any(_block_type(block) not in _DROPPED_BLOCKS for _, block in blocks):
            out.append(_assistant(where, blocks, call_ids))
        # else: a turn of thinking only (or an empty final prefill) leaves nothing to replay
    # A final assistant message is a prefill: the chat encoder ends the prompt inside that
    # answer and the model continues it (the response holds only the new text, as Anthropic's).
    return out


def _user(blocks: list[tuple[str, Any]], call_ids: set[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for where, block in blocks:
        kind = _block_type(block)
        if kind == "text":
            text = _text_block(block, where)
            if out and out[-1]["role"] == "user":
                out[-1]["content"].append({"type": "text", "text": text})
            else:
                out.append({"role": "user", "content": [{"type": "text", "text": text}]})
        elif kind == "tool_result":
            out.append(_tool_result(block, where, call_ids))
        elif kind is None:
            raise _not_a_block(block, where)
        else:
            raise _refuse_block(kind, where)
    return out


def _block_type(block: Any) -> str | None:
    """A block's type when it is an object with a string type (else None: not a block)."""
    kind = block.get("type") if isinstance(block, dict) else None
    return kind if isinstance(kind, str) else None


def _not_a_block(block: Any, where: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{where} must be a content block object with a type, got {block!r:.100}",
        param=where,
    )


def _tool_result(block: dict[str, Any], where: str, call_ids: set[str]) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or call_id_of(call_id) not in call_ids:
        raise InvalidRequestError(
            f"{where}.tool_use_id {call_id!r:.100} does not name a tool_use block of an earlier "
            "assistant message",
            param=f"{where}.tool_use_id",
        )
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n\n".join(
            _text_block(part, f"{where}.content[{k}]") for k, part in enumerate(content)
        )
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"{where}.content must be a string or a list of text blocks", param=f"{where}.content"
        )
    if block.get("is_error"):
        content = f"Error: {content}"  # the chat format has no error flag: say it in the text
    return {"role": "tool", "tool_call_id": call_id_of(call_id), "content": content}


def _assistant(where: str, blocks: list[tuple[str, Any]], call_ids: set[str]) -> dict[str, Any]:
    texts, calls = [], []
    for at, block in blocks:
        kind = _block_type(block)
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(f"{at}.id must be a non-empty string", param=f"{at}.id")
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(
                    f"{at}.name must be a non-empty string", param=f"{at}.name"
                )
            if not isinstance(arguments, dict):
                raise InvalidRequestError(f"{at}.input must be an object", param=f"{at}.input")
            call_ids.add(call_id_of(call_id))
            fn = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            calls.append({"id": call_id_of(call_id), "type": "function", "function": fn})
        elif kind in _DROPPED_BLOCKS:
            continue
        elif kind is None:
            raise _not_a_block(block, at)
        else:
            raise _refuse_block(kind, at)
    text = "\n\n".join(t for t in texts if t)
    if not text and not calls:
        raise InvalidRequestError(
            f"{where}.content must hold a non-empty text or tool_use block",
            param=f"{where}.content",
        )
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message
