"""Bounds on the JSON schemas a request may send, checked before any costly work on them.

Checking a schema against the JSON Schema meta-schema costs ~0.3 ms per value in pure Python,
and the grammar engine's cost grows with alternatives and repetition counts: unbounded, one
request's schema held the server for 30 s (docs/reliability.md, "Hostile schemas"). These
limits, in the spirit of OpenAI's for structured outputs, keep a request's schema work under
about a second, and refuse what the grammar engine cannot serve (it gives up past 2,000
alternatives in one parser row, or on a lexer of too many states) with a 400 naming the schema
path instead of a silently broken answer. `SchemaBudget.check` walks a schema iteratively (it
costs microseconds per value) and raises `InvalidRequestError` naming the first excess.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidRequestError

try:  # the parser of Python's `re`, to count repetitions (jsonschema compiles patterns with it)
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python < 3.11
    import sre_parse  # type: ignore[no-redef]

MAX_SCHEMA_VALUES = 5_000
"""JSON values (objects, arrays, strings, numbers, ...) in all of a request's schemas."""
MAX_SCHEMA_DEPTH = 64
"""JSON nesting of one schema (each schema level is one or two: `properties` adds one)."""
MAX_ALTERNATIVES = 500
"""Items of one `anyOf` / `oneOf` (the grammar engine fails past ~2,000 in one row)."""
MAX_ENUM = 1_000
"""Values of one `enum` (OpenAI's limit)."""
MAX_REPEAT = 1_000
"""A pattern's repetition counts, multiplied through nesting (`(a{10}){100}` is 1,000), and
`minLength` / `maxLength`: the lexer builds states in proportion, so `a{10000}` takes seconds
per token and `a{1000000}` fails mid-answer."""

_COUNT_KEYWORDS = ("minLength", "maxLength")


class SchemaBudget:
    """What the schemas of one request may still spend (shared by its tools and its format)."""

    def __init__(self, values: int = MAX_SCHEMA_VALUES):
        self.values = values

    def check(self, schema: Any, param: str, *, relaxable: bool = False) -> None:
        """Raise if `schema` exceeds a limit; its values are charged to the budget.

        With `relaxable` (a tool that is not strict) the length counts and patterns are not
        checked here: `mlx_mistral.tools.relaxing` drops those the grammar cannot serve.

        Raises:
            InvalidRequestError: naming `param` and the path inside the schema.
        """
        stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
        while stack:
            value, path, depth = stack.pop()
            self.values -= 1
            if self.values < 0:
                raise _refuse(
                    param,
                    "",
                    f"the request's schemas hold more than {MAX_SCHEMA_VALUES} JSON values; "
                    "simplify them",
                )
            if depth > MAX_SCHEMA_DEPTH:
                raise _refuse(param, path, f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
            if isinstance(value, dict):
                _check_keywords(value, param, path, relaxable)
                stack.extend((v, f"{path}.{k}", depth + 1) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_keywords(schema: dict[str, Any], param: str, path: str, relaxable: bool) -> None:
    for keyword in ("anyOf", "oneOf"):
        items = schema.get(keyword)
        if isinstance(items, list) and len(items) > MAX_ALTERNATIVES:
            raise _refuse(
                param,
                f"{path}.{keyword}",
                f"has {len(items)} alternatives; at most {MAX_ALTERNATIVES} are supported",
            )
    enum = schema.get("enum")
    if isinstance(enum, list) and len(enum) > MAX_ENUM:
        raise _refuse(
            param, f"{path}.enum", f"has {len(enum)} values; at most {MAX_ENUM} are supported"
        )
    if relaxable:
        return
    for keyword in _COUNT_KEYWORDS:
        count = schema.get(keyword)
        if isinstance(count, int) and not isinstance(count, bool) and count > MAX_REPEAT:
            raise _refuse(
                param, f"{path}.{keyword}", f"is {count}; at most {MAX_REPEAT} is supported"
            )
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        _check_pattern(pattern, param, f"{path}.pattern")
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict):
        for key in patterns:
            _check_pattern(key, param, f"{path}.patternProperties")


def _check_pattern(pattern: str, param: str, path: str) -> None:
    problem = pattern_problem(pattern)
    if problem is not None:
        raise _refuse(param, path, problem)


def pattern_problem(pattern: str) -> str | None:
    """Why a `pattern` is past what this server serves (as "is ..." / "repeats ..."), or None."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        # OverflowError: a count past 2^32 ("a{4294967296}"), which re reports that way.
        return f"is not a regular expression this server supports: {exc}"
    repeat = _repeat_product(parsed)
    if repeat > MAX_REPEAT:
        return (
            f"repeats up to {repeat} times (counts multiplied through nesting); at most "
            f"{MAX_REPEAT} is supported"
        )
    return None


def _repeat_product(parsed: Any) -> int:
    """The largest product of bounded repetition counts along one nesting path of a pattern.

    Unbounded repetitions (`*`, `+`, `{2,}`) count their lower bound: a loop costs the lexer
    one state, a count costs one per repetition.
    """
    worst = 1
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        node, factor = stack.pop()
        worst = max(worst, factor)
        items = node.data if hasattr(node, "data") else node
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                count = low if high == sre_parse.MAXREPEAT else high
                stack.append((sub, factor * max(1, count)))
            elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
                stack.append((arg[-1], factor))
            elif name == "BRANCH":
                stack.extend((branch, factor) for branch in arg[1])
            elif name in ("ASSERT", "ASSERT_NOT"):
                stack.append((arg[1], factor))
    return worst


def _refuse(param: str, path: str, why: str) -> InvalidRequestError:
    where = f"{param} (at {path.lstrip('.')})" if path else param
    return InvalidRequestError(f"{where} {why}", param=param)
