"""Ollama's request bodies (`/api/chat`, `/api/generate`) -> what the engine runs.

A body is validated once, here, into a frozen request holding what the shared chat path takes:
OpenAI-shaped `messages` for the chat encoder, a `StructuredRequest` (tools, `format`) and
`SamplingParams`. Every refusal is an `InvalidRequestError` whose message starts with the field
it names ("options.temperature: ...", "messages[2].images: ..."): Ollama's error body is only
`{"error": "<message>"}`, so the message is all a client sees.

Choices made where Ollama and this server differ (docs/dialect-ollama.md lists them all):
- Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9), as `/api/show`
  reports in `parameters`; `num_predict` <= 0 means no limit, as in Ollama's runner.
- Options that only place or size the model in memory are accepted and change nothing; options
  of samplers this engine lacks (mirostat, tfs_z, typical_p) are accepted at their neutral value
  only; an unknown option is a 400 naming it.
- Ollama tool calls carry no id (or an id clients drop); the chat format needs one per call. A
  call sent back without one gets a stable id from its position, and a `tool` message answers the
  call named by its `tool_call_id`, else the first unanswered call named `tool_name`, else the
  first unanswered call.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tools.format import new_call_id
from mlx_mistral.tools.spec import StructuredRequest
from mlx_mistral.tools.validation import parse_structured_request

from .units import parse_duration

DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
"""Ollama's own defaults (its runner's, used when a Modelfile sets none)."""

# Ollama option -> SamplingParams field.
SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
MEMORY_OPTIONS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
        "num_keep",  # what a context shift keeps: prompts are never shifted here
        "penalize_newline",  # Ollama itself no longer reads it
    }
)
"""Options about where and how the model sits in memory: they change no token."""
NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
"""Samplers this engine does not have, accepted at the value that turns them off."""
MIROSTAT_SETTINGS = ("mirostat_tau", "mirostat_eta")  # read only when mirostat is on
PENALTIES = ("repeat_penalty", "presence_penalty", "frequency_penalty")

_COMMON_FIELDS = frozenset(
    {
        "model",
        "stream",
        "format",
        "options",
        "keep_alive",
        "think",
        "logprobs",
        "top_logprobs",
        "truncate",
        "shift",
    }
)
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "tools"}
GENERATE_FIELDS = _COMMON_FIELDS | {
    "prompt",
    "suffix",
    "system",
    "template",
    "context",
    "raw",
    "images",
}
MESSAGE_FIELDS = frozenset(
    {"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"}
)
ROLES = ("system", "user", "assistant", "tool")


def fail(field_name: str, message: str) -> InvalidRequestError:
    """An error whose message starts with the field (all Ollama's error body shows)."""
    return InvalidRequestError(f"{field_name}: {message}", param=field_name)


@dataclass(frozen=True)
class OllamaRequest:
    """A validated `/api/chat` or `/api/generate` body.

    Attributes:
        model: the name asked for, echoed in every answer (any name is served: see `ollama`).
        params: the sampling parameters, Ollama's defaults applied.
        max_tokens_given: `num_predict` set a limit.
        stream: NDJSON lines (Ollama's default) or one object.
        structured: tools and `format`, as the shared grammar path takes them.
        messages: OpenAI-shaped messages for the chat encoder (None: raw text, or nothing to
            generate).
        prompt: `/api/generate`: the raw text (`raw: true`) or the user turn's text.
        raw: the prompt is passed as is, without the chat format.
        context: `/api/generate`: token ids of an earlier answer's `context` to continue.
        keep_alive: seconds the model stays loaded afterwards (None: the server's default).
    """

    model: str
    params: SamplingParams
    max_tokens_given: bool = False
    stream: bool = True
    structured: StructuredRequest = field(default_factory=StructuredRequest)
    messages: list[dict[str, Any]] | None = None
    prompt: str = ""
    raw: bool = False
    context: tuple[int, ...] = ()
    keep_alive: float | None = None

    @property
    def loads_only(self) -> bool:
        """Nothing to generate: Ollama's way to ask that the model be loaded."""
        return not self.messages and not self.prompt

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.structured.tools) and self.structured.tool_choice != "none"

    @classmethod
    def chat(cls, body: dict[str, Any]) -> OllamaRequest:
        """An `/api/chat` body. Raises InvalidRequestError naming the first bad field."""
        fields = _fields(body, CHAT_FIELDS)
        params, given = _params(fields)
        messages = fields.get("messages", [])
        if not isinstance(messages, list):
            raise fail("messages", "must be a list of message objects")
        return cls(
            model=_model(fields),
            params=params,
            max_tokens_given=given,
            stream=_flag(fields, "stream", default=True),
            structured=_structured(fields.get("tools"), fields.get("format")),
            messages=to_openai_messages(messages),
            keep_alive=fields.get("keep_alive"),
        )

    @classmethod
    def generate(cls, body: dict[str, Any]) -> OllamaRequest:
        """An `/api/generate` body. Raises InvalidRequestError naming the first bad field."""
        fields = _fields(body, GENERATE_FIELDS)
        params, given = _params(fields)
        for name in ("suffix", "template"):
            if fields.get(name, "") != "":
                raise fail(name, "is not supported: the server applies its own chat format")
        if fields.get("images"):
            raise fail("images", "this model reads text only")
        prompt, system = _string(fields, "prompt"), _string(fields, "system")
        raw = _flag(fields, "raw", default=False)
        context = _context(fields.get("context", []))
        structured = _structured(None, fields.get("format"))
        if raw and (system or context or structured.constrained):
            name = "system" if system else "context" if context else "format"
            raise fail(name, "cannot be used with raw: true (raw text is passed as is)")
        messages = None
        if not raw and prompt:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
        return cls(
            model=_model(fields),
            params=params,
            max_tokens_given=given,
            stream=_flag(fields, "stream", default=True),
            structured=structured,
            messages=messages,
            prompt=prompt,
            raw=raw,
            context=context,
            keep_alive=fields.get("keep_alive"),
        )


