"""Grammar-constrained decoding: tool calls and JSON answers that are well-formed by construction.

`make_constraints(spec, tokenizer, n)` turns a validated `StructuredRequest` (see
`mlx_mistral.tools.validation`) into one `TokenConstraint` per choice for `BatchGenerator.add`.
Each holds an llguidance matcher (the engine was chosen by measurement: docs/benchmarks.md,
"Grammar engine") over a Lark grammar with inline JSON schemas; every step it yields the bool
mask of tokens the grammar allows, and it is told every token the sequence takes.

The grammars work on the bytes of the generated tokens, and the first generated token usually
carries SentencePiece's dummy-prefix space ("▁[" is " ["): so every grammar accepts one optional
leading space, which the detokenizer drops from the text.

- A call (`tool_choice` "required" or a named function) is exactly the text
  `mlx_mistral.tools.format` renders for an assistant call, so the conversation round-trips into
  the next prompt:

      [TOOL_CALLS] [{"name": "get_weather", "arguments": {...}, "id": "call_AbC123xyz"}]

  The name is one of the tools (the named one only, for a named choice); `arguments` is JSON
  valid against that tool's `parameters` schema, written with the format's separators
  (", " and ": ", no other whitespace). With `parallel_tool_calls` up to `MAX_PARALLEL_CALLS`
  calls follow one another (", " between them), otherwise exactly one. The ids are chosen here
  (`format.new_call_id`) and written into the grammar as literals: the model never invents or
  copies an id, and `constraint.call_ids[i]` is known before the i-th call is generated (for
  streaming). Once `]` closes the array the constraint finishes the sequence with "tool_calls".
- `tool_choice` "auto": the answer is either free text that never contains `[TOOL_CALLS]`, or
  optional text, one space, then a call array as above (what the format renders for an
  assistant message with both content and calls). Text is unconstrained until the marker
  appears; from there on the call is constrained. With a JSON `response_format`, the answer is
  JSON instead of free text.
- `tool_choice` "none" with tools: free text that never contains `[TOOL_CALLS]` (or the JSON
  answer), so a model that has seen calls in the conversation cannot start one.
- `response_format` json_object / json_schema without tools: the whole answer is the JSON value;
  EOS is allowed exactly when the value is complete, and once nothing but EOS can follow, the
  constraint ends the sequence with "stop".

Schemas the engine compiles but cannot serve (an empty language such as `{"$ref": "#"}`, or a
`const` it cannot spell) are refused by `make_constraints` with an `InvalidRequestError` naming
the schema's field. Should the engine still fail mid-answer (a parser or lexer limit), the error
is logged (once) and the sequence ends with finish_reason "error", never a silent "stop"; the
`Engine` ends such a request with a `StructuredOutputError` (the server's 500, or a stream's
error event).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import mlx.core as mx
import numpy as np

from ..errors import InvalidRequestError
from .arguments_check import ArgumentsCheck
from .format import (
    ARGUMENTS_KEY,
    CALL_OPEN,
    CALLS_HEAD,
    CONTENT_SEPARATOR,
    ITEM_SEPARATOR,
    KEY_SEPARATOR,
    STRING_ESCAPES,
    TOOL_CALLS_MARKER,
    call_tail,
    dumps,
    new_call_id,
)
from .spec import StructuredRequest, arguments_schema

if TYPE_CHECKING:  # the tokenizer's convenience `encode_chat` imports the tools
    from ..tokenizer import Tokenizer

log = logging.getLogger("mlx_mistral.grammar")

MAX_PARALLEL_CALLS = 8  # most calls in one answer when parallel_tool_calls is true
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")

# JSON exactly as the format writes it, so a generated call re-renders byte for byte into the
# next prompt: no free whitespace (which also keeps a sampled model from spinning on blank lines)
# and only the escapes the format writes ("\uXXXX" would be a second spelling of a raw
# character). Number spellings are not canonicalised ("1.50" re-renders as "1.5").
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ITEM_SEPARATOR,
    "key_separator": KEY_SEPARATOR,
    "json_allowed_escapes": STRING_ESCAPES,
}

# Text that never contains the call marker (llguidance regex intersection and negation).
_MARKER_RE = re.escape(TOOL_CALLS_MARKER)
_TEXT_RULES = f"""
TEXT: /(?s:.*)/ & ~/(?s:.*){_MARKER_RE}(?s:.*)/
"""

_llg_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """The llguidance grammar (JSON form) of one JSON schema with the package's JSON options.

    Used to check at request time that the engine can compile a schema (`check_schema_compiles`).
    """
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_OPTIONS)


def check_schema_compiles(schema: Mapping[str, Any]) -> str | None:
    """Why the grammar engine cannot compile `schema`, or None if it can.

    Args:
        schema: A JSON schema (already checked against the JSON Schema meta-schema).

    Returns:
        The engine's error message (e.g. an unsupported keyword), or None.
    """
    try:
        error = llguidance.LLMatcher.validate_grammar(schema_grammar(schema))
    except ValueError as exc:
        return str(exc)
    return error or None


def schema_serving_error(schema: Mapping[str, Any], tokenizer: Tokenizer) -> str | None:
    """Why the grammar engine cannot start an answer for `schema` with this vocabulary, or None.

    Compiling is not enough: `{"$ref": "#"}` (no value is ever complete) and a `const` string
    holding a control character (the format writes no "\\u" escape) compile to grammars whose
    first step allows nothing. This builds the schema's grammar alone and computes that step.
    """
    return _serving_error(dumps(dict(schema)), tokenizer)


@functools.lru_cache(maxsize=256)  # a client sends the same tools with every request
def _serving_error(schema_json: str, tokenizer: Tokenizer) -> str | None:
    grammar = "%llguidance {}\n" + _json_rule("answer", json.loads(schema_json)) + "start: answer\n"
    matcher = llguidance.LLMatcher(make_llg_tokenizer(tokenizer), grammar, log_level=0)
    if not matcher.is_error():
        mask = bitmask_to_numpy(matcher.compute_bitmask(), tokenizer.vocab_size)
        if not matcher.is_error() and not mask.any():
            return "no JSON value satisfies it"
    if matcher.is_error():
        error = matcher.get_error()
        return "no JSON value satisfies it" if "NoExtension" in error else error.split("\n")[0]
    return None


def make_llg_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance view of our SentencePiece vocabulary (built once per tokenizer, ~0.1 s).

    Token bytes come from `Tokenizer.token_bytes()` ("▁" as a space, byte-fallback pieces as
    their byte); `<unk>`, `<s>`, `</s>` are declared special, so no grammar text can produce them
    and EOS is allowed only where the grammar accepts.
    """
    cached = _llg_tokenizers.get(tokenizer)
    if cached is None:
        cached = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_VocabView(tokenizer)))
        _llg_tokenizers[tokenizer] = cached
    return cached


