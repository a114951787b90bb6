"""Generated calls of relaxed tools, checked against the tools' full schemas.

A tool that is not `strict` runs under a grammar that leaves out what it cannot enforce
(`mlx_mistral.tools.relaxing`). Its calls are validated afterwards against the full schema
with jsonschema (which checks every keyword the grammar relaxes but `format`); a call that
breaks it is still returned as generated (agents report a bad input back to the model, which
then corrects itself) and the mismatch is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from jsonschema import Draft202012Validator

from .format import TOOL_CALLS_MARKER
from .parsing import parse_tool_calls
from .spec import ToolSpec, arguments_schema

log = logging.getLogger("mlx_mistral.tools")


class ArgumentsCheck:
    """Validates generated calls of relaxed tools against their full schemas (logs mismatches).

    Args:
        tools: The request's tools; only those with relaxations are checked (the grammar
            enforces the others' schemas in full).
    """

    def __init__(self, tools: Sequence[ToolSpec]):
        self._validators = {
            tool.name: Draft202012Validator(arguments_schema(tool.parameters))
            for tool in tools
            if tool.relaxations
        }

    def __bool__(self) -> bool:
        """Whether any tool needs its calls checked."""
        return bool(self._validators)

    def check(self, calls_text: str) -> None:
        """Validate the calls in `calls_text` (what follows the call marker); log each mismatch."""
        for call in parse_tool_calls(TOOL_CALLS_MARKER + calls_text) or ():
            fn = call["function"]
            validator = self._validators.get(fn["name"])
            if validator is None:
                continue
            error = next(validator.iter_errors(json.loads(fn["arguments"])), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(the arguments)"
                log.warning(
                    "a call of tool %r breaks its schema where the grammar relaxed it (at %s: "
                    "%s); the call is returned as generated",
                    fn["name"],
                    where,
                    error.message[:300],
                )