# -- top-level fields -------------------------------------------------------------------------
def _fields(body: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The body without nulls; an unknown field is a 400 naming it."""
    out = {}
    for key, value in body.items():
        if value is None:
            continue
        if key not in known:
            raise fail(key[:100], "is not a field of this endpoint")
        out[key] = value
    # Fields that change nothing here, or only what this model cannot do.
    if "keep_alive" in out:  # seconds the model stays loaded afterwards (see `units`)
        out["keep_alive"] = parse_duration(out["keep_alive"], name="keep_alive")
    for name in ("truncate", "shift"):  # prompts are never cut nor shifted: too long is a 400
        _flag(out, name, default=False)
    if out.pop("think", False) not in (False, "", "none"):
        raise fail("think", "this model does not think; leave it out or send false")
    if _flag(out, "logprobs", default=False) or out.get("top_logprobs", 0) != 0:
        raise fail("logprobs", "log probabilities are not available in this dialect")
    return out


def _model(fields: dict[str, Any]) -> str:
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise fail("model", "is required (a model name such as the one /api/tags lists)")
    return model


def _flag(fields: dict[str, Any], name: str, *, default: bool) -> bool:
    value = fields.get(name, default)
    if not isinstance(value, bool):
        raise fail(name, f"must be true or false, got {value!r:.100}")
    return value


def _string(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise fail(name, f"must be a string, got {type(value).__name__}")
    return value


def _context(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise fail("context", "must be the list of token ids an earlier answer returned")
    return tuple(value)


def _structured(tools: Any, format_: Any) -> StructuredRequest:
    """`tools` (OpenAI's shape, which Ollama's is) and `format` ("json" or a JSON Schema)."""
    if format_ in ("", None):
        response_format = None
    elif format_ == "json":
        response_format = {"type": "json_object"}
    elif isinstance(format_, dict):
        schema = {"name": "format", "schema": format_}
        response_format = {"type": "json_schema", "json_schema": schema}
    else:
        raise fail("format", f'must be "json" or a JSON Schema object, got {format_!r:.100}')
    try:
        return parse_structured_request(tools=tools or None, response_format=response_format)
    except InvalidRequestError as exc:
        name = exc.param or "tools"
        if name.startswith("response_format"):
            name = "format"
        message = exc.message.replace("response_format.json_schema.schema", "format")
        raise fail(name, message) from None


# -- options -------------------------------------------------------------------------------------
def _params(fields: dict[str, Any]) -> tuple[SamplingParams, bool]:
    """The SamplingParams of `options` (Ollama's defaults where unset) and whether
    `num_predict` set a limit."""
    options = fields.get("options", {})
    if not isinstance(options, dict):
        raise fail("options", "must be an object")
    options = {k: v for k, v in options.items() if v is not None}
    kwargs: dict[str, Any] = dict(DEFAULT_SAMPLING)
    penalised = any(options.get(name, 0) not in (0, 1) for name in PENALTIES)
    for name, value in options.items():
        where = f"options.{name}"
        if name in SAMPLING_OPTIONS:
            kwargs[SAMPLING_OPTIONS[name]] = value
        elif name == "num_predict":
            _integer(where, value)
            if value > 0:  # Ollama's runner: 0 and below (-1 endless, -2 fill) set no limit
                kwargs["max_tokens"] = value
        elif name == "num_ctx":
            if _integer(where, value) < 1:
                raise fail(where, f"must be a positive number of tokens, got {value}")
        elif name == "repeat_last_n":
            # Penalties here weigh the whole context (Ollama's -1); another window is refused
            # only when a penalty would use it.
            if _integer(where, value) != -1 and penalised:
                raise fail(where, "penalties cover the whole context here; send -1")
        elif name in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[name] or isinstance(value, bool):
                raise fail(where, f"is not supported; leave it out or send {NEUTRAL_OPTIONS[name]}")
        elif name in MIROSTAT_SETTINGS or name in MEMORY_OPTIONS:
            continue
        else:
            raise fail(where[:100], "is not an option of this server (see /api/show)")
    seed = kwargs.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
        kwargs.pop("seed")  # Ollama's -1: a fresh random seed
    try:
        return SamplingParams(**kwargs), "max_tokens" in kwargs
    except InvalidRequestError as exc:
        option = next((o for o, p in SAMPLING_OPTIONS.items() if p == exc.param), exc.param)
        raise fail(f"options.{option}", exc.message) from None


def _integer(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"must be an integer, got {value!r:.100}")
    return value


# -- messages ------------------------------------------------------------------------------------
def to_openai_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama chat messages -> OpenAI's shape (which the chat encoder validates further).

    Raises:
        InvalidRequestError: a message this dialect refuses, naming it.
    """
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, name) of the calls of the last assistant turn
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise fail(where, "must be an object with a role and content")
        unknown = next((k for k in msg if k not in MESSAGE_FIELDS), None)
        if unknown is not None:
            raise fail(f"{where}.{unknown[:100]}", "is not a field of a message")
        role = msg.get("role")
        if role not in ROLES:
            raise fail(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r:.100}")
        if msg.get("images"):
            raise fail(f"{where}.images", "this model reads text only")
        content = msg.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise fail(f"{where}.content", "must be a string")
        if role == "assistant":
            # `thinking` of another model's turn is dropped, as Ollama's templates drop it.
            calls = _assistant_calls(msg.get("tool_calls"), f"{where}.tool_calls", i)
            unanswered = [(c["id"], c["function"]["name"]) for c in calls]
            entry: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif role == "tool":
            call_id = _answered_call(msg, where, unanswered)
            out.append({"role": "tool", "content": content, "tool_call_id": call_id})
        else:
            out.append({"role": role, "content": content})
    return out


def _assistant_calls(raw: Any, where: str, turn: int) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise fail(where, "must be a list of tool calls")
    calls = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise fail(f"{where}[{j}].function", "must be an object with a name and arguments")
        arguments = fn.get("arguments", {})
        if not isinstance(arguments, dict):
            raise fail(f"{where}[{j}].function.arguments", "must be a JSON object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            # The same turn always gets the same id, so the prompt (and its cache) is stable.
            call_id = new_call_id(random.Random(f"{turn}:{j}"))
        calls.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": fn.get("name"), "arguments": json.dumps(arguments)},
            }
        )
    return calls


def _answered_call(msg: dict[str, Any], where: str, unanswered: list[tuple[str, str]]) -> str:
    """The id of the call a tool message answers (removed from `unanswered`)."""
    call_id, name = msg.get("tool_call_id"), msg.get("tool_name")
    for k, (known_id, known_name) in enumerate(unanswered):
        if (call_id and known_id == call_id) or (not call_id and name in (None, known_name)):
            return unanswered.pop(k)[0]
    if call_id:
        return call_id  # not a call of the last turn: the chat encoder checks the others
    named = f" named {name!r:.100}" if name else ""
    raise fail(where, f"answers no tool call{named} of the assistant message before it")
