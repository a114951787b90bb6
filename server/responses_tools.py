"""OpenAI's Responses API, tools: `tools` and `tool_choice` -> chat tools, and back.

- A function tool is the flat Responses shape `{"type": "function", "name", "description",
  "parameters", "strict"}`.
- A namespace tool (`{"type": "namespace", "name", "description", "tools": [functions]}`) groups
  function tools under a name. The model is offered each one as `<namespace>__<name>` (the
  chat format has one flat list of names, and two namespaces may hold the same name); a call of
  one comes back as a `function_call` item with its own `name` and the `namespace` field, as
  OpenAI answers, and such an item sent back as input is read the same way.
- Hosted tools (web search, file search, code interpreter, computer use, ...) run on OpenAI's
  servers, not in this model. Tools are an offer: with `tool_choice` "auto" or "none" they are
  left out of the prompt (the response says so in its `X-Tools-Not-Offered` header, the log
  once per kind); a `tool_choice` that requires one is a 400 naming it.
- `"tools": []` is no tools.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.errors import InvalidRequestError

log = logging.getLogger("mlx_mistral.server")

HOSTED_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "web_search_2025_08_26": "web search",
    "web_search_preview_2025_03_11": "web search",
    "file_search": "file search",
    "computer_use_preview": "computer use",
    "computer_use": "computer use",
    "computer": "computer use",
    "code_interpreter": "code interpreter",
    "image_generation": "image generation",
    "mcp": "remote MCP",
    "local_shell": "local shell",
    "shell": "shell",
    "apply_patch": "apply patch",
    "custom": "custom (free-form grammar)",
    "tool_search": "tool search",
}
NAMESPACE_SEPARATOR = "__"
NOT_OFFERED_HEADER = "X-Tools-Not-Offered"
_logged_not_offered: set[str] = set()  # hosted tool kinds already logged by this process


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def flat_name(namespace: str, name: str) -> str:
    """The name the model is offered for function `name` of `namespace`."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}"


@dataclass(frozen=True)
class ResponsesTools:
    """A request's tools as the chat path serves them.

    Attributes:
        chat_tools: the chat tools offered to the model (empty: none).
        tool_choice: the chat tool_choice (None: not given, or nothing left to choose from).
        namespaced: for each offered `<namespace>__<name>`, its (namespace, name).
        not_offered: the hosted tool kinds left out, in request order.
        origins: for each chat tool, the Responses field it came from (for error names).
    """

    chat_tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)
    not_offered: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()

    def log_not_offered(self) -> None:
        """Log each hosted tool kind left out, the first time this process leaves it out."""
        for kind in self.not_offered:
            if kind not in _logged_not_offered:
                _logged_not_offered.add(kind)
                log.info(
                    "responses: the hosted %s tool (%r) is not offered to the model: it runs "
                    "on OpenAI's servers, not here (said once; each such response carries an "
                    "%s header)",
                    HOSTED_TOOLS[kind],
                    kind,
                    NOT_OFFERED_HEADER,
                )


def responses_tools(fields: dict[str, Any]) -> ResponsesTools:
    """The `tools` and `tool_choice` of a Responses body, translated.

    Raises InvalidRequestError naming the bad field (`tools[2].tools[0].name`, `tool_choice`).
    """
    raw_tools = fields.get("tools", [])
    if not isinstance(raw_tools, list):
        raise _bad("tools must be a list of tool objects", "tools")
    chat_tools: list[dict[str, Any]] = []
    namespaced: dict[str, tuple[str, str]] = {}
    not_offered: list[str] = []
    origins: list[str] = []
    for i, tool in enumerate(raw_tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{where} must be an object", where)
        kind = tool.get("type")
        if isinstance(kind, str) and kind in HOSTED_TOOLS:
            if kind not in not_offered:
                not_offered.append(kind)
        elif kind == "namespace":
            for j, (name, tool_fn) in enumerate(_namespace(tool, where)):
                namespaced[tool_fn["function"]["name"]] = name
                chat_tools.append(tool_fn)
                origins.append(f"{where}.tools[{j}]")
        else:
            chat_tools.append(_function_tool(tool, where))
            origins.append(where)
    choice = _tool_choice(fields["tool_choice"]) if "tool_choice" in fields else None
    if choice == "required" and not chat_tools and not_offered:
        raise _bad(
            'tool_choice "required" needs a function tool, and the only tools given are hosted '
            f"ones this server cannot run ({', '.join(not_offered)})",
            "tool_choice",
        )
    if not chat_tools and choice in ("auto", "none"):
        choice = None  # nothing left to choose from: a plain answer
    return ResponsesTools(chat_tools, choice, namespaced, tuple(not_offered), tuple(origins))


def _function_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    """A flat Responses function tool -> a chat tool."""
    kind = tool.get("type")
    if kind != "function":
        raise _bad(
            f'{where}.type must be "function", "namespace" or a hosted tool, got {kind!r:.100}',
            f"{where}.type",
        )
    if "function" in tool:  # the chat shape sent to the wrong endpoint
        raise _bad(
            f"{where} uses the chat completions shape; Responses tools are flat: "
            '{"type": "function", "name": ..., "parameters": ...}',
            f"{where}.function",
        )
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    strict = tool.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{where}.strict must be a boolean", f"{where}.strict")
    if strict:
        # Only an explicit `strict: true` refuses a schema the grammar cannot enforce in full:
        # OpenAI's default is strict, but agents (Codex) send schemas that need relaxing.
        fn["strict"] = True
    return {"type": "function", "function": fn}


def _namespace(tool: dict[str, Any], where: str) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """A namespace tool's functions, each as ((namespace, name), chat tool)."""
    namespace = tool.get("name")
    if not isinstance(namespace, str) or not namespace:
        raise _bad(f"{where}.name must be a non-empty string", f"{where}.name")
    inner = tool.get("tools")
    if not isinstance(inner, list):
        raise _bad(f"{where}.tools must be a list of function tools", f"{where}.tools")
    out = []
    for j, fn_tool in enumerate(inner):
        inner_where = f"{where}.tools[{j}]"
        if not isinstance(fn_tool, dict):
            raise _bad(f"{inner_where} must be an object", inner_where)
        chat_tool = _function_tool(fn_tool, inner_where)
        name = chat_tool["function"].get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{inner_where}.name must be a non-empty string", f"{inner_where}.name")
        chat_tool["function"]["name"] = flat_name(namespace, name)
        out.append(((namespace, name), chat_tool))
    return out


def _tool_choice(raw: Any) -> Any:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name")
        namespace = raw.get("namespace")
        if isinstance(namespace, str) and isinstance(name, str):
            name = flat_name(namespace, name)
        return {"type": "function", "function": {"name": name}}
    kind = raw.get("type") if isinstance(raw, dict) else None
    if isinstance(kind, str) and kind in HOSTED_TOOLS:
        raise _bad(
            f"tool_choice requires the hosted {HOSTED_TOOLS[kind]} tool ({kind!r}), which runs "
            "on OpenAI's servers and is not available here; only function tools are",
            "tool_choice",
        )
    raise _bad(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )


def call_item_names(flat: str, namespaced: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The `name` (and `namespace`) fields of a function_call item for the model's call of
    `flat`."""
    if flat in namespaced:
        namespace, name = namespaced[flat]
        return {"name": name, "namespace": namespace}
    return {"name": flat}
