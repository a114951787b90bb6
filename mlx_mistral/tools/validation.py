"""Tools and response format in: the OpenAI fields validated once into a `StructuredRequest`.

`parse_structured_request(tools=..., tool_choice=..., parallel_tool_calls=...,
response_format=...)` returns a frozen `StructuredRequest` (`mlx_mistral.tools.grammar` turns it
into grammars). Every bad field raises `InvalidRequestError` whose `param` names it
("tools[2].function.parameters", "tool_choice", "response_format.json_schema.schema", ...),
including a schema the grammar engine cannot compile, and a schema past the limits of
`mlx_mistral.tools.schema_limits` (checked first, so no costly check runs on a huge schema).

Defaults as in the OpenAI API: `tool_choice` is "auto" with tools and "none" without;
`parallel_tool_calls` is true; `response_format` is text.

How the server uses `tool_choice` "none": the prompt shows no tools (the model is not shown tools
it may not call; `StructuredRequest.prompt_tools` says what to render), and the constraints still
keep `[TOOL_CALLS]` out of the text.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ..errors import InvalidRequestError
from .format import check_name
from .grammar import check_schema_compiles
from .relaxing import log_relaxations, relax_schema
from .schema_limits import SchemaBudget
from .spec import ResponseFormat, StructuredRequest, ToolSpec, arguments_schema

TOOL_CHOICES = ("none", "auto", "required")
FORMAT_TYPES = ("text", "json_object", "json_schema")


def parse_structured_request(
    *,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: Any = None,
    response_format: Any = None,
) -> StructuredRequest:
    """Validate the OpenAI `tools`, `tool_choice`, `parallel_tool_calls`, `response_format`.

    Args:
        tools: `[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`.
        tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}.
        parallel_tool_calls: bool.
        response_format: {"type": "text"} | {"type": "json_object"} |
            {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}.
        (None means the field was not sent.)

    Returns:
        The normalised request.

    Raises:
        InvalidRequestError: A field is malformed; `param` names it.

    Example:
        >>> spec = parse_structured_request(
        ...     tools=[{"type": "function", "function": {"name": "now"}}], tool_choice="required")
        >>> spec.tool_choice, spec.tools[0].name
        ('required', 'now')
    """
    budget = SchemaBudget()  # one for all the request's schemas
    specs = () if tools is None else parse_tools(tools, budget)
    choice, name = _tool_choice(tool_choice, specs)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError(
            f"parallel_tool_calls must be a boolean, got {parallel_tool_calls!r}",
            param="parallel_tool_calls",
        )
    return StructuredRequest(
        tools=specs,
        tool_choice=choice,
        function_name=name,
        parallel_tool_calls=True if parallel_tool_calls is None else parallel_tool_calls,
        response_format=_response_format(response_format, budget),
    )


def parse_tools(raw: Any, budget: SchemaBudget | None = None) -> tuple[ToolSpec, ...]:
    """Validate the OpenAI `tools` list (see `parse_structured_request`).

    `budget` bounds the work all the request's schemas may ask for (a fresh one by default).

    Raises:
        InvalidRequestError: A tool is malformed; `param` names it ("tools[1].function.name").

    Example:
        >>> parse_tools([{"type": "function", "function": {"name": "now"}}])
        (ToolSpec(name='now', description=None, parameters=None, strict=False),)
    """
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("tools must be a non-empty list of tool objects", param="tools")
    budget = budget or SchemaBudget()
    specs = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f'{where}.type must be "function", got {tool.get("type")!r}', param=f"{where}.type"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(
                f"{where}.function must be an object", param=f"{where}.function"
            )
        name = fn.get("name")
        check_name(name, f"{where}.function.name")
        if name in seen:
            raise InvalidRequestError(
                f"{where}.function.name {name!r} is already the name of tools[{seen[name]}]",
                param=f"{where}.function.name",
            )
        seen[name] = i
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequestError(
                f"{where}.function.strict must be a boolean", param=f"{where}.function.strict"
            )
        specs.append(
            _tool_spec(name, description, fn.get("parameters"), bool(strict), where, budget)
        )
    return tuple(specs)


def _tool_spec(
    name: str,
    description: str | None,
    parameters: Any,
    strict: bool,
    where: str,
    budget: SchemaBudget,
) -> ToolSpec:
    """A strict tool's schema is served in full or refused; any other's grammar relaxes what it
    cannot enforce (`mlx_mistral.tools.relaxing`)."""
    if parameters is None:
        return ToolSpec(name, description, None, strict)
    param = f"{where}.function.parameters"
    if strict:
        _check_schema(parameters, param, budget, must_take_object=True)
        return ToolSpec(name, description, parameters, strict)
    _check_schema(parameters, param, budget, must_take_object=True, relax=True)
    relaxed = relax_schema(arguments_schema(parameters))
    _check_compiles(relaxed.schema, param)  # what no relaxation helps (an external $ref)
    if not relaxed.relaxations:
        return ToolSpec(name, description, parameters)
    log_relaxations(name, relaxed.relaxations)
    return ToolSpec(name, description, parameters, False, relaxed.schema, relaxed.relaxations)


def _tool_choice(raw: Any, tools: tuple[ToolSpec, ...]) -> tuple[Any, str | None]:
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            raise InvalidRequestError(
                f'tool_choice must be "none", "auto", "required" or {{"type": "function", '
                f'"function": {{"name": ...}}}}, got {raw!r}',
                param="tool_choice",
            )
        if raw != "none" and not tools:
            raise InvalidRequestError(
                f'tool_choice "{raw}" needs tools, but the request has none', param="tool_choice"
            )
        return raw, None
    if (
        not isinstance(raw, dict)
        or raw.get("type") != "function"
        or not isinstance(raw.get("function"), dict)
    ):
        raise InvalidRequestError(
            'tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    name = raw["function"].get("name")
    check_name(name, "tool_choice.function.name")
    if not tools:
        raise InvalidRequestError(
            f"tool_choice names the function {name!r}, but the request has no tools",
            param="tool_choice",
        )
    if name not in {t.name for t in tools}:
        raise InvalidRequestError(
            f"tool_choice names the function {name!r}, which is not in tools "
            f"(tools: {', '.join(t.name for t in tools)})",
            param="tool_choice.function.name",
        )
    return "function", name


def _response_format(raw: Any, budget: SchemaBudget) -> ResponseFormat:
    if raw is None:
        return ResponseFormat()
    if not isinstance(raw, dict) or raw.get("type") not in FORMAT_TYPES:
        got = raw.get("type") if isinstance(raw, dict) else raw
        raise InvalidRequestError(
            f'response_format.type must be "text", "json_object" or "json_schema", got {got!r}',
            param="response_format",
        )
    if raw["type"] != "json_schema":
        return ResponseFormat(raw["type"])
    where = "response_format.json_schema"
    js = raw.get("json_schema")
    if not isinstance(js, dict):
        raise InvalidRequestError(
            f"{where} must be an object with a name and a schema", param=where
        )
    check_name(js.get("name"), f"{where}.name")
    if "schema" not in js:
        raise InvalidRequestError(f"{where}.schema is required", param=f"{where}.schema")
    _check_schema(js["schema"], f"{where}.schema", budget, must_take_object=False)
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.strict must be a boolean", param=f"{where}.strict")
    description = js.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(
            f"{where}.description must be a string", param=f"{where}.description"
        )
    return ResponseFormat("json_schema", js["name"], js["schema"], strict)


def _check_schema(
    schema: Any, param: str, budget: SchemaBudget, *, must_take_object: bool, relax: bool = False
) -> None:
    """A JSON Schema (2020-12) within the limits, that the grammar engine compiles; parameters
    describe an object. With `relax` (a tool that is not strict) what the grammar cannot serve
    is left for `relax_schema`: only the limits that bound the work are checked here."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    budget.check(schema, param, relaxable=relax)
    try:
        Draft202012Validator.check_schema(schema)
    except RecursionError:
        raise InvalidRequestError(f"{param} is nested too deeply", param=param) from None
    except (OverflowError, ValueError) as exc:  # e.g. a format check the meta-schema runs
        raise InvalidRequestError(
            f"{param} is not a valid JSON Schema: {str(exc)[:200]}", param=param
        ) from None
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise InvalidRequestError(
            f"{param} is not a valid JSON Schema: {exc.message}"
            + (f" (at {where})" if where else ""),
            param=param,
        ) from exc
    if must_take_object:
        kind = schema.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise InvalidRequestError(
                f"{param} must describe an object (arguments are a JSON object), "
                f'got "type": {kind!r}',
                param=param,
            )
        schema = arguments_schema(schema)
    if not relax:
        _check_compiles(schema, param)


def _check_compiles(schema: dict[str, Any], param: str) -> None:
    error = check_schema_compiles(schema)
    if error is not None:
        raise InvalidRequestError(
            f"{param} uses a JSON Schema feature constrained decoding does not support: {error}",
            param=param,
        )
