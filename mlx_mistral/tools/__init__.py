"""Tools and structured output, one job per module (import each name from its module).

- `format`: the text v0.2 reads and writes for tools: markers, JSON layout, call ids, names.
- `spec`: the validated request types (`ToolSpec`, `ToolCall`, `ResponseFormat`,
  `StructuredRequest`).
- `validation`: the OpenAI fields in, a `StructuredRequest` out (`parse_structured_request`).
- `grammar`: llguidance grammars that make calls and JSON answers well-formed
  (`make_constraints`, `GrammarConstraint`).
- `parsing`: generated text back into OpenAI tool calls, whole or streamed (pure Python:
  `split_tool_calls`, `ToolCallStreamer`).

The imports run one way: spec <- format <- parsing; spec, format <- grammar <- validation.
"""
