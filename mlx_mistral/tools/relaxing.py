"""Tool schemas the grammar cannot enforce in full: what a tool that is not `strict` relaxes.

Agents send tool schemas written for a hosted model that reads them, not for a grammar:
`propertyNames`, `maxLength: 524288`, look-around patterns, unknown `format`s. A `strict` tool
(OpenAI's and Anthropic's `strict: true`) is refused with a 400 naming such a keyword, as the
caller asked for a guarantee. For any other tool the grammar enforces what it can and relaxes
the rest (`relax_schema`):

- a `minLength` / `maxLength` past `schema_limits.MAX_REPEAT` becomes no bound;
- a `pattern` (or a `patternProperties` key) the grammar engine cannot compile, or that repeats
  past `MAX_REPEAT`, is dropped, and so is a `format` it does not know;
- a keyword the grammar engine does not implement (`propertyNames`, `uniqueItems`, `not`,
  `if`/`then`/`else`, `contains`, `dependentRequired`, ...) is dropped from the grammar.

The prompt still shows the model the tool's full schema, and a generated call is validated
against it afterwards (`arguments_check`, with jsonschema, which checks all of these but
`format`): a call that breaks it is still returned, as agents report bad inputs back to the
model, and the mismatch is logged. The relaxations of each tool are logged once per process.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .grammar import check_schema_compiles
from .schema_limits import MAX_REPEAT, pattern_problem

log = logging.getLogger("mlx_mistral.tools")

# Where a schema holds subschemas: maps of them, single ones, and lists of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONES = (
    "items",
    "additionalProperties",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = ("minLength", "maxLength")
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_MAX_ROUNDS = 8  # engine errors to fix one after another (each names different keywords)
_LOGGED_LIMIT = 1024  # (tool, relaxations) pairs remembered so each is logged once


@dataclass(frozen=True)
class RelaxedSchema:
    """What the grammar enforces of a schema, and what it leaves out (one line per keyword)."""

    schema: dict[str, Any]
    relaxations: tuple[str, ...]


def relax_schema(schema: dict[str, Any]) -> RelaxedSchema:
    """The schema less what the grammar engine cannot enforce (see the module docstring).

    Args:
        schema: A valid JSON Schema (checked against the meta-schema and the request limits).

    Returns:
        The relaxed copy (the argument is not changed) and the relaxations, as
        "properties.script.maxLength 524288: no bound".

    Example:
        >>> relaxed = relax_schema({"type": "object", "propertyNames": {"pattern": "^a"}})
        >>> relaxed.schema, relaxed.relaxations
        ({'type': 'object'}, ('propertyNames: not enforced',))
    """
    return _relax(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)  # agents send the same tools with every request
def _relax(schema_json: str) -> RelaxedSchema:
    relaxed = json.loads(schema_json)
    notes: list[str] = []
    for node, path in list(_schema_nodes(relaxed)):
        _relax_node(node, path, notes)
    for _ in range(_MAX_ROUNDS):
        keys = _unimplemented_keys(check_schema_compiles(relaxed))
        if not keys:
            break
        for node, path in list(_schema_nodes(relaxed)):
            for key in keys & node.keys():
                del node[key]
                notes.append(f"{path}{key}: not enforced")
    return RelaxedSchema(relaxed, tuple(notes))


def _schema_nodes(schema: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (sub)schema object with its path prefix ("" or "properties.a.")."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, path
        for key in _SCHEMA_MAPS:
            children = node.get(key)
            if isinstance(children, dict):
                stack += [(v, f"{path}{key}.{name}.") for name, v in children.items()]
        stack += [(node[key], f"{path}{key}.") for key in _SCHEMA_ONES if key in node]
        for key in _SCHEMA_LISTS:
            children = node.get(key)
            if isinstance(children, list):
                stack += [(v, f"{path}{key}[{i}].") for i, v in enumerate(children)]


def _relax_node(node: dict[str, Any], path: str, notes: list[str]) -> None:
    for key in _COUNTS:
        count = node.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count > MAX_REPEAT:
            del node[key]
            notes.append(f"{path}{key} {count}: no bound")
    pattern = node.get("pattern")
    if isinstance(pattern, str) and not _pattern_serves(pattern):
        del node["pattern"]
        notes.append(f"{path}pattern {pattern[:80]!r}: not enforced")
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict):
        for key in [k for k in patterns if not _pattern_serves(k)]:
            del patterns[key]
            notes.append(f"{path}patternProperties {key[:80]!r}: not enforced")
    fmt = node.get("format")
    if isinstance(fmt, str) and check_schema_compiles({"type": "string", "format": fmt}):
        del node["format"]
        notes.append(f"{path}format {fmt[:80]!r}: not enforced")


@functools.lru_cache(maxsize=1024)
def _pattern_serves(pattern: str) -> bool:
    if pattern_problem(pattern) is not None:
        return False
    return check_schema_compiles({"type": "string", "pattern": pattern}) is None


def _unimplemented_keys(error: str | None) -> set[str]:
    match = _UNIMPLEMENTED.search(error or "")
    if match is None:
        return set()
    return {key.strip().strip('"') for key in match.group(1).split(",") if key.strip()}


_logged: set[tuple[str, tuple[str, ...]]] = set()


def log_relaxations(name: str, relaxations: tuple[str, ...]) -> None:
    """Log what a tool's grammar leaves out, once per process for the same tool and schema."""
    if not relaxations or (name, relaxations) in _logged:
        return
    if len(_logged) >= _LOGGED_LIMIT:
        _logged.clear()
    _logged.add((name, relaxations))
    log.info(
        "tool %r is not strict: its grammar leaves out what it cannot enforce (%s); its calls "
        "are checked against the full schema afterwards",
        name,
        "; ".join(relaxations),
    )
