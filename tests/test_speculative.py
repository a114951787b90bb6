"""Speculative decoding: drafts from prompt lookup and Predicted Outputs, verified in the batch.

Exactness is the contract: greedy output is the same token for token with and without drafts,
and sampled output has the same distribution (checked with a chi-square test per parameter).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_mistral
from mlx_mistral import SamplingParams
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.cache import BatchKVCache
from mlx_mistral.drafts import PredictionDraft, PromptLookup
from mlx_mistral.forward_cost import flat_cost
from mlx_mistral.sampling.state import SamplerState
from mlx_mistral.speculative import SpeculationSchedule, choose_tokens
from mlx_mistral.tools.grammar import make_constraints
from mlx_mistral.tools.parsing import split_tool_calls
from mlx_mistral.tools.validation import parse_structured_request

GREEDY = SamplingParams(temperature=0, max_tokens=40)
REPEATS = "the cat sat on the mat. the cat sat on the mat. the dog sat on the log."


@pytest.fixture(scope="module")
def demo():
    return mlx_mistral.load(mlx_mistral.demo_model_path())


def chat(tokenizer, text):
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def run(generator: BatchGenerator) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while generator.has_work:
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
    return tokens


def plain(model, tokenizer, prompt, params=GREEDY, **add):
    """The output without any speculation."""
    generator = BatchGenerator(model, tokenizer, prompt_lookup=False)
    uid = generator.add(prompt, params, **add)
    return run(generator)[uid]


# A GPU-like forward cost, pinned so that whether drafts are verified does not turn on how busy
# the machine was when the tiny model's forward was timed.
width_is_free = flat_cost


def speculated(model, tokenizer, prompt, params=GREEDY, *, prompt_lookup=True, **add):
    generator = BatchGenerator(
        model, tokenizer, prompt_lookup=prompt_lookup, forward_cost=width_is_free
    )
    uid = generator.add(prompt, params, **add)
    events = []
    while generator.has_work:
        events += [e for e in generator.step() if e.uid == uid]
    return [e.token for e in events if e.token is not None], events[-1]


def edited(tokens, every, vocab=32000):
    """`tokens` with one token in `every` replaced (a prediction that is partly wrong)."""
    return [(t + 7) % vocab if i % every == every // 2 else t for i, t in enumerate(tokens)]


# -- drafts ------------------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    lookup = PromptLookup([5, 1, 2, 3, 4, 9, 1, 2, 7])
    for token in (8, 1, 2):
        lookup.observe(token)
    assert lookup.propose(3) == [7, 8, 1]  # the latest earlier "1 2" is followed by 7
    lookup.observe(7)
    assert lookup.propose(2) == [8, 1]  # following it: the cursor advances


def test_prediction_realigns_after_substitution_deletion_and_insertion():
    draft = PredictionDraft([10, 11, 12, 13, 14, 15, 16, 17, 18])
    draft.observe(10)
    assert draft.propose(2) == [11, 12]
    draft.observe(99)  # 11 was replaced by 99
    assert draft.propose(2) == [12, 13]
    draft.observe(12)
    draft.observe(15)  # 13 and 14 were left out
    assert draft.propose(2) == [16, 17]
    for token in (50, 51, 16):  # 50, 51 inserted; 16 found again after two misses
        draft.observe(token)
    assert draft.propose(2) == [17, 18]


def test_trim_rows_keeps_each_rows_tokens_at_their_positions():
    """Rows dropping different counts end up left-padded and aligned, their kept keys intact."""
    rng = np.random.default_rng(0)
    cache = BatchKVCache([0, 2])
    keys = mx.array(rng.standard_normal((2, 1, 6, 4)).astype(np.float32))
    cache.update_and_fetch(keys, keys + 1)
    cache.trim_rows([1, 3])
    assert cache.length == 5 and cache.left_padding == [0, 4]
    k, v = cache.state
    np.testing.assert_array_equal(np.array(k[0]), np.array(keys[0, :, :5]))
    np.testing.assert_array_equal(np.array(k[1, :, 4:]), np.array(keys[1, :, 2:3]))
    np.testing.assert_array_equal(np.array(v[1, :, 4:]), np.array(keys[1, :, 2:3]) + 1)
    assert cache.positions().tolist() == [5, 1]


# -- greedy identity ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_prompt_lookup_greedy_identity(which, tiny_model, demo):
    model, tokenizer = tiny_model if which == "tiny" else demo
    prompt = chat(tokenizer, f"Repeat this exactly: {REPEATS}")
    tokens, last = speculated(model, tokenizer, prompt)
    assert tokens == plain(model, tokenizer, prompt)


@pytest.mark.parametrize("which", ["tiny", "demo"])
@pytest.mark.parametrize("kind", ["perfect", "partly wrong", "entirely wrong"])
def test_prediction_greedy_identity(which, kind, tiny_model, demo):
    model, tokenizer = tiny_model if which == "tiny" else demo
    prompt = chat(tokenizer, "Tell me a story about a cat.")
    expected = plain(model, tokenizer, prompt)
    prediction = {
        "perfect": expected,
        "partly wrong": edited(expected, 6),
        "entirely wrong": [(t + 1) % 32000 for t in expected],
    }[kind]
    tokens, last = speculated(model, tokenizer, prompt, prompt_lookup=False, prediction=prediction)
    assert tokens == expected
    accepted, rejected = last.accepted_prediction_tokens, last.rejected_prediction_tokens
    if kind == "perfect":
        assert accepted >= len(expected) - 8 and rejected == 0
    elif kind == "partly wrong":
        assert accepted > len(expected) // 2 and rejected > 0
    else:
        assert accepted == 0 and rejected > 0


def test_a_model_on_which_verifying_never_pays_stops_looking(demo):
    """A forward of T tokens costing T one-token forwards (MLX's CPU quantized matmul): even a
    perfect prediction is never verified, the output is the plain one, and after the first
    decision the batch stops settling its pipeline to look for drafts."""
    model, tokenizer = demo
    prompt = chat(tokenizer, "Tell me a story about a cat.")
    expected = plain(model, tokenizer, prompt)
    generator = BatchGenerator(model, tokenizer, forward_cost=lambda tokens: float(tokens))
    uid = generator.add(prompt, GREEDY, prediction=expected)
    events = []
    while generator.has_work:
        events += [e for e in generator.step() if e.uid == uid]
    assert [e.token for e in events if e.token is not None] == expected
    assert events[-1].accepted_prediction_tokens == events[-1].rejected_prediction_tokens == 0
    assert generator.speculation.never_pays


def test_prediction_as_text_is_tokenized_and_used(demo):
    model, tokenizer = demo
    prompt = chat(tokenizer, "Hello!")
    expected = plain(model, tokenizer, prompt)
    text = tokenizer.decode(expected)
    tokens, last = speculated(model, tokenizer, prompt, prompt_lookup=False, prediction=text)
    assert tokens == expected
    assert last.accepted_prediction_tokens > 0


def test_penalties_bias_stop_and_max_tokens_cut_where_they_would(tiny_model):
    model, tokenizer = tiny_model
    prompt = chat(tokenizer, f"Say: {REPEATS}")
    shaped = SamplingParams(
        temperature=0,
        max_tokens=30,
        presence_penalty=0.5,
        repetition_penalty=1.3,
        logit_bias={7: 5.0},
    )
    expected = plain(model, tokenizer, prompt, shaped)
    tokens, _ = speculated(model, tokenizer, prompt, shaped, prediction=expected)
    assert tokens == expected
    # A stop string in the middle of a perfectly predicted output; max_tokens inside a draft.
    expected = plain(model, tokenizer, prompt)
    text = tokenizer.decode(expected[:20])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = SamplingParams(temperature=0, max_tokens=30, stop=stop)
    expected_stop = plain(model, tokenizer, prompt, stopped)
    assert len(expected_stop) < 20
    tokens, last = speculated(model, tokenizer, prompt, stopped, prediction=expected)
    assert tokens == expected_stop and last.finish_reason == "stop"
    short = SamplingParams(temperature=0, max_tokens=11)
    tokens, last = speculated(model, tokenizer, prompt, short, prediction=expected)
    assert tokens == expected[:11] and last.finish_reason == "length"


def test_speculating_rows_beside_plain_rows_joining_and_leaving(tiny_model):
    """Rows with perfect, edited and no predictions share steps with plain rows that join and
    leave; every row gives exactly what it gives alone without speculation."""
    model, tokenizer = tiny_model
    questions = ["Hello!", "2+2?", "Tell me a story.", f"Echo: {REPEATS}", "Convert 5 km"]
    ps = [chat(tokenizer, q) for q in questions]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (30, 5, 24, 30, 9)]
    expected = [plain(model, tokenizer, p, sp) for p, sp in zip(ps, params)]
    predictions = [expected[0], None, edited(expected[2], 5), None, None]
    generator = BatchGenerator(model, tokenizer, prefill_chunk=8, forward_cost=width_is_free)
    generator.prompt_lookup = False  # only rows 0 and 2 speculate; the others never draft
    tokens: dict[int, list[int]] = {}
    uids: dict[int, int] = {}
    joins = {0: [0, 1], 3: [2], 6: [3], 9: [4]}
    for step in range(200):
        for i in joins.get(step, []):
            if i == 3:
                generator.prompt_lookup = True  # row 3 drafts from its prompt
            uids[i] = generator.add(ps[i], params[i], prediction=predictions[i])
            generator.prompt_lookup = False
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
        if step > 9 and not generator.has_work:
            break
    for i, uid in uids.items():
        assert tokens[uid] == expected[i], i
    assert generator.cache is None


# -- constraints, cancellation, seeds ----------------------------------------------------------
def test_json_schema_and_tool_calls_hold_under_speculation(tiny_model):
    model, tokenizer = tiny_model
    schema = {
        "type": "object",
        # Enums: a random model's free strings could outrun max_tokens.
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": schema},
        }
    ]
    cases = [
        parse_structured_request(response_format=fmt),
        parse_structured_request(tools=tools, tool_choice="required", parallel_tool_calls=False),
    ]
    params = SamplingParams(temperature=0, max_tokens=60)
    for spec in cases:
        prompt = chat(tokenizer, 'Plan a trip: {"city": "Paris", "days": 3}')
        expected = plain(
            model,
            tokenizer,
            prompt,
            params,
            constraints=make_constraints(spec, tokenizer, 1, seed=1),
        )
        for prediction in (expected, edited(expected, 4)):
            tokens, last = speculated(
                model,
                tokenizer,
                prompt,
                params,
                prediction=prediction,
                constraints=make_constraints(spec, tokenizer, 1, seed=1),
            )
            assert tokens == expected
        text = tokenizer.decode(tokens)
        if spec.tools:
            assert last.finish_reason == "tool_calls"
            call = split_tool_calls(text)[1][0]["function"]
            assert call["name"] == "get_weather"
            assert set(json.loads(call["arguments"])) == {"city", "days"}
        else:
            assert set(json.loads(text)) == {"city", "days"}
    # Sampled under a grammar and a draft that is mostly wrong: still valid JSON.
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=60)
    spec = cases[0]
    tokens, last = speculated(
        model,
        tokenizer,
        chat(tokenizer, "Plan a trip"),
        sampled,
        prediction=tokenizer.encode('{"city": "Rome", "days": 12, "x": 1}'),
        constraints=make_constraints(spec, tokenizer, 1, seed=1),
    )
    assert last.finish_reason == "stop" and set(json.loads(tokenizer.decode(tokens))) == {
        "city",
        "days",
    }


def test_cancelled_speculating_request_frees_its_slot(tiny_model):
    model, tokenizer = tiny_model
    prompt = chat(tokenizer, "Hello!")
    long = SamplingParams(temperature=0, max_tokens=200)
    generator = BatchGenerator(model, tokenizer)
    keep = generator.add(chat(tokenizer, "2+2?"), long)
    drop = generator.add(prompt, long, prediction=list(range(100, 300)))
    for _ in range(3):
        generator.step()
    assert generator.num_sequences == 2
    before = generator.kv_bytes_in_use
    generator.cancel(drop)
    events = generator.step()
    assert any(e.uid == drop and e.finish_reason == "cancelled" for e in events)
    assert generator.num_sequences == 1 and generator.cache[0].batch_size == 1
    assert generator.kv_bytes_in_use < before
    # The survivor decodes on (its pipelined draw restarts: a step without an event at most).
    events += generator.step() + generator.step()
    assert keep in {e.uid for e in events if e.token is not None}


def test_seeded_speculating_request_is_reproducible_in_any_batch(tiny_model):
    model, tokenizer = tiny_model
    prompt = chat(tokenizer, f"Echo: {REPEATS}")
    seeded = SamplingParams(temperature=0.7, top_p=0.95, seed=42, max_tokens=30)
    draft = plain(model, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=30))
    first, _ = speculated(model, tokenizer, prompt, seeded, prediction=draft)
    again, _ = speculated(model, tokenizer, prompt, seeded, prediction=draft)
    generator = BatchGenerator(model, tokenizer)
    generator.add(chat(tokenizer, "Hello!"), SamplingParams(temperature=1.0, max_tokens=25))
    uid = generator.add(prompt, seeded, prediction=draft)
    generator.add(chat(tokenizer, "2+2?"), GREEDY, prediction=[1, 2, 3])
    assert first == again == run(generator)[uid]


def test_seeded_sampled_row_says_the_same_with_or_without_speculation(tiny_model):
    """Verification draws the sampler's own token with the sampler's own key, so a seeded row's
    text does not depend on whether (or how wide) the batch chose to verify its drafts."""
    model, tokenizer = tiny_model
    prompt = chat(tokenizer, f"Echo: {REPEATS}")
    for seeded in (
        SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=30),
        SamplingParams(temperature=1.0, presence_penalty=0.5, seed=9, max_tokens=30),
    ):
        without = plain(model, tokenizer, prompt, seeded)
        tokens, last = speculated(model, tokenizer, prompt, seeded, prediction=without)
        assert tokens == without
        assert last.accepted_prediction_tokens > 10  # the drafts were verified, and held


def cpu_like(tokens: int) -> float:
    """A float32 forward on a few CPU cores: 16 rows cost ~1.6x one row, then compute-bound."""
    return 1 + tokens / 24


def test_cost_model_verifies_only_what_pays():
    from mlx_mistral.speculative import SLOWDOWN, verification_width

    assert verification_width([0, 0, 0], [0.0] * 3, cpu_like) == 0
    assert verification_width([8], [0.05], cpu_like) == 0  # drafts that keep failing: plain
    assert verification_width([8], [0.95], cpu_like) == 8  # a good prediction alone: verify it all
    assert 0 < verification_width([8], [0.5], cpu_like) < 8  # unsure: a short, cheap check first
    # Rows without a draft never pay more than SLOWDOWN for their neighbours' drafts.
    for rows, drafting in ((8, 4), (16, 1), (4, 2), (2, 1)):
        lengths = [8] * drafting + [0] * (rows - drafting)
        width = verification_width(lengths, [0.99] * drafting + [0.0] * (rows - drafting), cpu_like)
        if width:
            step = cpu_like(rows * (width + 1))
            assert step <= cpu_like(rows) / (1 - SLOWDOWN)


def test_where_tokens_cost_in_proportion_nothing_is_verified():
    """A CPU quantized model (MLX's quantized matmul there is scalar code): T tokens cost T
    one-token forwards, so a verification can only lose, whatever the drafts."""
    from mlx_mistral.speculative import verification_width

    def linear(tokens: int) -> float:
        return float(tokens)

    for rate in (0.0, 0.3, 0.9, 0.999, 1.0):
        assert verification_width([8], [rate], linear) == 0
        assert verification_width([8] * 8, [rate] * 8, linear) == 0
        assert verification_width([8, 8, 0, 0], [rate, rate, 0.0, 0.0], linear) == 0


def test_where_width_is_free_a_good_draft_is_verified_whole():
    """A GPU decode step reads the weights whatever the rows: wide verification pays."""
    from mlx_mistral.speculative import verification_width

    assert verification_width([8], [0.95], width_is_free) == 8
    assert verification_width([8] * 8, [0.9] * 8, width_is_free) == 8
    assert verification_width([8, 3], [0.9, 0.9], width_is_free) == 8
    assert verification_width([8], [0.05], width_is_free) == 0  # still never for drafts that fail


def test_forward_cost_is_monotone_interpolated_and_extrapolated_in_proportion():
    from mlx_mistral.forward_cost import ForwardCost

    # 4 tokens timed slower than 8 (noise, or BLAS padding): never cheaper when wider.
    cost = ForwardCost({1: 0.010, 2: 0.011, 4: 0.020, 8: 0.016, 16: 0.040})
    assert cost(1) == 1.0
    assert cost(2) == pytest.approx(1.1)
    assert cost(3) == pytest.approx(1.55)  # halfway between 2 and 4
    assert cost(8) == cost(4) == pytest.approx(2.0)
    assert cost(32) == pytest.approx(8.0)  # past the last size: in proportion to the tokens
    values = [cost(t) for t in range(1, 100)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="seconds"):
        ForwardCost({2: 0.01, 4: 0.02})


def test_forward_cost_is_measured_once_per_model(tiny_model):
    from mlx_mistral.forward_cost import ForwardCost, forward_cost_of

    model, _ = tiny_model
    cost = ForwardCost.measure(model, (1, 2, 4, 8, 16, 32, 64), rounds=(2, 2))
    assert cost(1) == 1.0
    values = [cost(t) for t in range(1, 300)]
    assert all(v >= 1.0 for v in values)
    assert values == sorted(values)
    assert 1 in cost.sizes and len(cost.sizes) >= 2
    assert forward_cost_of(model) is forward_cost_of(model)  # kept, not timed again


# -- the distribution --------------------------------------------------------------------------
def _expected_distribution(logits, params: SamplingParams, counts, prompt_ids):
    """The sampler's law, computed independently in numpy (vLLM's order of operations)."""
    x = logits.astype(np.float64).copy()
    seen = counts > 0
    seen[list(prompt_ids)] = True
    rp = params.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / rp, x * rp), x)
    x = x - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    x = x / params.temperature
    keep = np.ones_like(x, dtype=bool)
    if params.top_k:
        keep &= x >= np.sort(x)[::-1][params.top_k - 1]
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1:
        masked = np.where(keep, p, 0)
        masked /= masked.sum()
        order = np.argsort(-masked, kind="stable")
        before = np.cumsum(masked[order]) - masked[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < params.top_p]] = True
        keep &= nucleus
    if params.min_p:
        keep &= p >= params.min_p * p.max()
    p = np.where(keep, p, 0)
    return p / p.sum()


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~1e-3 (z = 3.09; Wilson-Hilferty), so a
    correct sampler fails one run in a thousand; df 0 (one token left) must match exactly."""
    if df == 0:
        return 1e-9
    c = 2 / (9 * df)
    return df * (1 - c + z * c**0.5) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(temperature=1.0, repetition_penalty=2.0, top_k=8),
    ],
    ids=["t1", "t0.6", "top_p", "top_k", "min_p", "presence+frequency", "repetition"],
)
@pytest.mark.parametrize("drafted", [0, 3, 9])
def test_speculative_sampling_keeps_the_distribution(params, drafted):
    """Verifying a fixed drafted token (likely, middling, or outside the nucleus) yields the
    sampler's distribution: chi-square over 6000 seeded draws, each its own RNG stream."""
    vocab, draws = 12, 6000
    logits = np.linspace(2.0, -2.0, vocab).astype(np.float32)
    logits[[3, 4]] = logits[[4, 3]]
    prompt_ids = [4, 6]
    history = [0, 0, 3]  # tokens generated before this position (the penalties see them)
    states = [SamplerState(params, prompt_ids, vocab, choice=0) for _ in range(draws)]
    for i, state in enumerate(states):
        state.key = mx.random.key(i)
        for token in history:
            state.record(token)
    batch = mx.broadcast_to(mx.array(logits)[None], (draws, vocab))
    tokens, _ = choose_tokens(batch, states, [drafted] * draws)
    observed = np.bincount(tokens, minlength=vocab)
    counts = np.bincount(history, minlength=vocab).astype(np.float64)
    p = _expected_distribution(logits, params, counts, prompt_ids)
    assert observed[p == 0].sum() == 0  # nothing outside what the sampler keeps
    support = p > 0
    expected = p[support] * draws
    statistic = float(((observed[support] - expected) ** 2 / expected).sum())
    assert statistic < chi_square_critical(int(support.sum()) - 1)
    assert all(s.num_generated == len(history) + 1 for s in states)


