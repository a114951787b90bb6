"""Request bodies -> typed, validated requests; and the response objects of the API.

Body rules (one place, so every endpoint answers the same):
- The Content-Type must be JSON (`application/json`, or any `*/*+json`), else 415. A browser
  can send `text/plain` or form bodies cross-origin without a CORS preflight; insisting on JSON
  means a hostile web page cannot make a local server generate for it.
- The body must be UTF-8 JSON holding one object; anything else (invalid UTF-8, nesting too
  deep for the parser, a list) is a 400 saying what was wrong. NaN and Infinity (not JSON,
  though some clients write them) are a 400 naming the field that holds them.
- A field set to null counts as not given. An unknown field is a 400 naming it (as OpenAI
  answers), so a field that would change the output is never silently ignored; fields that
  change nothing here (`user`, `metadata`, ...) are accepted and dropped, and legacy ones are
  mapped to their successors (`request_fields`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.sampling.params import FIELDS, MAX_N, SamplingField, SamplingParams
from mlx_mistral.sampling.sampler import TokenLogprobs
from mlx_mistral.tools.spec import StructuredRequest
from mlx_mistral.tools.validation import parse_structured_request

from .errors import UnsupportedMediaTypeError
from .request_fields import LEGACY_FIELDS, drop_no_ops, map_legacy_functions, rename_legacy_param
from .units import parse_duration

CHAT_SAMPLING = FIELDS
"""The sampling fields /v1/chat/completions takes: all of them, by their own names."""
COMPLETION_SAMPLING = tuple(f for f in FIELDS if f.name not in ("logprobs", "top_logprobs"))
"""The sampling fields /v1/completions takes by their own names: it asks for logprobs as one
integer instead (see MAX_COMPLETION_LOGPROBS)."""
MAX_COMPLETION_LOGPROBS = 5
"""/v1/completions' `logprobs`: how many alternatives per token (OpenAI's limit)."""


def _names(fields: tuple[SamplingField, ...]) -> set[str]:
    """The names these fields go by in a request body, their other names included."""
    return {name for f in fields for name in (f.name, *f.aliases)}


_ALIASES = {alias: f.name for f in FIELDS for alias in f.aliases}
_STRUCTURED_FIELDS = ("tools", "tool_choice", "response_format", "parallel_tool_calls")
_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "prediction",
        "keep_alive",  # Ollama's extension: how long the model stays loaded afterwards
        *_names(CHAT_SAMPLING),
        *_STRUCTURED_FIELDS,
        *LEGACY_FIELDS,
    }
)
_COMPLETION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "best_of",
        "suffix",
        "prediction",
        "keep_alive",
        *_names(COMPLETION_SAMPLING),
    }
)


# -- body parsing ---------------------------------------------------------------------------
def check_content_type(content_type: str | None) -> None:
    """Raise UnsupportedMediaTypeError unless the body is declared as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the body must be JSON sent with 'Content-Type: application/json', got "
            f"{(content_type or '(none)')[:100]!r}"
        )


MAX_BODY_CONTAINERS = 50_000


class _NonFinite:
    """What the parser makes of NaN / Infinity / -Infinity (not JSON): found afterwards, so the
    error can name the field that holds it."""

    def __init__(self, name: str):
        self.name = name


