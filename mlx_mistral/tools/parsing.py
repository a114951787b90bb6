"""Reading tool calls out of generated text: whole (`split_tool_calls`) or as it streams
(`ToolCallStreamer`). Pure Python: importing it loads neither MLX nor llguidance.

The model writes calls in the layout of `mlx_mistral.tools.format` (v0.2 has no tool tokens),
optionally after some text and one space:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_AbC123xyz"}]

Both readers give OpenAI `tool_calls`. Call ids are the ids in the text: under a grammar they are
chosen by `mlx_mistral.tools.grammar` (never by the model) and forced into the output, so the answer
re-renders into the next prompt unchanged. A call without an id (only possible in text generated
without a grammar) gets a fresh `new_call_id()`. `arguments` is the JSON text exactly as
generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .format import (
    ARGUMENTS_KEY,
    CALL_CLOSE,
    CALL_OPEN,
    CONTENT_SEPARATOR,
    ID_KEY,
    ITEM_SEPARATOR,
    TOOL_CALLS_MARKER,
    new_call_id,
)


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]] | None]:
    """Split an answer into its content and its tool calls.

    Args:
        text: The generated text (as the detokenizer gives it).

    Returns:
        (content, calls): the text before `[TOOL_CALLS]` (without the one space that separates
        them) and the OpenAI calls; (text, None) when the text holds no complete, well-formed
        call array (for example when generation stopped at max_tokens mid-call).
    """
    at = text.find(TOOL_CALLS_MARKER)
    if at < 0:
        return text, None
    content = text[:at]
    content = content.removesuffix(CONTENT_SEPARATOR)
    calls = _parse_call_array(text, at + len(TOOL_CALLS_MARKER))
    return (text, None) if calls is None else (content, calls)


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The OpenAI `tool_calls` of an answer, or None if it makes no (complete) call.

    Args:
        text: The generated text, e.g.
            '[TOOL_CALLS] [{"name": "f", "arguments": {}, "id": "call_1"}]'.

    Returns:
        `[{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}]` or None.

    Example:
        >>> parse_tool_calls('[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}, "id": "call_1"}]')
        [{'id': 'call_1', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"x": 1}'}}]
    """
    return split_tool_calls(text)[1]


_decoder = json.JSONDecoder()
_WS = " \t\n\r"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _parse_call_array(text: str, pos: int) -> list[dict[str, Any]] | None:
    """Parse `[ {call}, ... ]` from `pos` to the end of the text (only whitespace may follow)."""
    pos = _skip_ws(text, pos)
    if not text.startswith("[", pos):
        return None
    calls = []
    pos = _skip_ws(text, pos + 1)
    while True:
        call = _parse_call(text, pos)
        if call is None:
            return None
        calls.append(call[0])
        pos = _skip_ws(text, call[1])
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            break
        else:
            return None
    if _skip_ws(text, pos + 1) != len(text) or not calls:
        return None
    return calls


def _parse_call(text: str, pos: int) -> tuple[dict[str, Any], int] | None:
    """One `{"name": ..., "arguments": {...}, "id": ...}` object (any key order); keeps the raw
    JSON text of the arguments."""
    if not text.startswith("{", pos):
        return None
    fields: dict[str, Any] = {}
    raw_arguments = None
    pos = _skip_ws(text, pos + 1)
    while not text.startswith("}", pos):
        try:
            key, pos = _decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not text.startswith(":", pos):
                return None
            start = _skip_ws(text, pos + 1)
            value, pos = _decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        if not isinstance(key, str):
            return None
        fields[key] = value
        if key == "arguments":
            raw_arguments = text[start:pos]
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif not text.startswith("}", pos):
            return None
    name, arguments, call_id = fields.get("name"), fields.get("arguments"), fields.get("id")
    if not isinstance(name, str) or not isinstance(arguments, dict) or raw_arguments is None:
        return None
    if not isinstance(call_id, str) or not call_id:
        call_id = new_call_id()
    return _openai_call(call_id, name, raw_arguments), pos + 1


def _openai_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class StreamDelta:
    """What one piece of generated text adds to a streamed message."""

    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI `delta.tool_calls` entries


# The layout the grammar writes (see mlx_mistral.tools.grammar), read piece by piece. Names and
# ids are plain (no escapes): validation allows no quote or backslash in a name, and ids are
# alphanumeric.
_MARKER_HOLD = (CONTENT_SEPARATOR + TOOL_CALLS_MARKER, TOOL_CALLS_MARKER)
_OPEN = re.compile(r"\s*\[")
_HEAD = re.compile(r"\s*" + re.escape(CALL_OPEN) + r'"([^"\\]*)"' + re.escape(ARGUMENTS_KEY))
_TAIL = re.compile(r"\s*" + re.escape(ID_KEY) + r'"[^"\\]*"' + re.escape(CALL_CLOSE))
_NEXT = ITEM_SEPARATOR.strip()  # "," before another call
_SEP = re.compile(r"\s*(" + re.escape(_NEXT) + r"|\])")


