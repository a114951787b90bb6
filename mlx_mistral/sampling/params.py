"""Sampling parameters of one request: declared once, normalised and validated at the boundary.

Each field of :class:`SamplingParams` is declared in the class body with its default, its range
(or its normaliser), its other names and a one-line meaning; :data:`FIELDS` reads those
declarations back as :class:`SamplingField` rows, in order. The validation below, the server's
request parsing and OpenAPI document, and the command line's flags are all built from
:data:`FIELDS`, so a field or a range is written in this module only.

Every field means what the hosted API (``api-contract.txt``) and OpenAI's clients expect; ranges
are the contract's. A bad value raises :class:`~mlx_mistral.errors.InvalidRequestError` with the
field as ``param`` and a message naming the field, the value and the allowed range, e.g.
``"top_p must be in (0, 1], got 1.5."``. Nothing is validated again in the sampler's hot path.

Example:
    >>> top_p = next(f for f in FIELDS if f.name == "top_p")
    >>> top_p.default, str(top_p.bounds), top_p.kind
    (1.0, '(0, 1]', 'number')
    >>> [(alias, f.name) for f in FIELDS for alias in f.aliases]
    [('max_completion_tokens', 'max_tokens'), ('repeat_penalty', 'repetition_penalty')]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mlx_mistral.errors import InvalidRequestError

MAX_STOP = 64
"""Our limit on the number of stop strings: OpenAI allows 4, but editors' autocomplete
(Continue) sends a dozen or more; matching costs grow with the count times the length."""
MAX_STOP_CHARS = 4096
"""Our limit on a stop string's length (matching costs grow with it)."""

MAX_N = 16
"""Most choices one request may ask for: each is a sequence in the batch."""

MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MIN_SEED = -(2**63)
"""Negative seeds mean "a fresh random seed", as llama.cpp's -1 (see `_negative_seed_is_random`)."""


