"""The sampler against plain-numpy references: distributions, penalties, logprobs, seeds, checks.

Distribution tests draw N tokens (one batch row per seed, one call) and compare the counts with
the analytically filtered and renormalised distribution by Pearson's chi-square at significance
ALPHA = 0.001. Seeds are fixed, so each test is deterministic: it passes or fails every time.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral.errors import InvalidRequestError
from mlx_mistral.sampling.filters import HEAD_WIDTH, apply_min_p, apply_top_k, apply_top_p
from mlx_mistral.sampling.params import FIELDS, MAX_N, MAX_STOP, SamplingParams
from mlx_mistral.sampling.sampler import sample
from mlx_mistral.sampling.state import SamplerState

ALPHA = 0.001
N_DRAWS = 20_000
LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.4, -0.9, -1.5, -2.2, -3.0], np.float32)


# ----------------------------------------------------------------------------- numpy references
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """temperature -> top_k -> top_p (on what top_k left) -> min_p -> renormalise."""
    x = logits.astype(np.float64) / p.temperature
    keep = np.ones_like(x, dtype=bool)
    if p.top_k:
        keep &= x >= np.sort(x)[::-1][min(p.top_k, len(x)) - 1]
    if p.top_p < 1:
        probs = softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < p.top_p]] = True
        keep &= nucleus
    if p.min_p:
        probs = softmax(x)
        keep &= probs >= p.min_p * probs.max()
    return softmax(np.where(keep, x, -np.inf))


def reference_penalties(logits, prompt, generated, p: SamplingParams) -> np.ndarray:
    """HF/CTRL repetition over prompt+generated, then OpenAI presence/frequency over generated."""
    out = logits.astype(np.float32).copy()
    for t in set(prompt) | set(generated):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    counts = np.bincount(np.array(generated, dtype=np.int64), minlength=len(logits))
    return out - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """Upper critical value: scipy's when installed, else the Wilson-Hilferty approximation."""
    try:
        from scipy.stats import chi2
    except ImportError:  # Wilson-Hilferty is within ~1% of the exact value for df >= 2.
        z = {0.001: 3.090232, 0.01: 2.326348}[alpha]
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return float(chi2.ppf(1 - alpha, df))


def draw_many(logits: np.ndarray, params: SamplingParams, n: int = N_DRAWS) -> np.ndarray:
    """One token from each of n rows with seeds 0..n-1, all in one call to sample()."""
    states = [
        SamplerState(SamplingParams(**{**params.__dict__, "seed": s}), [], len(logits))
        for s in range(n)
    ]
    batch = mx.broadcast_to(mx.array(logits)[None], (n, len(logits)))
    return np.array(sample(batch, states).tokens)


# ----------------------------------------------------------------------------- distributions
DISTRIBUTION_CASES = {
    "temperature-1": {"temperature": 1.0},
    "temperature-0.5": {"temperature": 0.5},
    "temperature-1.8": {"temperature": 1.8},
    "top_k": {"temperature": 1.0, "top_k": 4},
    "top_p": {"temperature": 1.0, "top_p": 0.7},
    "min_p": {"temperature": 1.0, "min_p": 0.15},
    "temp+top_k+top_p": {"temperature": 0.7, "top_k": 6, "top_p": 0.8},
    "temp+top_p+min_p": {"temperature": 1.3, "top_p": 0.9, "min_p": 0.1},
    "all": {"temperature": 1.5, "top_k": 8, "top_p": 0.85, "min_p": 0.05},
}