class _VocabView:
    """What `llguidance.TokenizerWrapper` reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = list(tokenizer.token_bytes())
        self.special_token_ids = sorted(tokenizer.special_ids | _redundant_byte_tokens(tokenizer))
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        # llguidance tokenizes bytes the grammar forces mid-answer, so no dummy-prefix space:
        # encoding "\n" + text gives "▁", "<0x0A>", then text's own pieces (none spans "\n").
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode("\n" + text)[2:]


def _redundant_byte_tokens(tokenizer: Tokenizer) -> set[int]:
    """Byte-fallback tokens SentencePiece never emits, because a normal piece spells that byte.

    Declared special (so no grammar allows them): `<0x20>` as the first token would spell the
    answer's leading space in a way the detokenizer keeps (it drops only a "▁"), and the others
    are second spellings of plain ASCII. Bytes without such a piece (newline, UTF-8 parts) stay.
    """
    table = tokenizer.token_bytes()
    is_byte = [_BYTE_PIECE.match(tokenizer.id_to_piece(i)) is not None for i in range(len(table))]
    single = {b for i, b in enumerate(table) if len(b) == 1 and not is_byte[i]} - {
        table[i] for i in tokenizer.special_ids
    }
    return {i for i, b in enumerate(table) if is_byte[i] and b in single}


def bitmask_to_numpy(bitmask: bytes, vocab_size: int) -> np.ndarray:
    """llguidance's packed bitmask (bit i of little-endian words = token i) as bool [vocab]."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")
    return bits[:vocab_size].view(np.bool_)


def bitmask_to_mlx(bitmask: bytes, vocab_size: int) -> mx.array:
    """`bitmask_to_numpy` as an MLX array."""
    return mx.array(bitmask_to_numpy(bitmask, vocab_size))


# -- grammars ------------------------------------------------------------------------------------
def _lit(text: str) -> str:
    """A Lark string literal (JSON string syntax is what llguidance's Lark reads)."""
    return dumps(text)


def _json_rule(name: str, schema: Mapping[str, Any]) -> str:
    merged = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **JSON_OPTIONS}}
    return f"{name}: %json {dumps(merged)}\n"