@dataclass(frozen=True)
class Range:
    """A closed interval of numbers, or of integers when ``integer``; either end may be open."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        def fmt(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"{left}{fmt(self.lo)}, {fmt(self.hi)}{right}"

    def check(self, name: str, value: Any, *, param: str | None = None) -> int | float:
        """Return ``value`` (as float, or int when ``integer``) if it lies in the range, else raise.

        ``name`` is what the message calls the value; ``param`` the field reported (default: name).
        """
        param = param or name
        kind = "an integer" if self.integer else "a number"
        # bool is an int subclass: True must not pass as 1 (a JSON `true` is a client bug).
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise InvalidRequestError(
                f"{name} must be {kind} in {self}, got {value!r}.", param=param
            )
        if not self.integer and not math.isfinite(value):
            raise InvalidRequestError(
                f"{name} must be a finite number in {self}, got {value}.", param=param
            )
        below = value <= self.lo if self.lo_open else value < self.lo
        above = value >= self.hi if self.hi_open else value > self.hi
        if below or above:
            raise InvalidRequestError(f"{name} must be in {self}, got {value}.", param=param)
        return int(value) if self.integer else float(value)


LOGIT_BIAS = Range(-100, 100)
"""The range of one logit_bias value."""


# -- normalisers: fields whose values are not a number in a range ----------------------------
def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean, got {value!r}.", param=name)
    return value


def _negative_seed_is_random(name: str, seed: int | None) -> int | None:
    """llama.cpp and LM Studio send `seed: -1` for "random": any negative seed draws a fresh one,
    as no seed does (the answer is not reproducible; a non-negative seed makes it so)."""
    return None if seed is None or seed < 0 else seed


def _normalise_stop(name: str, stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(
            f"{name} must be a string or a list of at most {MAX_STOP} strings, got {stop!r}.",
            param=name,
        )
    if len(stop) > MAX_STOP:
        raise InvalidRequestError(
            f"{name} must hold at most {MAX_STOP} strings, got {len(stop)}.", param=name
        )
    if any(s == "" for s in stop):
        raise InvalidRequestError(f"{name} strings must not be empty, got ''.", param=name)
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:  # matching work per token grows with it
        raise InvalidRequestError(
            f"{name} strings must be at most {MAX_STOP_CHARS} characters long, got one of "
            f"{longest}.",
            param=name,
        )
    return tuple(stop)


_DECIMAL_ID = re.compile(r"\s*[0-9]{1,19}\s*")  # ASCII digits; longer is no token id anyway


def _token_id(name: str, key: Any) -> int:
    """A logit_bias key: an int or a decimal string (JSON object keys are always strings)."""
    if isinstance(key, int) and not isinstance(key, bool):
        tid = key
    elif isinstance(key, str) and _DECIMAL_ID.fullmatch(key):  # not isdigit(): "²" is a digit
        tid = int(key)
    else:
        raise InvalidRequestError(
            f"{name} keys must be token ids (non-negative integers), got {key!r}.", param=name
        )
    if tid < 0:
        raise InvalidRequestError(
            f"{name} keys must be non-negative token ids, got {tid}.", param=name
        )
    return tid


def _normalise_logit_bias(name: str, bias: Any) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in bias
    ):
        items = [tuple(p) for p in bias]
    else:
        raise InvalidRequestError(
            f"{name} must be a map from token id to a number in {LOGIT_BIAS}, got {bias!r}.",
            param=name,
        )
    out: dict[int, float] = {}
    for key, value in items:
        tid = _token_id(name, key)
        if tid in out:
            raise InvalidRequestError(f"{name} names token {tid} more than once.", param=name)
        out[tid] = LOGIT_BIAS.check(f"{name}[{key!r}]", value, param=name)
    return tuple(sorted(out.items()))


# -- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingField:
    """One field of :class:`SamplingParams` as declared: what validation, the API schema and the
    command line need to know about it.

    Attributes:
        name: the attribute, and the field's name in the API.
        default: the value when the field is not given (None: "no limit" or "a fresh seed").
        doc: one line: what the field does.
        bounds: the allowed numbers, for a numeric field.
        normalise: ``(name, value) -> value`` for any other field (raises on a bad value); for
            a numeric field, applied after the range check (to map a value to its meaning).
        aliases: other names the API accepts for it.
        needs: a boolean field that must be true when this one is not its default.
        cli: whether ``mlx-mistral generate`` and ``chat`` take it as a flag.
    """

    name: str
    default: Any
    doc: str
    bounds: Range | None = None
    normalise: Callable[[str, Any], Any] | None = None
    aliases: tuple[str, ...] = ()
    needs: str | None = None
    cli: bool = False

    @property
    def kind(self) -> str:
        """ "integer", "number", "boolean", or "other" (a value of its own shape)."""
        if self.bounds is not None:
            return "integer" if self.bounds.integer else "number"
        return "boolean" if isinstance(self.default, bool) else "other"

    def validate(self, value: Any) -> Any:
        """The value normalised (numbers as int or float, sequences as tuples), else raise."""
        if self.bounds is None:
            assert self.normalise is not None, f"{self.name} is declared with no check"
            return self.normalise(self.name, value)
        if value is None and self.default is None:  # None is this field's "no limit"
            return None
        value = self.bounds.check(self.name, value)
        return value if self.normalise is None else self.normalise(self.name, value)


def _declare(
    default: Any,
    doc: str,
    *,
    bounds: Range | None = None,
    normalise: Callable[[str, Any], Any] | None = None,
    aliases: tuple[str, ...] = (),
    needs: str | None = None,
    cli: bool = False,
) -> Any:
    """A field of :class:`SamplingParams`, its declaration kept for :data:`FIELDS`."""
    declaration = dict(
        doc=doc, bounds=bounds, normalise=normalise, aliases=aliases, needs=needs, cli=cli
    )
    return dataclasses.field(default=default, metadata={"declaration": declaration})


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens (see :mod:`mlx_mistral.sampling.sampler` for the
    order). Each field below is declared with its range and what it does.

    Raises:
        InvalidRequestError: on any bad value; ``param`` is the field name.

    Example:
        >>> SamplingParams(temperature=0.7, stop="\\n", logit_bias={"2": -100}).logit_bias
        ((2, -100.0),)
    """

    temperature: float = _declare(
        1.0,
        "Logits are divided by it; 0 means exact argmax (greedy).",
        bounds=Range(0, 2),
        cli=True,
    )
    top_p: float = _declare(
        1.0,
        "Keep the smallest set of most likely tokens whose mass reaches top_p.",
        bounds=Range(0, 1, lo_open=True),
        cli=True,
    )
    min_p: float = _declare(
        0.0,
        "Drop tokens whose probability is below min_p times the top token's.",
        bounds=Range(0, 1),
        cli=True,
    )
    top_k: int = _declare(
        0,
        "Keep the k most likely tokens; 0 turns the filter off.",
        bounds=Range(0, 999, integer=True),
        cli=True,
    )
    max_tokens: int | None = _declare(
        None,
        "Most tokens to generate; the prompt plus max_tokens must fit the context window "
        "(none: up to its end).",
        bounds=Range(0, 1_000_000, integer=True),
        aliases=("max_completion_tokens",),
        cli=True,
    )
    presence_penalty: float = _declare(
        0.0,
        "Subtracted once from the logit of every token generated so far (OpenAI).",
        bounds=Range(-2, 2),
    )
    frequency_penalty: float = _declare(
        0.0,
        "Subtracted from a token's logit once per time it was generated (OpenAI).",
        bounds=Range(-2, 2),
    )
    repetition_penalty: float = _declare(
        1.0,
        "HF/CTRL: the logit of a token seen in the prompt or the output is divided by it if "
        "positive, multiplied by it otherwise.",
        bounds=Range(0.01, 5),
        aliases=("repeat_penalty",),
        cli=True,
    )
    seed: int | None = _declare(
        None,
        "Same seed, same logits: same tokens, whatever else shares the batch (none or a "
        "negative seed, as llama.cpp's -1: a fresh random seed).",
        bounds=Range(MIN_SEED, MAX_SEED, integer=True),
        normalise=_negative_seed_is_random,
        cli=True,
    )
    stop: tuple[str, ...] = _declare(
        (),
        f"Up to {MAX_STOP} non-empty strings (or one string) that end the text when generated; "
        "never returned.",
        normalise=_normalise_stop,
    )
    logit_bias: tuple[tuple[int, float], ...] = _declare(
        (),
        f"Token id (an int, or a decimal string as JSON keys are) -> a bias in {LOGIT_BIAS} "
        "added to its logit.",
        normalise=_normalise_logit_bias,
    )
    logprobs: bool = _declare(
        False, "Return the log-probability of each chosen token.", normalise=_boolean
    )
    top_logprobs: int = _declare(
        0,
        "Most likely alternatives returned per position.",
        bounds=Range(0, MAX_TOP_LOGPROBS, integer=True),
        needs="logprobs",
    )
    n: int = _declare(
        1,
        "Choices for the request, each its own sequence and RNG stream.",
        bounds=Range(1, MAX_N, integer=True),
    )

    def __post_init__(self) -> None:
        for spec in FIELDS:  # in declaration order: the first bad field is the one reported
            value = spec.validate(getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
            if spec.needs and value != spec.default and not getattr(self, spec.needs):
                raise InvalidRequestError(
                    f"{spec.name} needs {spec.needs} set to true, got {spec.name}={value} "
                    f"with {spec.needs}=false.",
                    param=spec.name,
                )

    @property
    def greedy(self) -> bool:
        """True when tokens are the exact argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when any penalty changes the logits (the sampler then keeps token counts)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check what depends on the model: every logit_bias id must be below ``vocab_size``.

        Raises:
            InvalidRequestError: a logit_bias id is out of the vocabulary (param "logit_bias").
        """
        for tid, _ in self.logit_bias:
            if tid >= vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token ids must be in [0, {vocab_size - 1}], got {tid}.",
                    param="logit_bias",
                )


FIELDS: tuple[SamplingField, ...] = tuple(
    SamplingField(f.name, f.default, **f.metadata["declaration"])
    for f in dataclasses.fields(SamplingParams)
)
"""Every field of :class:`SamplingParams`, in declaration (and validation) order."""
