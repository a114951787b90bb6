"""StopMatcher: stop strings never leak, whatever the cut of the stream."""

from __future__ import annotations

import random

import pytest

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.stopping import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def expected(stops: list[str], text: str) -> tuple[str, bool]:
    """Whole-text oracle: cut before the stop string that is completed first."""
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not ends:
        return text, False
    return text[: min(ends)[1]], True


def test_stop_spanning_many_feeds():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Hello <") == ("Hello ", False)
    assert matcher.feed("|") == ("", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d|") == ("", False)
    assert matcher.feed(">trailing") == ("", True)
    assert matcher.stopped and matcher.matched == "<|end|>"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_false_start_is_released():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("a <|en") == ("a ", False)
    assert matcher.feed("try") == ("<|entry", False)
    assert matcher.flush() == ""


def test_overlapping_prefixes():
    # "aab" inside "aaab": the held "aa" must slide by one, not be dropped or released early.
    matcher = StopMatcher(["aab"])
    assert matcher.feed("x") == ("x", False)
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("a") == ("a", False)
    assert matcher.feed("b") == ("", True)
    assert run(["abab"], list("ababab")) == ("", True)
    assert run(["abac"], list("ababac")) == ("ab", True)


def test_multiple_stops_first_completed_wins():
    assert run(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run(["END", "STOP"], ["a STOP b END"]) == ("a ", True)
    # Same answer however the text is cut: "b" completes before "abc" could.
    assert run(["abc", "b"], ["abc"]) == ("a", True)
    assert run(["abc", "b"], ["a", "b", "c"]) == ("a", True)
    # A tie on the end goes to the longer stop.
    assert run(["xbc", "c"], ["axbc"]) == ("a", True)


def test_no_stops_holds_nothing_back():
    matcher = StopMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == ""


def test_unicode():
    assert run(["。\n"], ["日本語", "。", "\n続き"]) == ("日本語", True)
    assert run(["🛑"], ["go 🚦", "🛑 no"]) == ("go 🚦", True)
    assert run(["é"], ["cafe\u0301"]) == ("cafe\u0301", False)  # decomposed é is not "é"


def test_holdback_is_bounded_and_minimal():
    stops = ["\nUser:", "###"]
    matcher = StopMatcher(stops)
    fed = emitted = 0
    rng = random.Random(2)
    for _ in range(500):
        piece = rng.choice(["\n", "U", "User", ":", "#", "##", "hello ", " "])
        text, hit = matcher.feed(piece)
        fed += len(piece)
        emitted += len(text)
        if hit:
            break
        assert fed - emitted <= max(map(len, stops)) - 1
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("no prefix here") == ("no prefix here", False)


def test_random_streams_match_whole_text_oracle():
    rng = random.Random(0)
    alphabet = "ab c\né😀"
    for _ in range(3000):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(0, 3))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert run(stops, pieces) == expected(stops, text), (stops, pieces)
        assert run(stops, list(text)) == expected(stops, text)


@pytest.mark.parametrize("stops", [[""], ["ok", 3]])
def test_invalid_stops(stops):
    with pytest.raises(InvalidRequestError) as info:
        StopMatcher(stops)
    assert info.value.param == "stop"


def test_single_string_is_one_stop():
    assert StopMatcher("ab").stops == ("ab",)


def test_long_stops_are_cheap_and_overlong_ones_refused():
    """A stop as long as allowed holds back at most its length - 1 characters, with no table
    of its prefixes (building one was quadratic: 432 MiB for 30,000 characters)."""
    import time

    from mlx_mistral.sampling.params import MAX_STOP_CHARS, SamplingParams

    stop = "ab" * (MAX_STOP_CHARS // 2)
    start = time.perf_counter()
    matcher = StopMatcher([stop])
    out = [matcher.feed("a") for _ in range(3)] + [matcher.feed("b" + stop[:100])]
    assert time.perf_counter() - start < 1.0
    assert [t for t, _ in out] == ["", "a", "a", ""]  # "a", then "ab" + ..., held as a prefix
    assert matcher.feed("x") == ("ab" + stop[:100] + "x", False)
    SamplingParams(stop=[stop])
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=["x", "y" * (MAX_STOP_CHARS + 1)])
    assert info.value.param == "stop" and str(MAX_STOP_CHARS) in info.value.message