def calls_rules(
    tools: Sequence[tuple[str, Mapping[str, Any] | None]], call_ids: Sequence[str]
) -> str:
    """Rules `calls` (the array body between "[" and "]") for the given (name, parameters).

    Each call is the format's `CALL_OPEN`, a name with its `ARGUMENTS_KEY`, the arguments, then
    the call's `call_tail`: the name decides which schema the arguments follow.
    """
    rules = []
    names = []
    for k, (name, parameters) in enumerate(tools):
        rules.append(f"fn_{k}: {_lit(dumps(name) + ARGUMENTS_KEY)} args_{k}\n")
        rules.append(_json_rule(f"args_{k}", arguments_schema(parameters)))
        names.append(f"fn_{k}")
    rules.append(f"fn: {' | '.join(names)}\n")
    for i, call_id in enumerate(call_ids):
        rules.append(f"call_{i}: {_lit(CALL_OPEN)} fn {_lit(call_tail(call_id))}\n")
    # call_0 (", " call_1 (", " call_2 ...)?)?
    body = f"call_{len(call_ids) - 1}"
    for i in range(len(call_ids) - 2, -1, -1):
        body = f"call_{i} ({_lit(ITEM_SEPARATOR)} {body})?"
    rules.append(f"calls: {body}\n")
    return "".join(rules)


def build_grammar(spec: StructuredRequest, call_ids: Sequence[str]) -> str | None:
    """The Lark grammar of one choice's answer, or None when the answer is unconstrained.

    Args:
        spec: The validated request.
        call_ids: The ids written into the calls, one per possible call.

    Returns:
        llguidance Lark text, or None (plain text with no tools, or with `tool_choice` "none"
        and no tools).
    """
    fmt = spec.response_format
    answer = None  # rule name of the non-call answer, if constrained
    rules = ["%llguidance {}\n"]
    if fmt.type == "json_object":
        rules.append(_json_rule("json_answer", {"type": "object"}))
        answer = '" "? json_answer'
    elif fmt.type == "json_schema":
        rules.append(_json_rule("json_answer", fmt.schema or {}))
        answer = '" "? json_answer'

    choice = spec.tool_choice
    if not spec.tools or choice == "none":
        if spec.tools or spec.calls_in_history:  # calls are known: text must not start one
            rules.append(_TEXT_RULES)
            answer = answer or "TEXT"
        if answer is None:
            return None
        rules.append(f"start: {answer}\n")
        return "".join(rules)

    tools = [(t.name, t.enforced_parameters) for t in spec.tools]
    if choice == "function":
        tools = [t for t in tools if t[0] == spec.function_name]
    rules.append(calls_rules(tools, call_ids))
    array = '"[" calls "]"'
    if choice in ("required", "function"):
        rules.append(f'start: " "? {_lit(CALLS_HEAD)} {array}\n')
    elif answer is None:  # auto, free text: optional text, one space, then the marker
        rules.append(_TEXT_RULES)
        rules.append(f"CALL_HEAD: (TEXT {_lit(CONTENT_SEPARATOR)})? {_lit(CALLS_HEAD)}\n")
        rules.append("call_head[lazy]: CALL_HEAD\n")
        rules.append(f"start: TEXT | call_head {array}\n")
    else:  # auto with a JSON answer: the JSON value, or the calls
        rules.append(f'start: {answer} | " "? {_lit(CALLS_HEAD)} {array}\n')
    return "".join(rules)


