"""Grammar-constrained decoding on the tiny random model: calls and JSON are valid by construction.

Each guarantee is checked over 100 seeds run as one batch at temperature 1 (a random-weight model
samples nearly uniformly among the tokens the grammar allows, so it explores the grammar well).
Schemas bound their strings (maxLength, enum) so that random sampling ends within max_tokens.
"""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import numpy as np
import pytest

from mlx_mistral.batch import BatchGenerator
from mlx_mistral.chat import encode_chat_request, parse_chat, render_tool_calls
from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.generation import prompt_ids
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.tools.grammar import (
    GrammarConstraint,
    bitmask_to_mlx,
    build_grammar,
    make_constraints,
    make_llg_tokenizer,
)
from mlx_mistral.tools.parsing import ToolCallStreamer, split_tool_calls
from mlx_mistral.tools.validation import parse_structured_request
from tests.tool_samples import PERSON, SCHEMAS, TOOLS, assemble

SEEDS = 100


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return tiny_model


def run_batch(model_tok, spec, *, max_tokens, seeds=SEEDS, logit_bias=None):
    """One batch of `seeds` sequences: [{text, finish, constraint, streamer, deltas}]."""
    model, tok = model_tok
    prompt, spec = encode_chat_request(
        tok, [{"role": "user", "content": "What is the weather in Paris?"}], spec
    )
    gen = BatchGenerator(model, tok, max_batch=seeds)
    runs = {}
    for seed in range(seeds):
        constraints = make_constraints(spec, tok, 1, seed=seed, prompt=prompt)
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=max_tokens, logit_bias=logit_bias
        )
        uid = gen.add(prompt, params, constraints=constraints)
        streamer = ToolCallStreamer(call_ids=constraints[0].call_ids if spec.tools else None)
        runs[uid] = {
            "text": "",
            "finish": None,
            "constraint": constraints[0],
            "streamer": streamer,
            "deltas": [],
        }
    while gen.has_work:
        for event in gen.step():
            run = runs[event.uid]
            run["text"] += event.text
            run["deltas"].append(run["streamer"].feed(event.text))
            if event.finish_reason:
                run["finish"] = event.finish_reason
                run["deltas"].append(run["streamer"].finish())
    return list(runs.values())


def check_calls(run, allowed_names):
    text, constraint = run["text"], run["constraint"]
    assert run["finish"] == "tool_calls", text
    content, calls = split_tool_calls(text)
    assert calls and content == ""
    for i, call in enumerate(calls):
        assert call["function"]["name"] in allowed_names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
        assert call["id"] == constraint.call_ids[i]
    # The answer is exactly what chat.py renders for these calls: multi-turn prompts round-trip.
    assert render_tool_calls(calls) == text
    # Streaming the same tokens gives the same calls.
    assert assemble(run["deltas"]) == ("", calls)
    return calls


def test_required_choice_always_gives_a_valid_call(model_tok):
    spec = parse_structured_request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    runs = run_batch(model_tok, spec, max_tokens=120)
    names = Counter(check_calls(run, set(SCHEMAS))[0]["function"]["name"] for run in runs)
    assert len(names) == 3  # the model picks among all the tools