def _refuse_non_finite(body: dict[str, Any]) -> None:
    """Raise naming the first top-level field that holds a NaN or an infinity, if any."""
    for key, value in body.items():
        stack = [value]
        while stack:  # iterative: the parser accepted the depth, a recursion might not
            item = stack.pop()
            if isinstance(item, _NonFinite):
                raise InvalidRequestError(
                    f"the request body is not valid JSON: {item.name} is not a JSON number "
                    f"(in {key})",
                    param=key,
                )
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body into a JSON object.

    Raises:
        InvalidRequestError: empty, not UTF-8, not JSON, too deeply nested, or not an object.
    """
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object")
    # Python's JSON parser holds the GIL for the whole parse: 8 MiB of tiny objects would stop
    # every thread for seconds (~6 us per container). Counting brackets is a cheap upper bound
    # (those inside strings count too; a prompt that holds this many exceeds any context).
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_BODY_CONTAINERS:
        raise InvalidRequestError(
            "the request body is nested too deeply or holds too many JSON objects and arrays to "
            f"parse: {containers} '{{' and '[' characters (text counts too), at most "
            f"{MAX_BODY_CONTAINERS}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"the request body is not valid UTF-8 (byte {exc.start})"
        ) from None
    try:
        body = json.loads(text, parse_constant=_NonFinite)
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply to parse") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # e.g. an integer literal with more digits than Python allows
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(
            f"the request body must be a JSON object, got a JSON {_json_type(body)}"
        )
    if "NaN" in text or "Infinity" in text:  # the only words that make a _NonFinite
        _refuse_non_finite(body)
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(body)
    _check_tool_call_arguments(body)
    return body


MAX_ARGUMENTS_DEPTH = 64  # JSON levels inside one tool call's `arguments` string


def _check_tool_call_arguments(body: dict[str, Any]) -> None:
    """Tool-call `arguments` are JSON inside a JSON string: hold them to the body's own rules
    (parseable without a RecursionError or Python's 4,300-digit integer limit, no lone
    surrogate) and to a nesting that re-rendering them into the prompt survives."""
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for j, call in enumerate(calls if isinstance(calls, list) else ()):
            fn = call.get("function") if isinstance(call, dict) else None
            arguments = fn.get("arguments") if isinstance(fn, dict) else None
            if isinstance(arguments, str):
                _check_embedded_json(arguments, f"messages[{i}].tool_calls[{j}].function.arguments")


def _check_embedded_json(text: str, param: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return  # the chat format says what is wrong with it, naming the field
    except (RecursionError, ValueError) as exc:
        why = "is nested too deeply" if isinstance(exc, RecursionError) else f"is not valid: {exc}"
        raise InvalidRequestError(f"{param} {why}", param=param) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_ARGUMENTS_DEPTH:
            raise InvalidRequestError(
                f"{param} is nested more than {MAX_ARGUMENTS_DEPTH} levels deep", param=param
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    if _SURROGATE_ESCAPE.search(text):
        try:
            _refuse_lone_surrogates({param: value})
        except InvalidRequestError:
            raise InvalidRequestError(
                f"{param} holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                "valid text",
                param=param,
            ) from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"): Python keeps it as a lone surrogate,
    which is not text and which the tokenizer cannot encode. Name the field that has one."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            items: list[tuple[str, Any]] = []
        elif isinstance(value, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            items += [(path or "body", k) for k in value]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"{path[:100]} holds a lone UTF-16 surrogate escape (such as \\ud800), "
                    "which is not valid text",
                    param=path[:100],
                ) from None
        stack.extend(items)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# -- typed requests ---------------------------------------------------------------------------
def _fields(body: dict[str, Any], known: frozenset[str], *, chat: bool) -> dict[str, Any]:
    """The body without nulls and no-op fields (`request_fields`); an unknown field is a 400
    naming it."""
    out = {key: value for key, value in body.items() if value is not None}
    drop_no_ops(out, chat=chat)
    for key in out:
        if key not in known:
            raise InvalidRequestError(
                f"unrecognized request argument: {key[:100]!r}",
                param=key[:100],
                code="unknown_parameter",
            )
    return out


def _merge_aliases(fields: dict[str, Any]) -> None:
    for alias, name in _ALIASES.items():
        if alias in fields:
            value = fields.pop(alias)
            if name in fields and fields[name] != value:
                raise InvalidRequestError(
                    f"{alias} is another name for {name}; give one of them, not both with "
                    "different values",
                    param=alias,
                )
            fields[name] = value


def _bool(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean, got {value!r:.100}", param=name)
    return value


def _model(fields: dict[str, Any]) -> str | None:
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"model must be a string, got {model!r:.100}", param="model")
    return model


def _include_usage(fields: dict[str, Any]) -> bool:
    options = fields.get("stream_options", {})
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    value = options.get("include_usage", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"stream_options.include_usage must be a boolean, got {value!r:.100}",
            param="stream_options.include_usage",
        )
    return value  # other options (continuous_usage_stats, ...) change no generated token


def _sampling(
    fields: dict[str, Any], taken: tuple[SamplingField, ...], **given: Any
) -> SamplingParams:
    """SamplingParams from the body's values of the fields `taken`, and the values the endpoint
    worked out itself (`given`)."""
    values = {
        f.name: _bool(fields, f.name) if f.kind == "boolean" else fields[f.name]
        for f in taken
        if f.name in fields and f.name not in given
    }
    return SamplingParams(**values, **given)


def _keep_alive(fields: dict[str, Any]) -> float | None:
    """Seconds the model stays loaded after the request (see `units`); None: the default."""
    value = fields.get("keep_alive")
    return None if value is None else parse_duration(value, name="keep_alive")


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A validated POST /v1/chat/completions body.

    `messages` is kept as sent: the chat encoder validates it against the model's format and
    names the bad field. `tools`, `tool_choice`, `parallel_tool_calls` and `response_format`
    are validated here, into `structured` (`mlx_mistral.tools.validation`).
    """

    messages: Any
    params: SamplingParams
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    structured: StructuredRequest = field(default_factory=StructuredRequest)
    max_tokens_given: bool = False
    prediction: str | None = None
    keep_alive: float | None = None
    legacy_functions: bool = False  # sent `functions`: answer with `function_call`

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ChatCompletionRequest:
        """Raises InvalidRequestError naming the first bad field."""
        fields = _fields(body, _CHAT_FIELDS, chat=True)
        _merge_aliases(fields)
        if "messages" not in fields:
            raise InvalidRequestError("messages is required", param="messages")
        params = _sampling(fields, CHAT_SAMPLING)
        legacy = map_legacy_functions(fields)
        try:
            structured = parse_structured_request(
                **{name: fields.get(name) for name in _STRUCTURED_FIELDS}
            )
        except InvalidRequestError as exc:
            raise (rename_legacy_param(exc) if legacy else exc) from None
        return cls(
            messages=fields["messages"],
            params=params,
            model=_model(fields),
            stream=_bool(fields, "stream"),
            include_usage=_include_usage(fields),
            structured=structured,
            max_tokens_given="max_tokens" in fields,
            prediction=_prediction(fields),
            keep_alive=_keep_alive(fields),
            legacy_functions=legacy,
        )

    @property
    def parses_tool_calls(self) -> bool:
        """Whether answers may hold tool calls (tools given and `tool_choice` is not "none")."""
        return bool(self.structured.tools) and self.structured.tool_choice != "none"