@pytest.mark.parametrize("kwargs", DISTRIBUTION_CASES.values(), ids=DISTRIBUTION_CASES.keys())
def test_sampled_frequencies_match_filtered_distribution(kwargs):
    params = SamplingParams(**kwargs)
    expected = reference_distribution(LOGITS, params)
    counts = np.bincount(draw_many(LOGITS, params), minlength=len(LOGITS))
    support = expected > 0
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    e = expected[support] * N_DRAWS
    stat = float(((counts[support] - e) ** 2 / e).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return
    assert stat < chi2_critical(df), f"chi2={stat:.1f} df={df} counts={counts} expected={e}"


def test_filters_match_reference_masks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40)).astype(np.float32) * 2
    for fn, values, field in (
        (apply_top_k, [0, 1, 7], "top_k"),
        (apply_top_p, [1.0, 0.3, 0.75], "top_p"),
        (apply_min_p, [0.0, 0.5, 0.05], "min_p"),
    ):
        dtype = mx.int32 if field == "top_k" else mx.float32
        got = np.isfinite(np.array(fn(mx.array(x), mx.array(values, dtype=dtype)[:, None])))
        for row, v in zip(range(3), values):
            want = reference_distribution(x[row], SamplingParams(**{field: v})) > 0
            np.testing.assert_array_equal(got[row], want, err_msg=f"{field}={v}")


def test_wide_nucleus_beyond_sorted_head_falls_back_exactly():
    # Nearly flat logits: a top_p=0.95 nucleus needs ~3900 of 4096 tokens, far more than the head.
    vocab = 4 * HEAD_WIDTH
    logits = np.random.default_rng(1).normal(size=vocab).astype(np.float32) * 0.1
    params = SamplingParams(top_p=0.95)
    keep = reference_distribution(logits, params) > 0
    assert keep.sum() > HEAD_WIDTH
    tokens = draw_many(logits, params, n=2000)
    assert keep[tokens].all()
    assert (~keep).sum() > 0 and len(set(tokens.tolist())) > HEAD_WIDTH // 2


# A nucleus boundary that falls exactly on a token: probabilities 1/2, 1/4, 1/8, 1/8.
HALVING = np.log(np.array([0.5, 0.25, 0.125, 0.125], np.float32))


def mass_before(logits: np.ndarray, n: int) -> float:
    """The mass of the `n` most likely tokens (`logits` sorted descending), computed with the
    nucleus filter's own operations: on any device it then equals, bit for bit, the mass the
    filter compares with top_p (exp rounds differently between kernels)."""
    x = mx.array(logits)[None]
    probs = mx.exp(x - mx.logsumexp(x, axis=-1, keepdims=True))
    return (mx.cumsum(probs, axis=-1) - probs)[0, n].item()


@pytest.mark.parametrize("n_kept", [1, 2])
def test_top_p_drops_the_token_whose_preceding_mass_equals_top_p(n_kept):
    """A token is kept only while the mass before it is strictly below top_p: with top_p equal
    to the mass of the first `n_kept` tokens, the next one goes (random logits never land on
    this edge)."""
    top_p = mass_before(HALVING, n_kept)
    assert top_p == pytest.approx([0.5, 0.75][n_kept - 1])
    kept = np.isfinite(np.array(apply_top_p(mx.array(HALVING)[None], mx.array([[top_p]]))))[0]
    assert kept.tolist() == [i < n_kept for i in range(4)]
    # The batched sampler, each row its own seed: it draws from exactly those tokens.
    drawn = set(draw_many(HALVING, SamplingParams(top_p=top_p), n=3000).tolist())
    assert drawn == set(range(n_kept))


def test_top_p_keeps_every_token_tied_at_its_edge():
    """Four equal logits, top_p 0.5: two tokens reach the mass, but which two would depend on
    their order in the vocabulary; tokens tied with the last one kept are all kept (as with
    top_k), so the nucleus is the same whatever the order."""
    equal = np.zeros(4, np.float32)
    kept = np.isfinite(np.array(apply_top_p(mx.array(equal)[None], mx.array([[0.5]]))))[0]
    assert kept.all()
    assert set(draw_many(equal, SamplingParams(top_p=0.5), n=3000).tolist()) == set(range(4))
    # Below the tie the boundary still cuts: 1/2, then three tokens of 1/6 tied.
    split = np.log(np.array([0.5, 1 / 6, 1 / 6, 1 / 6], np.float32))
    kept = np.isfinite(np.array(apply_top_p(mx.array(split)[None], mx.array([[0.4]]))))[0]
    assert kept.tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------- processing
