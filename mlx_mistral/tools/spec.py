"""The validated form of a request's tools, calls and response format (frozen, checked once).

`mlx_mistral.tools.validation` builds them from the OpenAI fields, `mlx_mistral.chat` builds
`ToolCall`s from assistant messages; everything after the boundary takes these, never raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments


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
