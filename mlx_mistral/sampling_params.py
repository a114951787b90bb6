"""Sampling parameters of one request: normalised and validated once, at the boundary.

Every field means what the hosted API (``api-contract.txt``) and OpenAI's clients expect; ranges
are the contract's. A bad value raises :class:`~mlx_mistral.errors.InvalidRequestError` with the
field as ``param`` and a message naming the field, the value and the allowed range, e.g.
``"top_p must be in (0, 1], got 1.5."``. Nothing is validated again in the sampler's hot path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlx_mistral.errors import InvalidRequestError

MAX_STOP = 4
"""OpenAI's limit on the number of stop strings."""
MAX_STOP_CHARS = 4096
"""Our limit on a stop string's length (matching costs grow with it)."""

MAX_N = 16
"""Most choices one request may ask for: each is a sequence in the batch."""

MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1


def _range_text(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    return f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


def _check_number(
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
    param: str | None = None,
) -> Any:
    """Return ``value`` (as float, or int when ``integer``) if it lies in the range, else raise.

    ``name`` is what the message calls the value; ``param`` the field reported (default: name).
    """
    param = param or name
    rng = _range_text(lo, hi, lo_open, hi_open)
    kind = "an integer" if integer else "a number"
    # bool is an int subclass: True must not pass as 1 (a JSON `true` is a client bug).
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise InvalidRequestError(f"{name} must be {kind} in {rng}, got {value!r}.", param=param)
    if not integer and not math.isfinite(value):
        raise InvalidRequestError(
            f"{name} must be a finite number in {rng}, got {value}.", param=param
        )
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        raise InvalidRequestError(f"{name} must be in {rng}, got {value}.", param=param)
    return int(value) if integer else float(value)


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(
            f"stop must be a string or a list of at most {MAX_STOP} strings, got {stop!r}.",
            param="stop",
        )
    if len(stop) > MAX_STOP:
        raise InvalidRequestError(
            f"stop must hold at most {MAX_STOP} strings, got {len(stop)}.", param="stop"
        )
    if any(s == "" for s in stop):
        raise InvalidRequestError("stop strings must not be empty, got ''.", param="stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:  # matching work per token grows with it
        raise InvalidRequestError(
            f"stop strings must be at most {MAX_STOP_CHARS} characters long, got one of {longest}.",
            param="stop",
        )
    return tuple(stop)


_DECIMAL_ID = re.compile(r"\s*[0-9]{1,19}\s*")  # ASCII digits; longer is no token id anyway


def _token_id(key: Any) -> int:
    """A logit_bias key: an int or a decimal string (JSON object keys are always strings)."""
    if isinstance(key, int) and not isinstance(key, bool):
        tid = key
    elif isinstance(key, str) and _DECIMAL_ID.fullmatch(key):  # not isdigit(): "²" is a digit
        tid = int(key)
    else:
        raise InvalidRequestError(
            f"logit_bias keys must be token ids (non-negative integers), got {key!r}.",
            param="logit_bias",
        )
    if tid < 0:
        raise InvalidRequestError(
            f"logit_bias keys must be non-negative token ids, got {tid}.", param="logit_bias"
        )
    return tid


def _normalise_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
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
            f"logit_bias must be a map from token id to a number in [-100, 100], got {bias!r}.",
            param="logit_bias",
        )
    out: dict[int, float] = {}
    for key, value in items:
        tid = _token_id(key)
        if tid in out:
            raise InvalidRequestError(
                f"logit_bias names token {tid} more than once.", param="logit_bias"
            )
        out[tid] = _check_number(f"logit_bias[{key!r}]", value, -100, 100, param="logit_bias")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens (see :mod:`mlx_mistral.sampling` for the order).

    Attributes:
        temperature: 0..2. Logits are divided by it; 0 means exact argmax (greedy).
        top_p: (0, 1]. Keep the smallest set of most likely tokens whose mass reaches top_p.
        min_p: [0, 1]. Drop tokens whose probability is below min_p times the top token's.
        top_k: 0..999. Keep the k most likely tokens; 0 turns the filter off.
        max_tokens: 0..1_000_000, or None for "up to the context window".
        presence_penalty: -2..2. Subtracted once from every token generated so far (OpenAI).
        frequency_penalty: -2..2. Subtracted per occurrence of every generated token (OpenAI).
        repetition_penalty: 0.01..5. HF/CTRL: a seen token's logit is divided by it if positive,
            multiplied by it otherwise; "seen" covers the prompt and the generated tokens.
        seed: 0..2**63-1, or None for a fresh random seed. Same seed, same logits: same tokens,
            whatever else shares the batch.
        stop: up to 4 non-empty strings (a single string is accepted); matched on text by the
            detokenizer, never emitted.
        logit_bias: ``{token id: -100..100}`` added to the logits; stored as a sorted tuple.
        logprobs: return the chosen token's log-probability.
        top_logprobs: 0..20 most likely alternatives per position; needs ``logprobs``.
        n: 1..16 choices for the request, each its own sequence and RNG stream.

    Raises:
        InvalidRequestError: on any bad value; ``param`` is the field name.

    Example:
        >>> SamplingParams(temperature=0.7, stop="\\n", logit_bias={"2": -100}).logit_bias
        ((2, -100.0),)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    max_tokens: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("temperature", _check_number("temperature", self.temperature, 0, 2))
        put("top_p", _check_number("top_p", self.top_p, 0, 1, lo_open=True))
        put("min_p", _check_number("min_p", self.min_p, 0, 1))
        put("top_k", _check_number("top_k", self.top_k, 0, 999, integer=True))
        if self.max_tokens is not None:
            put(
                "max_tokens",
                _check_number("max_tokens", self.max_tokens, 0, 1_000_000, integer=True),
            )
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _check_number(name, getattr(self, name), -2, 2))
        put(
            "repetition_penalty",
            _check_number("repetition_penalty", self.repetition_penalty, 0.01, 5),
        )
        if self.seed is not None:
            put("seed", _check_number("seed", self.seed, 0, MAX_SEED, integer=True))
        put("stop", _normalise_stop(self.stop))
        put("logit_bias", _normalise_logit_bias(self.logit_bias))
        if not isinstance(self.logprobs, bool):
            raise InvalidRequestError(
                f"logprobs must be a boolean, got {self.logprobs!r}.", param="logprobs"
            )
        put(
            "top_logprobs",
            _check_number("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, integer=True),
        )
        if self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequestError(
                f"top_logprobs needs logprobs set to true, got top_logprobs={self.top_logprobs} "
                "with logprobs=false.",
                param="top_logprobs",
            )
        put("n", _check_number("n", self.n, 1, MAX_N, integer=True))

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