def test_greedy_is_argmax_and_mixes_with_sampled_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)] * 3
    states = [SamplerState(p, [], 50) for p in params]
    out = sample(mx.array(x), states).tokens
    assert [out[i] for i in (0, 2, 4)] == [int(np.argmax(x[i])) for i in (0, 2, 4)]


@pytest.mark.parametrize("temperature", [1e-40, 1e-12, 1e-6])
def test_tiny_temperatures_pick_the_argmax(temperature):
    """logits / 1e-40 overflows: the draw must still be the argmax, not token 0 of a NaN row."""
    logits = mx.array([[1.0, 2.0, 0.5, -1.0]] * 4)
    states = [
        SamplerState(SamplingParams(temperature=temperature, seed=s), [], 4) for s in range(4)
    ]
    assert sample(logits, states).tokens == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},
        {"presence_penalty": 1.5},
        {"frequency_penalty": -0.8},
        {"presence_penalty": -1.0, "frequency_penalty": 0.7, "repetition_penalty": 1.3},
    ],
)
def test_penalties_and_logprobs_match_numpy(kwargs):
    vocab = 30
    logits = np.random.default_rng(3).normal(size=vocab).astype(np.float32) * 3
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=5, **kwargs)
    prompt, generated = [1, 2, 3, 3], [4, 4, 4, 5, 1]
    state = SamplerState(params, prompt, vocab)
    for t in generated:
        state.record(t)
    out = sample(mx.array(logits)[None], [state])
    ref = reference_penalties(logits, prompt, generated, params)
    ref_lp = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()
    token = int(np.argmax(ref))
    assert out.tokens == [token]
    lp = out.logprobs[0]
    assert lp.token == token and lp.logprob == pytest.approx(ref_lp[token], abs=1e-5)
    assert [t for t, _ in lp.top] == list(np.argsort(-ref_lp)[:5])
    np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref_lp)[::-1][:5], atol=1e-5)
    # sample() recorded its own token: counts cover every generated token, no window.
    np.testing.assert_array_equal(
        np.array(state.counts), np.bincount(generated + [token], minlength=vocab)
    )


def test_logit_bias_and_allowed_mask():
    vocab = 20
    logits = mx.array(np.linspace(-1, 1, vocab, dtype=np.float32))[None]  # argmax is 19
    top = SamplerState(SamplingParams(temperature=0, logit_bias={"19": -100, 3: 100}), [], vocab)
    assert sample(logits, [top]).tokens == [3]
    with pytest.raises(InvalidRequestError) as err:
        SamplerState(SamplingParams(logit_bias={vocab: 1}), [], vocab)
    assert err.value.param == "logit_bias"

    allowed_ids = [2, 5, 11]
    allowed = mx.zeros((1, vocab), dtype=mx.bool_)
    allowed[:, mx.array(allowed_ids)] = True
    greedy = SamplerState(SamplingParams(temperature=0, logprobs=True), [], vocab)
    out = sample(logits, [greedy], allowed=allowed)
    masked = np.full(vocab, -np.inf, np.float32)
    masked[allowed_ids] = np.linspace(-1, 1, vocab, dtype=np.float32)[allowed_ids]
    assert out.tokens == [11]
    assert out.logprobs[0].logprob == pytest.approx(np.log(softmax(masked)[11]), abs=1e-6)
    n = 500
    states = [SamplerState(SamplingParams(temperature=2.0, seed=s), [], vocab) for s in range(n)]
    drawn = sample(
        mx.broadcast_to(logits, (n, vocab)), states, mx.broadcast_to(allowed, (n, vocab))
    )
    assert set(drawn.tokens) == set(allowed_ids)