# -- HTTP --------------------------------------------------------------------------------------
def test_http_prediction_reports_accepted_and_rejected_tokens(tiny_hf_checkpoint):
    import httpx
    import openai

    from tests.server_process import ServerProcess

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    # `always`: whether verifying pays on this machine at this moment is not what is tested.
    with ServerProcess(tiny_hf_checkpoint, "--speculation", "always") as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="any", max_retries=0)
        model = tiny_hf_checkpoint.name
        plain_answer = client.chat.completions.create(
            model=model, messages=messages, max_tokens=30, temperature=0
        )
        assert plain_answer.usage.completion_tokens_details is None  # no prediction, no details
        text = plain_answer.choices[0].message.content
        predicted = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=30,
            temperature=0,
            prediction={"type": "content", "content": text},
        )
        assert predicted.choices[0].message.content == text
        details = predicted.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 10
        assert details.rejected_prediction_tokens >= 0
        wrong = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=30,
            temperature=0,
            prediction={"type": "content", "content": [{"type": "text", "text": "Nope. " * 9}]},
        )
        assert wrong.choices[0].message.content == text
        assert wrong.usage.completion_tokens_details.rejected_prediction_tokens > 0
        # Streamed, with the usage chunk at the end; and the legacy completions endpoint.
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            prediction={"type": "content", "content": text},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 10
        completion = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=20, temperature=0
        )
        again = httpx.post(
            server.url("/v1/completions"),
            json={
                "model": model,
                "prompt": "Once upon a time",
                "max_tokens": 20,
                "temperature": 0,
                "prediction": {"type": "content", "content": completion.choices[0].text},
            },
        ).json()
        assert again["choices"][0]["text"] == completion.choices[0].text
        assert again["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 5
        bad = httpx.post(
            server.url("/v1/chat/completions"),
            json={"messages": messages, "prediction": {"type": "content", "content": 5}},
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "prediction.content"
        metrics = httpx.get(server.url("/metrics")).text
        counts = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("mlx_mistral_draft_tokens_")
        }
        # The metrics count what speculation verified (usage counts what became of predictions).
        proposed = counts["mlx_mistral_draft_tokens_proposed_total"]
        accepted = counts["mlx_mistral_draft_tokens_accepted_total"]
        assert proposed >= accepted > 10
        assert "Traceback" not in server.log()


def test_speculation_off_ignores_the_prediction(tiny_hf_checkpoint, tiny_model):
    """...for decoding; usage still counts, as OpenAI defines it, the prediction's tokens that
    appear in the completion (accepted) and those that do not (rejected)."""
    import httpx

    from tests.server_process import ServerProcess

    tokenizer = tiny_model[1]

    body = {
        "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
        "max_tokens": 20,
        "temperature": 0,
    }
    with ServerProcess(tiny_hf_checkpoint, "--speculation", "off") as server:
        plain = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60).json()
        text = plain["choices"][0]["message"]["content"]
        prediction = {"type": "content", "content": text}
        predicted = httpx.post(
            server.url("/v1/chat/completions"), json={**body, "prediction": prediction}, timeout=60
        ).json()
        half = text[: len(text) // 2] + " Nope, something else entirely."
        prediction = {"type": "content", "content": half}
        partly = httpx.post(
            server.url("/v1/chat/completions"), json={**body, "prediction": prediction}, timeout=60
        ).json()
        log = server.log()
    assert predicted["choices"][0]["message"]["content"] == text
    # Never looked for a draft: the forward's cost, timed at the first look, never was.
    assert "measured the forward" not in log
    details = predicted["usage"]["completion_tokens_details"]
    # A perfect prediction: every one of its tokens is in the completion, though none was drafted.
    assert details["accepted_prediction_tokens"] == len(tokenizer.encode(text)) > 5
    assert details["rejected_prediction_tokens"] == 0
    details = partly["usage"]["completion_tokens_details"]
    assert 0 < details["accepted_prediction_tokens"] < len(tokenizer.encode(half))
    assert details["rejected_prediction_tokens"] > 0
    total = details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"]
    assert total == len(tokenizer.encode(half))


def test_the_schedule_backs_off_after_fruitless_looks_and_stops_where_verifying_never_pays():
    measured = []
    schedule = SpeculationSchedule(None, lambda: measured.append(1) or flat_cost)
    assert schedule.look()  # the first step looks
    assert schedule.width([0], [0.0]) == 0 and measured == [1]  # timed once, at the first need
    schedule.found_nothing()
    assert [schedule.look() for _ in range(5)] == [False] * 3 + [True] * 2  # 4 steps on, looks
    schedule.found_nothing()
    assert [schedule.look() for _ in range(8)] == [False] * 7 + [True]  # then 8 (doubled)
    assert schedule.width([8], [1.0]) > 0  # a draft verified: the pause is short again
    schedule.found_nothing()
    assert [schedule.look() for _ in range(4)] == [False] * 3 + [True]
    schedule.found_nothing()
    schedule.newcomer()  # a request joined (it may bring a prediction): look at once
    assert schedule.look()
    assert measured == [1] and not schedule.never_pays

    # A cost known from the start to make verifying never pay: no look ever waits for it.
    linear = SpeculationSchedule(lambda tokens: float(tokens), lambda: flat_cost)
    assert linear.never_pays and not linear.look()
    measured_linear = SpeculationSchedule(None, lambda: lambda tokens: float(tokens))
    assert measured_linear.look() and measured_linear.width([8], [1.0]) == 0
    assert measured_linear.never_pays and not measured_linear.look()


def test_logprobs_of_verified_tokens_are_those_of_plain_decoding(demo):
    """A row that asks for logprobs speculates too: each verified token carries the logprob
    and alternatives that plain decoding gives it (the same position's distribution)."""
    model, tokenizer = demo
    prompt = chat(tokenizer, "Tell me a story about a cat.")
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=True, top_logprobs=3)

    def events(prediction: list[int] | None = None) -> list:
        generator = BatchGenerator(
            model, tokenizer, prompt_lookup=False, forward_cost=width_is_free
        )
        uid = generator.add(prompt, params, prediction=prediction)
        made = []
        while generator.has_work:
            made += [e for e in generator.step() if e.uid == uid]
        return made

    expected = [e for e in events() if e.token is not None]
    prediction = [e.token for e in expected]
    made = events(prediction)
    assert made[-1].accepted_prediction_tokens >= len(prediction) - 8
    verified = [e for e in made if e.token is not None]
    for want, have in zip(
        (e.logprobs for e in expected), (e.logprobs for e in verified), strict=True
    ):
        assert have.token == want.token
        assert [t for t, _ in have.top] == [t for t, _ in want.top]
        np.testing.assert_allclose(
            [have.logprob, *(lp for _, lp in have.top)],
            [want.logprob, *(lp for _, lp in want.top)],
            atol=1e-4,
        )


