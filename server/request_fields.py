"""The top-level request fields that are neither sampling parameters nor the prompt: what each
of OpenAI's documented fields (and the common vendor extras) becomes on this server.

Every field of OpenAI's chat-completions reference is one of:
- honoured: sampling (`mlx_mistral.sampling.params`), `tools` and friends, `prediction`, ...
  (parsed in `schemas`);
- legacy, mapped to its successor: `functions` -> `tools`, `function_call` -> `tool_choice`
  (the answer then carries `message.function_call`, as OpenAI answers these requests);
- a no-op: it tags, routes or tunes a request on a hosted service, or asks for something this
  model does without being asked (it has no reasoning effort to set); accepted and dropped
  (`NO_OP_FIELDS`, listed in the README);
- a request for what this server cannot do: a 400 naming the field (`REFUSED_FIELDS`, and
  `modalities` other than text).
A name in none of these stays a 400 (`schemas._fields`), as OpenAI answers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlx_mistral.errors import InvalidRequestError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# name -> (a check of the value, what the value must be). A no-op still checks its value's
# shape: a client that sends `cache_prompt: "yes"` has a bug worth naming.
_ANY: tuple[Callable[[Any], bool], str] = (lambda value: True, "")
_STRING = (lambda value: isinstance(value, str), "a string")
_BOOLEAN = (lambda value: isinstance(value, bool), "a boolean")
_OBJECT = (lambda value: isinstance(value, dict), "an object")

NO_OP_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # OpenAI: tagging, routing and storage on the hosted service.
    "user": _STRING,
    "metadata": _OBJECT,
    "service_tier": _STRING,
    "store": _BOOLEAN,
    "safety_identifier": _STRING,
    "prompt_cache_key": _STRING,
    "prompt_cache_options": _OBJECT,  # the prefix cache here is always on, keyed by content
    "prompt_cache_retention": _STRING,
    # OpenAI: reasoning models' knobs; this model has no reasoning phase or verbosity setting.
    "reasoning_effort": _STRING,
    "verbosity": _STRING,
    # llama.cpp: the prefix cache here is always on.
    "cache_prompt": _BOOLEAN,
    # Ollama: sizes Ollama's KV cache at load; here the window is the model's own.
    "num_ctx": (lambda value: _is_int(value) and value > 0, "a positive integer"),
    # vLLM: variables for a Jinja chat template. Mistral's format is fixed (no template, so no
    # variable such as Qwen's enable_thinking changes it), as a template ignores unknown keys.
    "chat_template_kwargs": _OBJECT,
}
"""Fields accepted and dropped: they cannot change this model's output."""

REFUSED_FIELDS = {
    "audio": "audio output is not supported: this model writes text only",
    "web_search_options": "web search is not available on this server",
    "moderation": "moderation is not available on this server",
}
"""Fields whose every value asks for what this server cannot do (a 400 naming the field)."""

CHAT_ONLY = frozenset(
    {
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "verbosity",
        "chat_template_kwargs",
    }
)
"""No-ops that only chat requests take (the legacy completions reference has none of them)."""

LEGACY_FIELDS = ("functions", "function_call")


def drop_no_ops(fields: dict[str, Any], *, chat: bool) -> None:
    """Check and remove the no-op fields, and refuse what cannot be done, naming the field.

    `fields` holds the body's non-null fields; known ones stay for the endpoint to parse.
    """
    for name in list(fields):
        if name in REFUSED_FIELDS and chat:
            raise InvalidRequestError(f"{name}: {REFUSED_FIELDS[name]}", param=name)
        if name == "modalities" and chat:
            _check_modalities(fields.pop(name))
        elif name in NO_OP_FIELDS and (chat or name not in CHAT_ONLY):
            check, shape = NO_OP_FIELDS[name]
            if not check(fields[name]):
                raise InvalidRequestError(
                    f"{name} must be {shape}, got {fields[name]!r:.100}", param=name
                )
            del fields[name]


def _check_modalities(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise InvalidRequestError(
            f'modalities must be a list of strings such as ["text"], got {value!r:.100}',
            param="modalities",
        )
    others = [m for m in value if m != "text"]
    if others:
        raise InvalidRequestError(
            f"modalities {others!r:.100} are not supported: this model writes text only; send "
            '["text"] or leave modalities out',
            param="modalities",
        )


def map_legacy_functions(fields: dict[str, Any]) -> bool:
    """Turn OpenAI's legacy `functions` / `function_call` into `tools` / `tool_choice` (in
    place); True when the request used them (its answer then speaks the legacy format).

    A legacy request gets at most one call, as OpenAI's `function_call` holds one.
    """
    if not any(name in fields for name in LEGACY_FIELDS):
        return False
    for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
        if legacy in fields and current in fields:
            raise InvalidRequestError(
                f"{legacy} is the legacy form of {current}; send one of them, not both",
                param=legacy,
            )
    functions = fields.pop("functions", [])
    if not isinstance(functions, list):
        raise InvalidRequestError(
            f"functions must be a list of functions, got {functions!r:.100}", param="functions"
        )
    fields["tools"] = [{"type": "function", "function": f} for f in functions]
    if "function_call" in fields:
        fields["tool_choice"] = _tool_choice(fields.pop("function_call"))
    fields.setdefault("parallel_tool_calls", False)
    return True


def _tool_choice(function_call: Any) -> Any:
    """`function_call` ("none" | "auto" | {"name"}) as the `tool_choice` it stands for."""
    if function_call in ("none", "auto"):
        return function_call
    if isinstance(function_call, dict) and set(function_call) == {"name"}:
        return {"type": "function", "function": {"name": function_call["name"]}}
    raise InvalidRequestError(
        f'function_call must be "none", "auto" or {{"name": ...}}, got {function_call!r:.100}',
        param="function_call",
    )


def rename_legacy_param(exc: InvalidRequestError) -> InvalidRequestError:
    """An error about the `tools` / `tool_choice` a legacy request was mapped to, named by the
    field it sent ("tools[0].function.name" -> "functions[0].name")."""
    param = exc.param or ""
    if param.startswith("tools["):
        legacy = "functions[" + param.removeprefix("tools[").replace("].function", "]", 1)
    elif param.startswith("tool_choice"):
        legacy = "function_call" + param.removeprefix("tool_choice").replace(".function", "", 1)
    else:
        return exc
    message = exc.message.replace(param, legacy)
    return InvalidRequestError(message, param=legacy, code=getattr(exc, "code", None))
