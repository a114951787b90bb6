"""Shared by the tool-calling tests: small schemas, and a client's view of streamed calls."""

from __future__ import annotations

# A tool schema a random-weight model can always finish (enum only: no free strings).
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["tz"],
    "additionalProperties": False,
}

# A weather tool's parameters with every kind of argument, strings bounded.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "alerts": {"type": "boolean"},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: arguments must be {}
]
# What each tool's arguments must satisfy ("ping" takes none).
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "maxProperties": 0}}

# A response_format schema with every JSON type, bounded so a random model finishes it.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def assemble(deltas):
    """OpenAI stream deltas -> (content, calls), as a client accumulates them, checking each
    delta's shape: a call's first delta carries index, id, type and name with empty arguments;
    later ones carry only argument fragments."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for part in d.tool_calls:
            if "id" in part:
                assert part["index"] not in calls and part["function"]["arguments"] == ""
                assert part["type"] == "function"
                calls[part["index"]] = {
                    "id": part["id"],
                    "type": part["type"],
                    "function": {"name": part["function"]["name"], "arguments": ""},
                }
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)] or None