def test_named_choice_always_calls_that_function(model_tok):
    spec = parse_structured_request(
        tools=TOOLS,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    for run in run_batch(model_tok, spec, max_tokens=60):
        assert len(check_calls(run, {"get_time"})) == 1


def test_parallel_calls_each_valid_with_their_own_ids(model_tok):
    spec = parse_structured_request(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    runs = run_batch(model_tok, spec, max_tokens=320, seeds=30)  # 8 calls of <= 36 tokens fit
    counts = Counter(len(check_calls(run, {"get_time"})) for run in runs)
    assert min(counts) == 1 and max(counts) > 2 and max(counts) <= 8  # at most MAX_PARALLEL_CALLS


def test_json_schema_answers_parse_and_validate(model_tok):
    spec = parse_structured_request(
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    )
    for run in run_batch(model_tok, spec, max_tokens=60):
        assert run["finish"] == "stop", run["text"]
        jsonschema.validate(json.loads(run["text"]), PERSON)


def test_json_object_answers_are_objects(model_tok):
    _, tok = model_tok
    # Random weights would never close a free-form key; a bias towards closing tokens ends them.
    closing = [
        i
        for i in range(tok.vocab_size)
        if tok.id_to_piece(i) in ('"', "}", '"}', '",', '"]', "]", "▁}")
    ]
    spec = parse_structured_request(response_format={"type": "json_object"})
    runs = run_batch(model_tok, spec, max_tokens=60, logit_bias={i: 9.0 for i in closing})
    objects = []
    for run in runs:
        assert run["finish"] == "stop", run["text"]
        objects.append(json.loads(run["text"]))
        assert isinstance(objects[-1], dict)
    assert sum(bool(o) for o in objects) >= 10  # not only "{}"


def test_auto_answers_text_or_a_valid_call(model_tok):
    spec = parse_structured_request(tools=TOOLS)  # tool_choice defaults to "auto"
    for run in run_batch(model_tok, spec, max_tokens=16):
        _, calls = split_tool_calls(run["text"])
        if calls is None:
            assert run["finish"] in ("stop", "length") and "[TOOL_CALLS]" not in run["text"]
            assert assemble(run["deltas"]) == (run["text"], None)
        else:
            check_calls(run, set(SCHEMAS))


def walk(constraint, tok, text):
    """Feed the tokens of `text` (as generated after [/INST]); each must be allowed."""
    for t in tok.encode(text):
        mask = np.array(constraint.allowed_mask())
        assert mask[t], f"{tok.id_to_piece(t)!r} refused in {text!r}"
        assert not mask[tok.eos_id] or constraint._matcher.is_accepting()
        assert not mask[tok.bos_id] and not mask[tok.unk_id]
        constraint.advance(t)


def test_auto_constrains_a_begun_call_after_text(model_tok):
    _, tok = model_tok
    spec = parse_structured_request(tools=TOOLS)
    (constraint,) = make_constraints(spec, tok, 1)
    call = {
        "id": constraint.call_ids[0],
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
    }
    text = "Let me check. " + render_tool_calls([call])
    walk(constraint, tok, text)
    assert constraint.forced_finish_reason() == "tool_calls"
    assert split_tool_calls(text) == ("Let me check.", [call])

    (constraint,) = make_constraints(spec, tok, 1)
    walk(constraint, tok, 'Hi [TOOL_CALLS] [{"name": "get_')
    mask = np.array(constraint.allowed_mask())
    allowed = {tok.id_to_piece(int(i)) for i in np.nonzero(mask)[0]}
    assert allowed and all(p in "weather" or p in "time" for p in allowed)  # only tool names
    assert not mask[tok.eos_id]


def test_none_choice_keeps_the_marker_out_of_the_text(model_tok):
    _, tok = model_tok
    spec = parse_structured_request(tools=TOOLS, tool_choice="none")
    assert spec.prompt_tools is None
    (constraint,) = make_constraints(spec, tok, 1)
    walk(constraint, tok, "Sure [TOOL_CALLS")
    mask = np.array(constraint.allowed_mask())
    assert not mask[tok.encode("\n]")[2]]  # "]" would complete the marker
    assert mask[tok.eos_id] and mask.sum() > 30000  # anything else goes


def test_calls_in_the_history_keep_the_marker_out_without_tools(model_tok):
    """No tools in the request, but the conversation holds a call and its result: the answer
    is text that cannot begin a call (the model might imitate the history)."""
    _, tok = model_tok
    call = {
        "id": "call_abcdefghi",
        "type": "function",
        "function": {"name": "get_time", "arguments": "{}"},
    }
    history = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abcdefghi", "content": "12:00"},
    ]
    plain = parse_structured_request()
    hi = [{"role": "user", "content": "Hi"}]
    assert not plain.for_history(parse_chat(hi).holds_tool_calls).constrained
    assert parse_chat(history).holds_tool_calls
    _, spec = encode_chat_request(tok, history, plain)
    assert spec.constrained and spec.prompt_tools is None
    # With tools in the request the grammar already knows the calls: the spec is unchanged.
    with_tools = parse_structured_request(tools=TOOLS, tool_choice="none")
    assert encode_chat_request(tok, history, with_tools)[1] is with_tools
    assert prompt_ids(tok, tuple(history), plain)[1].constrained  # any sequence of messages
    assert not prompt_ids(tok, "[TOOL_CALLS] raw text", plain)[1].constrained
    with pytest.raises(InvalidRequestError) as info:  # not messages: the chat encoder refuses it
        encode_chat_request(tok, 1, plain)
    assert info.value.param == "messages"
    (constraint,) = make_constraints(spec, tok, 1)
    walk(constraint, tok, "It is [TOOL_CALLS")
    assert not np.array(constraint.allowed_mask())[tok.encode("\n]")[2]]


def test_json_answer_allows_eos_exactly_when_complete(model_tok):
    _, tok = model_tok

    def constraint_for(schema):
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        return make_constraints(parse_structured_request(response_format=fmt), tok, 1)[0]

    constraint = constraint_for(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    )
    for t in tok.encode('{"a": 12'):
        assert not np.array(constraint.allowed_mask())[tok.eos_id]
        constraint.advance(t)
    assert not np.array(constraint.allowed_mask())[tok.eos_id]
    constraint.advance(tok.encode("\n}")[2])
    assert constraint.forced_finish_reason() == "stop"  # nothing but EOS could follow

    constraint = constraint_for({"type": "integer"})
    for t in tok.encode("12"):
        constraint.advance(t)
    assert np.array(constraint.allowed_mask())[tok.eos_id]  # "12" is complete ...
    assert constraint.forced_finish_reason() is None  # ... or may go on ("123")


def test_no_constraint_for_plain_text():
    assert make_constraints(parse_structured_request(), None, 2) is None


def test_each_choice_gets_its_own_call_ids(model_tok):
    _, tok = model_tok
    constraints = make_constraints(
        parse_structured_request(tools=TOOLS, tool_choice="required"), tok, 3
    )
    ids = [i for c in constraints for i in c.call_ids]
    assert len(ids) == 3 * 8 == len(set(ids))
    assert all(i.startswith("call_") and len(i) == 14 and i[5:].isalnum() for i in ids)
    assert (
        len(
            make_constraints(
                parse_structured_request(
                    tools=TOOLS, tool_choice="required", parallel_tool_calls=False
                ),
                tok,
                1,
            )[0].call_ids
        )
        == 1
    )


def test_seeded_call_ids_are_reproducible_per_prompt(model_tok):
    _, tok = model_tok
    spec = parse_structured_request(tools=TOOLS)

    def ids(seed, prompt):
        return [c.call_ids for c in make_constraints(spec, tok, 2, seed=seed, prompt=prompt)]

    assert ids(7, [1, 2, 3]) == ids(7, [1, 2, 3])
    assert ids(7, [1, 2, 3])[0] != ids(7, [1, 2, 3])[1]  # each choice its own
    assert ids(7, [1, 2, 3]) != ids(7, [1, 2, 4]) and ids(7, [1, 2, 3]) != ids(8, [1, 2, 3])
    assert ids(None, [1]) != ids(None, [1])


def test_bitmask_conversion_matches_the_engine(model_tok):
    _, tok = model_tok
    spec = parse_structured_request(tools=TOOLS, tool_choice="required")
    constraint = GrammarConstraint(build_grammar(spec, ["call_x"] * 8), tok)
    walk(constraint, tok, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "P')
    raw = constraint._matcher.compute_bitmask()
    words = np.frombuffer(raw, dtype=np.uint32)
    expected = [bool(words[i // 32] >> (i % 32) & 1) for i in range(tok.vocab_size)]
    mask = np.array(bitmask_to_mlx(raw, tok.vocab_size))
    assert mask.dtype == np.bool_ and mask.shape == (tok.vocab_size,)
    assert mask.tolist() == expected and 1000 < mask.sum() < tok.vocab_size
    assert make_llg_tokenizer(tok) is make_llg_tokenizer(tok)  # built once per tokenizer


@pytest.mark.parametrize(
    "schema",
    [{"$ref": "#"}, {"const": "\u0001"}],
    ids=["ref-self", "const-control-char"],
)
def test_schemas_no_answer_can_satisfy_are_refused(model_tok, schema):
    """These compiled, then answered "" or "{" with finish_reason "stop" (issue 19)."""
    _, tok = model_tok
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    spec = parse_structured_request(response_format=fmt)
    with pytest.raises(InvalidRequestError) as caught:
        make_constraints(spec, tok, 1)
    assert caught.value.param == "response_format.json_schema.schema"


def test_an_engine_error_mid_answer_ends_with_error_and_is_logged(model_tok, caplog):
    """A required self-reference passes the first step, then exceeds the parser's item limit
    after '{"': the answer must end with finish_reason "error", logged, not a silent "stop"."""
    schema = {
        "$defs": {
            "a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}
        },
        "$ref": "#/$defs/a",
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    spec = parse_structured_request(response_format=fmt)
    with caplog.at_level("ERROR", logger="mlx_mistral.grammar"):
        runs = run_batch(model_tok, spec, max_tokens=20, seeds=4)
    assert [run["finish"] for run in runs] == ["error"] * 4, [r["text"] for r in runs]
    assert all('{"x": {'.startswith(run["text"]) for run in runs), [r["text"] for r in runs]
    assert "grammar engine failed mid-answer" in caplog.text
