"""Every sampling field of every dialect reaches `SamplingParams` as the parameter it means.

Each field is set alone, to a value no other field shares, on a minimal valid body; the parsed
request's `SamplingParams` must differ from the bare body's in exactly the expected parameters
(a field wired to the wrong parameter, as `repeat_penalty` to `presence_penalty`, shows up as
the wrong name). Each dialect's table must cover the sampling fields it declares. One request
through a real server then checks that a mapped field changes the output as its parameter does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import mlx_mistral
from mlx_mistral.sampling.params import FIELDS, SamplingParams
from mlx_mistral.server.anthropic_protocol import MessagesRequest
from mlx_mistral.server.ollama_protocol import SAMPLING_OPTIONS, OllamaRequest
from mlx_mistral.server.responses_protocol import ResponsesRequest
from mlx_mistral.server.schemas import (
    CHAT_SAMPLING,
    COMPLETION_SAMPLING,
    ChatCompletionRequest,
    CompletionRequest,
)
from tests.server_process import ServerProcess

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
LOGPROBS_INCLUDE = ["message.output_text.logprobs"]

# A value for each parameter that no default and no other field's value equals.
DISTINCT = {
    "temperature": 0.37,
    "top_p": 0.61,
    "min_p": 0.07,
    "top_k": 13,
    "max_tokens": 29,
    "presence_penalty": 0.43,
    "frequency_penalty": 0.29,
    "repetition_penalty": 1.31,
    "seed": 4242,
    "stop": ("zq",),
    "logit_bias": ((17, 3.5),),
    "top_logprobs": 4,
    "n": 3,
}


def by_own_name(field_name: str, parameter: str) -> tuple[dict, dict, dict]:
    """The case of a field that carries a parameter's value unchanged: (body fields, fields
    the bare body needs for it, the parameters expected to change)."""
    value = DISTINCT[parameter]
    wire = (
        list(value)
        if parameter == "stop"
        else {str(k): v for k, v in value}
        if parameter == "logit_bias"
        else value
    )
    needs = {"logprobs": True} if parameter == "top_logprobs" else {}
    return {field_name: wire}, needs, {parameter: value}


def openai_cases(sampling_fields) -> dict[str, tuple[dict, dict, dict]]:
    cases = {}
    for spec in sampling_fields:
        for name in (spec.name, *spec.aliases):
            if spec.name == "logprobs":
                cases[name] = ({name: True}, {}, {"logprobs": True})
            else:
                cases[name] = by_own_name(name, spec.name)
    return cases


CHAT_CASES = openai_cases(CHAT_SAMPLING)
COMPLETION_CASES = {
    **openai_cases(COMPLETION_SAMPLING),
    # /v1/completions asks for logprobs as a count of alternatives.
    "logprobs": ({"logprobs": 4}, {}, {"logprobs": True, "top_logprobs": 4}),
}
RESPONSES_CASES = {
    "temperature": by_own_name("temperature", "temperature"),
    "top_p": by_own_name("top_p", "top_p"),
    "max_output_tokens": by_own_name("max_output_tokens", "max_tokens"),
    "include": ({"include": LOGPROBS_INCLUDE}, {}, {"logprobs": True}),
    "top_logprobs": (
        {"top_logprobs": 4},
        {"include": LOGPROBS_INCLUDE},
        {"top_logprobs": 4},
    ),
}
ANTHROPIC_CASES = {
    "max_tokens": by_own_name("max_tokens", "max_tokens"),
    "stop_sequences": by_own_name("stop_sequences", "stop"),
    "temperature": by_own_name("temperature", "temperature"),
    "top_p": by_own_name("top_p", "top_p"),
    "top_k": by_own_name("top_k", "top_k"),
}
OLLAMA_CASES = {
    "temperature": by_own_name("temperature", "temperature"),
    "top_p": by_own_name("top_p", "top_p"),
    "top_k": by_own_name("top_k", "top_k"),
    "min_p": by_own_name("min_p", "min_p"),
    "seed": by_own_name("seed", "seed"),
    "stop": by_own_name("stop", "stop"),
    "repeat_penalty": by_own_name("repeat_penalty", "repetition_penalty"),
    "presence_penalty": by_own_name("presence_penalty", "presence_penalty"),
    "frequency_penalty": by_own_name("frequency_penalty", "frequency_penalty"),
    "num_predict": by_own_name("num_predict", "max_tokens"),
}


def ollama(build: Callable[[dict], OllamaRequest], body: dict) -> Callable[[dict], SamplingParams]:
    """Ollama takes its sampling fields in `options`."""
    return lambda fields: build({**body, "options": fields}).params


# dialect -> (the SamplingParams of a minimal body plus `fields`, that dialect's cases)
DIALECTS: dict[str, tuple[Callable[[dict], SamplingParams], dict]] = {
    "chat": (
        lambda f: ChatCompletionRequest.from_json({"messages": MESSAGES, **f}).params,
        CHAT_CASES,
    ),
    "completions": (
        lambda f: CompletionRequest.from_json({"prompt": "Once upon", **f}).params,
        COMPLETION_CASES,
    ),
    "responses": (
        lambda f: ResponsesRequest.from_json({"input": "Hello!", **f}).chat.params,
        RESPONSES_CASES,
    ),
    "anthropic": (
        lambda f: MessagesRequest.from_json({"messages": MESSAGES, "max_tokens": 64, **f}).params,
        ANTHROPIC_CASES,
    ),
    "ollama-chat": (ollama(OllamaRequest.chat, {"model": "m", "messages": MESSAGES}), OLLAMA_CASES),
    "ollama-generate": (
        ollama(OllamaRequest.generate, {"model": "m", "prompt": "Hello!"}),
        OLLAMA_CASES,
    ),
}


def changed(before: SamplingParams, after: SamplingParams) -> dict[str, Any]:
    return {
        f.name: getattr(after, f.name)
        for f in dataclasses.fields(SamplingParams)
        if getattr(after, f.name) != getattr(before, f.name)
    }


@pytest.mark.parametrize(
    ("dialect", "field_name"),
    [(dialect, name) for dialect, (_, cases) in DIALECTS.items() for name in cases],
)
def test_a_sampling_field_sets_exactly_its_parameter(dialect, field_name):
    parse, cases = DIALECTS[dialect]
    fields, needs, expected = cases[field_name]
    assert changed(parse(needs), parse({**needs, **fields})) == expected


def test_every_declared_sampling_field_has_a_case():
    """A sampling field added to a dialect's declaration must be added here too."""

    def names(sampling_fields) -> set[str]:
        return {name for f in sampling_fields for name in (f.name, *f.aliases)}

    assert set(CHAT_CASES) == names(CHAT_SAMPLING) == names(FIELDS)
    assert set(COMPLETION_CASES) == names(COMPLETION_SAMPLING) | {"logprobs"}
    assert set(OLLAMA_CASES) == set(SAMPLING_OPTIONS) | {"num_predict"}
    # Every parameter a dialect can set has a distinct value to recognise it by.
    for _, cases in DIALECTS.values():
        for _, _, expected in cases.values():
            assert set(expected) <= set(DISTINCT) | {"logprobs"}