# -- the constraint ------------------------------------------------------------------------------
class GrammarConstraint:
    """One sequence's grammar state (implements `mlx_mistral.batch.TokenConstraint`).

    Attributes:
        call_ids: The ids of the calls this answer may make, in order (empty without tools).
        grammar: The Lark grammar text.
    """

    def __init__(
        self,
        grammar: str,
        tokenizer: Tokenizer,
        *,
        call_ids: Sequence[str] = (),
        arguments_check: ArgumentsCheck | None = None,
    ):
        """Compile `grammar` for `tokenizer`; `arguments_check` validates the finished calls of
        tools whose grammar is relaxed.

        Raises:
            ValueError: If llguidance refuses the grammar (request validation should have
                caught every case first).
        """
        self.grammar = grammar
        self.call_ids = tuple(call_ids)
        self._vocab_size = tokenizer.vocab_size
        self._eos = tokenizer.eos_id
        self._token_bytes = tokenizer.token_bytes()
        self._matcher = llguidance.LLMatcher(make_llg_tokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"grammar does not compile: {self._matcher.get_error()}")
        self._tail = b""  # the last bytes generated, to see the call marker appear
        self._in_calls = False
        self._bos = tokenizer.bos_id
        self._failed = False  # the engine reported an error (logged once)
        self._arguments_check = arguments_check or None
        self._calls = b""  # the call array's bytes, kept only for `arguments_check`

    @property
    def error(self) -> str | None:
        """Why the matcher stopped accepting tokens (None while it is well)."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def in_calls(self) -> bool:
        """Whether the answer has begun a call array."""
        return self._in_calls

    def allowed_mask(self) -> mx.array:
        """bool [vocab]: the tokens the grammar allows next (EOS only where it accepts).

        After an engine error: only `<s>`, which has no text; `forced_finish_reason` then ends
        the sequence with "error" (EOS would end it with a "stop" that looks like success).
        """
        bitmask = None if self._matcher.is_error() else self._matcher.compute_bitmask()
        if bitmask is None or self._matcher.is_error():
            self._report_error()
            # Built here, on the engine thread, which does all MLX work (constraints are made
            # on request threads).
            return mx.array(np.arange(self._vocab_size) == self._bos)
        return bitmask_to_mlx(bitmask, self._vocab_size)

    def _report_error(self) -> None:
        if not self._failed:
            self._failed = True
            log.error(
                "the grammar engine failed mid-answer; the request ends with an error: %s",
                self._matcher.get_error().split("\n")[0][:500],
            )

    def advance(self, token: int) -> None:
        """Consume the token the sequence took."""
        self._matcher.consume_token(token)
        if token == self._eos or not self.call_ids:
            return
        if self._in_calls:
            if self._arguments_check is not None:
                self._calls += self._token_bytes[token]
            return
        self._tail = (self._tail + self._token_bytes[token])[-64:]
        marker = TOOL_CALLS_MARKER.encode()
        self._in_calls = marker in self._tail
        if self._in_calls:
            self._calls = self._tail[self._tail.index(marker) + len(marker) :]

    def forced_finish_reason(self) -> str | None:
        """ "tool_calls" once the call array is closed; "stop" once a JSON answer is complete;
        "error" once the grammar engine has failed."""
        if self._matcher.is_error():
            self._report_error()
            return "error"
        if not self._matcher.is_stopped():
            return None
        if not self._in_calls:
            return "stop"
        if self._arguments_check is not None:
            self._arguments_check.check(self._calls.decode("utf-8", errors="replace"))
            self._arguments_check = None  # once per answer
        return "tool_calls"


def make_constraints(
    spec: StructuredRequest,
    tokenizer: Tokenizer,
    n: int,
    *,
    seed: int | None = None,
    prompt: Sequence[int] = (),
) -> list[GrammarConstraint] | None:
    """One constraint per choice for `BatchGenerator.add(..., constraints=...)`.

    Args:
        spec: The validated request (`mlx_mistral.tools.validation.parse_structured_request`).
        tokenizer: The model's tokenizer.
        n: Number of choices.
        seed: The request's seed. The call ids are forced tokens, so they are part of the
            output: with a seed they are derived from it and the prompt, and a seeded request
            is reproducible (the next turn's prompt differs, so its ids do too). Without, they
            are fresh random ids.
        prompt: The prompt token ids (only read with a seed).

    Returns:
        `n` fresh constraints (each with its own call ids), or None when nothing is constrained.

    Raises:
        InvalidRequestError: a schema the engine cannot serve (`schema_serving_error`), naming
            its field.

    Example:
        >>> from mlx_mistral.tools.validation import parse_structured_request
        >>> from mlx_mistral import demo_model_path
        >>> from mlx_mistral.tokenizer import Tokenizer
        >>> tokenizer = Tokenizer.from_file(demo_model_path() / "tokenizer.model")
        >>> spec = parse_structured_request(
        ...     tools=[{"type": "function", "function": {"name": "now"}}], tool_choice="required")
        >>> (constraint,) = make_constraints(spec, tokenizer, 1, seed=0)
        >>> constraint.call_ids[0].startswith("call_"), constraint.forced_finish_reason()
        (True, None)
    """
    _check_schemas_serve(spec, tokenizer)
    max_calls = MAX_PARALLEL_CALLS if spec.parallel_tool_calls else 1
    calls = bool(spec.tools) and spec.tool_choice != "none"
    arguments_check = ArgumentsCheck(spec.tools) if calls else None
    constraints = []
    for choice in range(n):
        rng = None
        if seed is not None:
            digest = hashlib.sha256(repr((seed, choice, list(prompt))).encode()).digest()
            rng = random.Random(digest)
        call_ids = [new_call_id(rng) for _ in range(max_calls)] if calls else []
        grammar = build_grammar(spec, call_ids)
        if grammar is None:
            return None
        constraints.append(
            GrammarConstraint(
                grammar, tokenizer, call_ids=call_ids, arguments_check=arguments_check
            )
        )
    return constraints


def _check_schemas_serve(spec: StructuredRequest, tokenizer: Tokenizer) -> None:
    schemas: list[tuple[str, Mapping[str, Any]]] = []
    if spec.response_format.type == "json_schema":
        schemas.append(("response_format.json_schema.schema", spec.response_format.schema or {}))
    if spec.tool_choice != "none":
        schemas += [
            (f"tools[{i}].function.parameters", arguments_schema(tool.enforced_parameters))
            for i, tool in enumerate(spec.tools)
            if tool.enforced_parameters is not None
        ]
    for param, schema in schemas:
        error = schema_serving_error(schema, tokenizer)
        if error is not None:
            raise InvalidRequestError(
                f"{param} is a schema constrained decoding cannot serve: {error}", param=param
            )