@dataclass(frozen=True)
class CompletionRequest:
    """A validated POST /v1/completions body: raw text in, raw text out (no chat template).

    `prompts` holds one prompt or several (OpenAI's list of prompts: choice `n * p + i` of the
    answer is choice i of prompt p); each is a string (encoded with `<s>` first) or a list of
    token ids (used as given).
    """

    prompts: tuple[str | list[int], ...]
    params: SamplingParams
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False
    prediction: str | None = None
    keep_alive: float | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> CompletionRequest:
        """Raises InvalidRequestError naming the first bad field."""
        fields = _fields(body, _COMPLETION_FIELDS, chat=False)
        _merge_aliases(fields)
        for name, neutral in (("echo", False), ("best_of", 1), ("suffix", "")):
            if name in fields and fields[name] != neutral:
                raise InvalidRequestError(
                    f"{name}={fields[name]!r:.100} is not supported; leave it out", param=name
                )
        logprobs = fields.get("logprobs", 0)
        top = MAX_COMPLETION_LOGPROBS
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= top:
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {top}] (alternatives per "
                f"token), got {logprobs!r:.100}",
                param="logprobs",
            )
        params = _sampling(
            fields, COMPLETION_SAMPLING, logprobs="logprobs" in fields, top_logprobs=logprobs
        )
        prompts = _prompts(fields.get("prompt"))
        if len(prompts) * params.n > MAX_N:
            raise InvalidRequestError(
                f"{len(prompts)} prompts with n={params.n} ask for {len(prompts) * params.n} "
                f"choices; one request makes at most {MAX_N}",
                param="prompt",
            )
        return cls(
            prompts=prompts,
            params=params,
            model=_model(fields),
            stream=_bool(fields, "stream"),
            include_usage=_include_usage(fields),
            max_tokens_given="max_tokens" in fields,
            prediction=_prediction(fields),
            keep_alive=_keep_alive(fields),
        )