def test_prediction_counts_are_the_predicted_tokens_found_in_the_output():
    from mlx_mistral.server.openai_writers import prediction_counts

    assert prediction_counts([5, 6, 7], [5, 6, 7, 2]) == (3, 0)  # perfect: all accepted
    assert prediction_counts([5, 6, 6, 9], [6, 5, 8]) == (2, 2)  # each as often as it appears
    assert prediction_counts([5, 6], []) == (0, 2)


def test_a_server_times_the_forward_when_idle_not_inside_an_answer():
    """Deferred (as the engine runs it): the first drafts are declined, nothing is timed until
    the engine is idle, and then drafts are verified by the measured cost."""
    measured = []
    schedule = SpeculationSchedule(None, lambda: measured.append(1) or flat_cost, defer=True)
    assert schedule.look()
    assert schedule.width([8], [1.0]) == 0 and measured == []  # no stall inside the answer
    assert schedule.wanted
    assert schedule.measure_if_wanted() and measured == [1]  # the engine fell idle
    assert not schedule.measure_if_wanted() and measured == [1]  # once
    assert schedule.look() and schedule.width([8], [1.0]) > 0
    idle_only = SpeculationSchedule(None, lambda: measured.append(1) or flat_cost, defer=True)
    assert not idle_only.measure_if_wanted() and measured == [1]  # no drafts yet: nothing to time