# ----------------------------------------------------------------------------- reproducibility
def run(states: list[SamplerState], steps: list[np.ndarray], rows: list[int]) -> list[list[int]]:
    """Feed steps[s][rows[i]] to states[i] for each step; return each state's tokens."""
    out: list[list[int]] = [[] for _ in states]
    for logits in steps:
        tokens = sample(mx.array(logits[rows]), states).tokens
        for i, t in enumerate(tokens):
            out[i].append(t)
    return out


@pytest.mark.parametrize("vocab", [64, 32000])
def test_seed_reproducible_alone_and_in_any_batch(vocab):
    rng = np.random.default_rng(4)
    steps = [rng.normal(size=(5, vocab)).astype(np.float32) * 2 for _ in range(8)]
    seeded = SamplingParams(temperature=0.9, top_p=0.8, presence_penalty=0.4, seed=1234)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=5, seed=9, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.0, repetition_penalty=1.5, logit_bias={1: 5.0}),
        SamplingParams(temperature=0.5, min_p=0.3),
    ]
    alone = run([SamplerState(seeded, [1, 2], vocab)], steps, [0])[0]
    states = [SamplerState(p, [7], vocab) for p in others]
    states.insert(2, SamplerState(seeded, [1, 2], vocab))
    batched = run(states, steps, [1, 2, 0, 3, 4])[2]
    assert alone == batched
    other_seed = SamplingParams(**{**seeded.__dict__, "seed": 1235})
    assert run([SamplerState(other_seed, [1, 2], vocab)], steps, [0])[0] != alone


def test_choices_get_distinct_reproducible_streams():
    vocab = 1000
    logits = np.zeros((1, vocab), np.float32)
    steps = [logits] * 6
    params = SamplingParams(seed=42, n=3)
    first = run(SamplerState.for_choices(params, [], vocab), steps, [0, 0, 0])
    again = run(SamplerState.for_choices(params, [], vocab), steps, [0, 0, 0])
    assert first == again
    assert len({tuple(t) for t in first}) == 3
    single = run([SamplerState(SamplingParams(seed=42), [], vocab)], steps, [0])[0]
    assert single == first[0]
    unseeded = [SamplerState(SamplingParams(), [], vocab) for _ in range(2)]
    assert unseeded[0].seed != unseeded[1].seed


# ----------------------------------------------------------------------------- validation
NUMBER_FIELDS = {  # field: (below, above) the allowed range
    "temperature": (-0.1, 2.01),
    "top_p": (0.0, 1.01),
    "min_p": (-0.01, 1.01),
    "presence_penalty": (-2.01, 2.01),
    "frequency_penalty": (-2.01, 2.01),
    "repetition_penalty": (0.0, 5.01),
}
INT_FIELDS = {
    "top_k": (-1, 1000),
    "max_tokens": (-1, 1_000_001),
    "seed": (-(2**63) - 1, 2**63),  # a negative seed in range means "random" (llama.cpp's -1)
    "top_logprobs": (-1, 21),
    "n": (0, MAX_N + 1),
}
BAD = (
    [(f, v) for f, pair in {**NUMBER_FIELDS, **INT_FIELDS}.items() for v in pair]
    + [(f, v) for f in NUMBER_FIELDS for v in (math.nan, math.inf, -math.inf, True, "1", None)]
    + [(f, v) for f in INT_FIELDS for v in (math.nan, math.inf, 1.5, 2.0, False, "3")]
    + [(f, None) for f in ("top_k", "top_logprobs", "n")]
    + [("stop", v) for v in (["a"] * (MAX_STOP + 1), [""], "", [1], {"a": 1}, 5)]
    + [("logprobs", v) for v in (1, "true", None)]
    + [
        ("logit_bias", v)
        for v in (
            {"a": 1},
            {-1: 1},
            {"-3": 1},
            {1: 101},
            {1: math.nan},
            {1: True},
            {1: "2"},
            {True: 1},
            {1.5: 1},
            [1, 2],
            "x",
            {1: 1, "1": 2},
        )
    ]
)


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_are_rejected_with_the_field_named(field, value):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == field
    assert err.value.message.startswith(field)


