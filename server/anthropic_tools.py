"""Anthropic's Messages API, request side: tools, tool_choice, the output format, tool-use ids.

`tools[i]` {name, description, input_schema, strict} is an OpenAI function (a tool that is not
`strict` has what the grammar cannot enforce relaxed: `mlx_mistral.tools.relaxing`);
`tool_choice` auto / any / tool / none is "auto" / "required" / the named function / "none", and
`disable_parallel_tool_use` is `parallel_tool_calls` negated. `output_config.format` (or the
structured-outputs beta's top-level `output_format`) is a json_schema `response_format`.
Tool-use ids read "toolu_..." on this dialect (`tool_use_id`, `call_id_of`).
"""

from __future__ import annotations

from typing import Any

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.tools.format import CALL_ID_PREFIX

_TOOL_FIELDS = frozenset(
    {
        "name",
        "description",
        "input_schema",
        "type",
        "cache_control",
        "strict",  # the schema in full or a 400 (else what the grammar cannot enforce relaxes)
        "defer_loading",
        "eager_input_streaming",
        "input_examples",
        "allowed_callers",
    }
)
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": "function"}
TOOL_USE_ID_PREFIX = "toolu_"
"""Anthropic's tool-use ids begin so; the grammar's "call_" ids are renamed on the way out and
back (`tool_use_id`, `call_id_of`), so the prompt holds the very text the model wrote."""


def tool_use_id(call_id: str) -> str:
    """The Anthropic id of a call the grammar named ("call_X" -> "toolu_X")."""
    return TOOL_USE_ID_PREFIX + call_id.removeprefix(CALL_ID_PREFIX)


def call_id_of(tool_use_id: str) -> str:
    """The chat format's id of an Anthropic tool-use id ("toolu_X" -> "call_X")."""
    if tool_use_id.startswith(TOOL_USE_ID_PREFIX):
        return CALL_ID_PREFIX + tool_use_id.removeprefix(TOOL_USE_ID_PREFIX)
    return tool_use_id


def translate_tools(raw: Any) -> list[dict[str, Any]] | None:
    """Anthropic tools -> OpenAI function tools (client tools only)."""
    if raw is None or raw == []:  # clients send an empty list for "no tools"
        return None
    if not isinstance(raw, list):
        raise InvalidRequestError("tools must be a list of tools", param="tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequestError(
                f"{where} is the built-in tool {kind!r:.100}, which this server does not run; "
                "give client tools with a name and an input_schema",
                param=f"{where}.type",
            )
        extra = sorted(set(tool) - _TOOL_FIELDS)
        if extra:
            raise InvalidRequestError(
                f"{where}.{extra[0][:100]}: extra inputs are not permitted",
                param=f"{where}.{extra[0][:100]}",
            )
        if not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequestError(
                f"{where}.input_schema must be a JSON Schema object", param=f"{where}.input_schema"
            )
        fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def translate_tool_choice(raw: Any, *, has_tools: bool) -> tuple[Any, bool | None]:
    """(OpenAI tool_choice, parallel_tool_calls) for an Anthropic tool_choice."""
    if raw is None:
        return None, None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in _TOOL_CHOICES:
        raise InvalidRequestError(
            'tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
            f'{{"type": "tool", "name": ...}}, got {raw!r:.100}',
            param="tool_choice",
        )
    disable = raw.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise InvalidRequestError(
            "tool_choice.disable_parallel_tool_use must be a boolean",
            param="tool_choice.disable_parallel_tool_use",
        )
    parallel = None if disable is None else not disable
    if kind in ("any", "tool") and not has_tools:
        raise InvalidRequestError(
            f'tool_choice "{kind}" needs tools, but the request has none', param="tool_choice"
        )
    if not has_tools:  # "auto" or "none" without tools: a plain answer
        return None, None
    if kind == "tool":
        return {"type": "function", "function": {"name": raw.get("name")}}, parallel
    return _TOOL_CHOICES[kind], parallel


def translate_output_format(config: Any, beta_format: Any) -> dict[str, Any] | None:
    """`output_config.format` (or the beta's top-level `output_format`) {type: json_schema,
    schema} as an OpenAI response_format; `effort` changes nothing here."""
    if config is not None and not isinstance(config, dict):
        raise InvalidRequestError("output_config must be an object", param="output_config")
    fmt, where = (config or {}).get("format"), "output_config.format"
    if beta_format is not None:
        if fmt is not None:
            raise InvalidRequestError(
                "output_format and output_config.format are the same field: send one",
                param="output_format",
            )
        fmt, where = beta_format, "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or "schema" not in fmt:
        raise InvalidRequestError(
            f'{where} must be {{"type": "json_schema", "schema": {{...}}}}', param=where
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