class ToolCallStreamer:
    """Turns streamed answer text into OpenAI content and tool-call deltas.

    Content passes through, except that text which may be the start of " [TOOL_CALLS]" is held
    back until it is known not to be; the marker and the call array never show as content. With
    `call_ids` (the ids the grammar forces: `GrammarConstraint.call_ids`), each call streams as
    OpenAI streams it: a first delta `{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}` once the name is complete, then `{"index", "function": {"arguments":
    fragment}}` as the arguments are generated. Without ids (text generated without a grammar)
    calls are emitted whole by `finish`. Either way the deltas add up to what `split_tool_calls`
    gives for the whole text.

    Example:
        >>> s = ToolCallStreamer(call_ids=["call_1"])
        >>> pieces = ('[TOOL_', 'CALLS] [{"name": "f", "argu', 'ments": {}, "id": "call_1"}]')
        >>> deltas = [s.feed(piece) for piece in pieces]
        >>> [c for x in deltas for c in x.tool_calls]  # doctest: +NORMALIZE_WHITESPACE
        [{'index': 0, 'id': 'call_1', 'type': 'function',
          'function': {'name': 'f', 'arguments': ''}},
         {'index': 0, 'function': {'arguments': '{}'}}]
    """

    def __init__(self, call_ids: Sequence[str] | None = None):
        """Args:
        call_ids: The ids of the calls in order, known before they are generated; None when
            the text was not generated under a grammar.
        """
        self._ids = None if call_ids is None else list(call_ids)
        self._held = ""  # content not yet known to be content
        self._calls: str | None = None  # the text after the marker (None: no marker yet)
        self._pos = 0  # how much of it has been read
        self._state = "open"  # open -> head -> args -> tail -> sep -> head ... -> done
        self._started = 0  # calls whose first delta went out
        self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, text: str) -> StreamDelta:
        """Add the next piece of generated text; returns what it makes final."""
        if self._calls is not None:
            self._calls += text
            return StreamDelta(tool_calls=tuple(self._read()))
        text = self._held + text
        at = text.find(TOOL_CALLS_MARKER)
        if at >= 0:
            content = text[:at]
            self._held, self._calls = content, text[at + len(TOOL_CALLS_MARKER) :]
            return StreamDelta(content.removesuffix(CONTENT_SEPARATOR), tuple(self._read()))
        keep = max(
            (
                k
                for k in range(1, min(len(text), len(_MARKER_HOLD[0])) + 1)
                if any(m.startswith(text[-k:]) for m in _MARKER_HOLD)
            ),
            default=0,
        )
        self._held = text[len(text) - keep :]
        return StreamDelta(text[: len(text) - keep])

    def finish(self) -> StreamDelta:
        """End of the answer: flush held content, or emit the calls not streamed yet."""
        if self._calls is None:
            held, self._held = self._held, ""
            return StreamDelta(held)
        _, calls = split_tool_calls(self._held + TOOL_CALLS_MARKER + self._calls)
        if calls is None:  # no complete call array (max_tokens hit mid-call)
            # Under a grammar (ids known) what follows the marker is a call cut short, never
            # content; without one it is the model's own text.
            cut_call = self._started or self._ids is not None
            return StreamDelta("" if cut_call else TOOL_CALLS_MARKER + self._calls)
        out = []
        for i in range(self._started, len(calls)):
            fn = calls[i]["function"]
            out.append(_first_delta(i, calls[i]["id"], fn["name"]))
            out.append({"index": i, "function": {"arguments": fn["arguments"]}})
        return StreamDelta(tool_calls=tuple(out))

    def _read(self) -> list[dict[str, Any]]:
        """Read the call array as far as the text goes (only with ids), emitting deltas."""
        out: list[dict[str, Any]] = []
        text = self._calls or ""
        while self._ids is not None and self._state != "done":
            if self._state == "args":
                start = self._pos
                closed = self._scan_arguments(text)
                if self._pos > start:
                    out.append(
                        {
                            "index": self._started - 1,
                            "function": {"arguments": text[start : self._pos]},
                        }
                    )
                if not closed:
                    break
                self._state = "tail"
                continue
            pattern = {"open": _OPEN, "head": _HEAD, "tail": _TAIL, "sep": _SEP}[self._state]
            match = pattern.match(text, self._pos)
            if match is None:
                break  # not there yet (the grammar guarantees the layout)
            self._pos = match.end()
            if self._state == "head":
                i = self._started
                call_id = self._ids[i] if i < len(self._ids) else new_call_id()
                out.append(_first_delta(i, call_id, match.group(1)))
                self._started += 1
            nxt = {"open": "head", "head": "args", "tail": "sep"}
            self._state = nxt.get(self._state) or ("head" if match.group(1) == _NEXT else "done")
        return out

    def _scan_arguments(self, text: str) -> bool:
        """Consume the arguments' JSON text; True once the object is closed."""
        while self._pos < len(text):
            ch = text[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return True
        return False


def assemble_tool_calls(
    pieces: Iterable[str],
    call_ids: Sequence[str] | None = None,
) -> tuple[str, list[dict[str, Any]] | None]:
    """What a client adds up from streaming `pieces` of an answer: (content, calls or None).

    The non-streamed answer is built this way too, so the two agree by construction, also when
    generation stopped mid-call at max_tokens: the call then comes back with the arguments
    generated so far (and finish_reason "length"), as the stream already sent them.

    Example:
        >>> pieces = ['[TOOL_CALLS] [{"name": "f", "argu', 'ments": {"x": 1']
        >>> assemble_tool_calls(pieces, ["call_1"])  # doctest: +NORMALIZE_WHITESPACE
        ('', [{'id': 'call_1', 'type': 'function',
               'function': {'name': 'f', 'arguments': '{"x": 1'}}])
    """
    streamer = ToolCallStreamer(call_ids=call_ids)
    deltas = [streamer.feed(piece) for piece in pieces] + [streamer.finish()]
    calls: dict[int, dict[str, Any]] = {}
    for part in (part for delta in deltas for part in delta.tool_calls):
        if "id" in part:
            calls[part["index"]] = {
                "id": part["id"],
                "type": "function",
                "function": dict(part["function"]),
            }
        else:
            calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return "".join(d.content for d in deltas), [calls[i] for i in sorted(calls)] or None


def _first_delta(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