def test_range_messages_name_value_and_range():
    with pytest.raises(InvalidRequestError, match=r"^top_p must be in \(0, 1\], got 1.5\.$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match=r"top_k must be an integer in \[0, 999\]"):
        SamplingParams(top_k=2.5)
    with pytest.raises(InvalidRequestError, match="temperature .*got nan") as err:
        SamplingParams(temperature=math.nan)
    assert err.value.to_dict()["error"]["param"] == "temperature"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(top_logprobs=3)
    assert err.value.param == "top_logprobs"


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.min_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0.0, 0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.logit_bias, p.logprobs, p.top_logprobs, p.n) == (
        None,
        (),
        (),
        False,
        0,
        1,
    )
    q = SamplingParams(
        temperature=1, stop="END", logit_bias={"7": 1, 3: -2.5}, seed=2**63 - 1, max_tokens=0
    )
    assert q.stop == ("END",) and q.logit_bias == ((3, -2.5), (7, 1.0))
    assert isinstance(q.temperature, float) and q.seed == 2**63 - 1
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(q) == hash(SamplingParams(**q.__dict__))


def test_a_negative_seed_means_a_fresh_random_seed():
    """llama.cpp's and LM Studio's clients send seed -1 for "random"."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams(seed=-(2**63)).seed is None
    assert SamplingParams(seed=0).seed == 0
    states = [SamplerState(SamplingParams(seed=-1), [], 8) for _ in range(2)]
    assert states[0].seed != states[1].seed


def test_stop_takes_up_to_max_stop_strings():
    """Editors' autocomplete (Continue) sends a dozen or more stop strings."""
    stops = [f"s{i}" for i in range(MAX_STOP)]
    assert SamplingParams(stop=stops).stop == tuple(stops) and MAX_STOP >= 16


# ----------------------------------------------------------------------------- the field table
def _past_the_top(field):
    """The smallest plain value above the field's range (its upper end itself when open)."""
    hi = field.bounds.hi
    if field.bounds.hi_open:
        return hi
    return hi + 1 if field.bounds.integer else hi + 0.5


def test_the_table_drives_the_api_document_and_the_request_parser():
    from mlx_mistral.server.openapi import openapi_document
    from mlx_mistral.server.schemas import ChatCompletionRequest, CompletionRequest

    schemas = openapi_document()["components"]["schemas"]
    endpoints = {
        "chat": (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
        "completion": (CompletionRequest, {"prompt": "hi"}),
    }
    for field in FIELDS:
        chat_only = field.name in ("logprobs", "top_logprobs")  # completions: one integer
        for endpoint, (request, base) in endpoints.items():
            if chat_only and endpoint == "completion":
                assert "top_logprobs" not in schemas["CompletionRequest"]["properties"]
                continue
            properties = schemas[request.__name__]["properties"]
            for name in (field.name, *field.aliases):
                schema = properties[name]
                assert schema["description"]
                if field.bounds is None:
                    continue
                low = "exclusiveMinimum" if field.bounds.lo_open else "minimum"
                high = "exclusiveMaximum" if field.bounds.hi_open else "maximum"
                assert schema["type"] == [field.kind, "null"], name
                assert (schema[low], schema[high]) == (field.bounds.lo, field.bounds.hi), name
                body = {**base, name: _past_the_top(field)}
                if field.needs:
                    body[field.needs] = True
                with pytest.raises(InvalidRequestError) as err:
                    request.from_json(body)
                assert err.value.param == field.name, (endpoint, name)
                assert str(field.bounds) in err.value.message


def test_stream_generate_makes_one_choice(tiny_model):
    import mlx_mistral

    model, tokenizer = tiny_model
    with pytest.raises(InvalidRequestError) as err:
        next(mlx_mistral.stream_generate(model, tokenizer, "Hi", params=SamplingParams(n=2)))
    assert err.value.param == "n"