def test_distinct_values_differ_from_every_default():
    defaults = SamplingParams()
    assert all(getattr(defaults, name) != value for name, value in DISTINCT.items())
    ollama_defaults = OllamaRequest.chat({"model": "m"}).params
    assert all(getattr(ollama_defaults, name) != value for name, value in DISTINCT.items())


# -- end to end ------------------------------------------------------------------------------
def test_ollama_repeat_penalty_shapes_the_output_as_repetition_penalty(
    tiny_hf_checkpoint, tiny_model
):
    """Through a real server: the text equals the library's with repetition_penalty, which
    differs from what the same value as presence_penalty (or no penalty) gives."""
    model, tokenizer = tiny_model

    def library(**penalty: float) -> str:
        params = SamplingParams(temperature=0, max_tokens=8, **penalty)
        return mlx_mistral.generate(model, tokenizer, MESSAGES, params=params)

    expected = library(repetition_penalty=0.5)
    assert expected != library() and expected != library(presence_penalty=0.5)
    body = {
        "model": "m",
        "messages": MESSAGES,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 8, "repeat_penalty": 0.5},
    }
    with ServerProcess(tiny_hf_checkpoint) as server:
        answer = httpx.post(server.url("/api/chat"), json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["message"]["content"] == expected
        assert "Traceback" not in server.log()
