"""The validated form of a request's tools, calls and response format (frozen, checked once).

`mlx_mistral.tools.validation` builds them from the OpenAI fields, `mlx_mistral.chat` builds
`ToolCall`s from assistant messages; everything after the boundary takes these, never raw dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call.

    Attributes:
        name: The function's name.
        description: What it does (shown to the model).
        parameters: Its arguments' JSON schema, in full (None: no arguments): the prompt shows
            it and relaxed calls are checked against it.
        strict: The caller asked for the schema to be enforced in full (a 400 if it cannot be).
        grammar_parameters: What the grammar enforces when it cannot enforce `parameters` in
            full (`mlx_mistral.tools.relaxing`); None: `parameters` itself.
        relaxations: What the grammar leaves out of `parameters`, one line per keyword.
    """

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False
    grammar_parameters: dict[str, Any] | None = field(default=None, repr=False)
    relaxations: tuple[str, ...] = field(default=(), repr=False)

    @property
    def enforced_parameters(self) -> dict[str, Any] | None:
        """The schema the grammar enforces on this tool's arguments."""
        return self.parameters if self.grammar_parameters is None else self.grammar_parameters


def arguments_schema(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The schema a call's `arguments` must satisfy: the tool's parameters, always an object.

    No parameters means a function without arguments (`{}`), as in the OpenAI API.
    """
    if parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    schema = dict(parameters)
    schema.setdefault("type", "object")
    return schema


@dataclass(frozen=True)
class ToolCall:
    """One call an assistant message made: its function, its arguments (parsed), its id."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class ResponseFormat:
    """`response_format`: plain text, any JSON object, or JSON valid against `schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True)
class StructuredRequest:
    """The validated tool and format fields of one chat request.

    Attributes:
        tools: The functions, in request order.
        tool_choice: "none", "auto", "required", or "function" (then `function_name` is set).
        function_name: The function a named `tool_choice` forces.
        parallel_tool_calls: Whether an answer may hold several calls.
        response_format: What a non-call answer must be.
        calls_in_history: The conversation holds tool calls or results although the request
            lists no tools: the answer is text that must not begin a call (a model may imitate
            the calls it sees in its prompt).

    Example:
        >>> spec = StructuredRequest(tools=(ToolSpec("now"),), tool_choice="none")
        >>> spec.prompt_tools is None, spec.constrained
        (True, True)
    """

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: Literal["none", "auto", "required", "function"] = "none"
    function_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    calls_in_history: bool = False

    def for_history(self, holds_tool_calls: bool) -> StructuredRequest:
        """This request for a conversation that does (or does not) hold tool calls.

        Args:
            holds_tool_calls: What the validated conversation says
                (`mlx_mistral.chat.Conversation.holds_tool_calls`).
        """
        if self.tools or not holds_tool_calls:
            return self
        return replace(self, calls_in_history=True)

    @property
    def prompt_tools(self) -> tuple[ToolSpec, ...] | None:
        """The tools the prompt shows the model: None without tools or with "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return self.tools

    @property
    def constrained(self) -> bool:
        """Whether decoding runs under a grammar (see `mlx_mistral.tools.grammar`)."""
        return bool(self.tools) or self.calls_in_history or self.response_format.type != "text"