def _prediction(fields: dict[str, Any]) -> str | None:
    """OpenAI's Predicted Outputs: `{"type": "content", "content": text or text parts}`, the
    expected answer, used as a draft (speculative decoding; it never changes the answer)."""
    value = fields.get("prediction")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "content" or "content" not in value:
        raise InvalidRequestError(
            f'prediction must be {{"type": "content", "content": ...}}, got {value!r:.100}',
            param="prediction",
        )
    content = value["content"]
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InvalidRequestError(
            "prediction.content must be a string or a list of text parts "
            f'({{"type": "text", "text": ...}}), got {content!r:.100}',
            param="prediction.content",
        )
    return content


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompts(prompt: Any) -> tuple[str | list[int], ...]:
    """OpenAI's four prompt shapes: a string, token ids, a list of strings, a list of token-id
    lists (either list: one prompt each)."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        prompts = [None]
    for i, one in enumerate(prompts):
        where = "prompt" if prompts is not prompt else f"prompt[{i}]"
        if one == "":
            raise InvalidRequestError(f"{where} must not be empty", param=where)
        if not (isinstance(one, str) or _is_token_ids(one)):
            raise InvalidRequestError(
                f"{where} must be a non-empty string or a list of token ids (prompt may also be "
                "a list of these, one prompt each)",
                param=where,
            )
    return tuple(prompts)


# -- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    prompt_price: float,
    completion_price: float,
    predicted: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The usage object of the hosted API: token counts and the estimated cost in dollars.

    `predicted` (given for a request with a `prediction`): the prediction's tokens that appeared
    in the completion and those that did not (`prediction_counts`), reported in
    `completion_tokens_details` under OpenAI's names.
    """
    cost = prompt_tokens * prompt_price + completion_tokens * completion_price
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if predicted is not None:
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": predicted[0],
            "rejected_prediction_tokens": predicted[1],
        }
    out["estimated_cost"] = round(cost, 12)
    return out


class LogprobFormatter:
    """Turns engine `TokenLogprobs` into OpenAI's shapes (chat and legacy completions)."""

    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes

    def _text(self, token: int) -> str:
        return self.token_bytes[token].decode("utf-8", errors="replace")

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {
            "token": self._text(token),
            "logprob": logprob,
            "bytes": list(self.token_bytes[token]),
        }

    def chat(self, lp: TokenLogprobs) -> dict[str, Any]:
        """One `choices[i].logprobs.content[j]` entry."""
        return {
            **self._entry(lp.token, lp.logprob),
            "top_logprobs": [self._entry(t, v) for t, v in lp.top],
        }

    def completion(self, lps: list[TokenLogprobs], offsets: list[int]) -> dict[str, Any]:
        """A completions `choices[i].logprobs` object for consecutive tokens; `offsets[j]` is
        where token j's text starts in the choice's text (counted on the decoded text, which a
        token's raw piece need not match: byte-fallback pieces, held-back stop strings)."""
        return {
            "tokens": [self._text(lp.token) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self._text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": list(offsets),
        }


def chat_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: list[dict[str, Any]] | None,
    tool_calls: list[dict[str, Any]] | None = None,
    legacy_functions: bool = False,
) -> dict[str, Any]:
    """One `choices[i]` of a chat.completion; with tool calls, an empty content is null. A
    request that sent the legacy `functions` gets its one call as `function_call`."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["content"] = text or None
        if legacy_functions:
            message["function_call"] = tool_calls[0]["function"]
        else:
            message["tool_calls"] = tool_calls
    choice: dict[str, Any] = {"index": index, "message": message}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    choice["finish_reason"] = finish_reason
    return choice


def chunk_choice(
    index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: Any = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    return choice


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(
    object_type: str,
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The common outer object: {id, object, created, model, choices[, usage]}."""
    out: dict[str, Any] = {
        "id": response_id,
        "object": object_type,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out
