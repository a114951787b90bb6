"""Speculative sampling: accept or replace drafted tokens so that the output keeps its exact law.

The batch feeds every row its newest token and its draft (:mod:`mlx_mistral.drafts`) in one
forward, then walks the positions in order. At each position a row either proposes its drafted
token ``x`` or, past its draft, has nothing to propose:

- nothing proposed: the ordinary sampler draws (:func:`~mlx_mistral.sampling.sample_async`), so
  a row that does not speculate gets exactly the draw it gets in a plain step;
- greedy: the token is the argmax of the processed logits; ``x`` is accepted when it is that;
- sampled: with ``p`` the distribution the sampler would draw from here (penalties over the
  tokens before this position, logit_bias, the grammar's mask for this position, temperature,
  top_k, top_p, min_p), ``x`` is accepted with probability ``p(x)``; otherwise the token is
  drawn from ``p`` with ``x`` removed and renormalised. For a draft that is one fixed token
  (no draft model) this is the standard rule, and the token has law ``p`` exactly:
  ``P(y) = p(x)[y = x] + (1 - p(x)) p(y)[y != x] / (1 - p(x)) = p(y)``.

A row stops at its first rejected position (the token drawn there replaces the draft) or takes
one more token from the position after its whole draft. Randomness comes from the row's own key,
split once per position, so a seeded row gives the same tokens whatever shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .sampling import (
    MIN_TEMPERATURE,
    PREFIX,
    SamplerState,
    TokenLogprobs,
    apply_floor,
    apply_temperature,
    process_logits,
    sample_async,
    truncation_floor,
)
from .sampling_filters import NEG_INF, sorted_head


def choose_tokens(
    logits: mx.array,
    states: Sequence[SamplerState],
    proposals: Sequence[int | None],
    allowed: mx.array | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The token of every row at one position: a proposal verified, or an ordinary draw.

    Args:
        logits: ``[B, V]`` the model's logits at this position.
        states: each row's sampler state, holding its tokens up to this position.
        proposals: each row's drafted token here, or None.
        allowed: ``[B, V]`` grammar masks for this position, or None.

    Returns:
        The tokens, and their logprobs for rows that asked (rows that ask never propose).
    """
    tokens: list[int] = [0] * len(states)
    logprobs: list[TokenLogprobs | None] = [None] * len(states)
    plain = [i for i, p in enumerate(proposals) if p is None]
    drafted = [i for i, p in enumerate(proposals) if p is not None]
    for rows in (plain, drafted):
        if not rows:
            continue
        index = mx.array(rows)
        sub_states = [states[r] for r in rows]
        sub_allowed = None if allowed is None else allowed[index]
        if rows is drafted:
            chosen = verify(logits[index], sub_states, [proposals[r] for r in rows], sub_allowed)
            lps: list[TokenLogprobs | None] = [None] * len(rows)
        else:
            out = sample_async(logits[index], sub_states, sub_allowed).resolve()
            chosen, lps = out.tokens, out.logprobs
        for r, token, lp in zip(rows, chosen, lps):
            tokens[r], logprobs[r] = token, lp
    return tokens, logprobs


def verify(
    logits: mx.array,
    states: Sequence[SamplerState],
    drafted: Sequence[int],
    allowed: mx.array | None = None,
) -> list[int]:
    """Accept each row's drafted token or replace it (see the module docstring).

    Advances each state as :func:`~mlx_mistral.sampling.sample` would: its key (sampled rows)
    and its token history (the penalties of the next position see the chosen token).
    """
    params = [s.params for s in states]
    processed = process_logits(logits, allowed=allowed, **_penalty_inputs(states, logits.shape[-1]))
    x = mx.array(list(drafted), dtype=mx.int32)[:, None]  # (B, 1)
    tokens = mx.argmax(processed, axis=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        final = _final_logits(processed, params)  # -inf outside what the sampler keeps
        log_p = final - mx.logsumexp(final, axis=-1, keepdims=True)
        p_x = mx.exp(mx.take_along_axis(log_p, x, axis=-1))[:, 0]
        split = mx.vmap(mx.random.split)(mx.stack([s.key for s in states]))  # (B, 2, 2)
        step = mx.vmap(lambda k: mx.random.split(k))(split[:, 1])  # (B, 2, 2): accept, residual
        u = mx.vmap(lambda k: mx.random.uniform(key=k))(step[:, 0])
        residual = mx.put_along_axis(final, x, mx.array(NEG_INF), axis=-1)
        noise = mx.vmap(lambda k: mx.random.gumbel((final.shape[-1],), key=k))(step[:, 1])
        redrawn = mx.argmax(residual + noise, axis=-1)
        greedy = mx.array([p.greedy for p in params])
        drawn = mx.where(u < p_x, x[:, 0], redrawn)
        tokens = mx.where(greedy, tokens, drawn)
        mx.eval(tokens, split)
        for i in sampled:
            states[i].key = split[i, 0]
    else:
        mx.eval(tokens)
    chosen = tokens.tolist()
    for state, token in zip(states, chosen):
        state.record(token)
    return chosen


def _penalty_inputs(states: Sequence[SamplerState], vocab: int) -> dict[str, object]:
    """What :func:`process_logits` needs for penalties and logit_bias, stacked per row."""
    params = [s.params for s in states]
    out: dict[str, object] = {}
    if any(p.uses_penalties for p in params):
        zeros_f = mx.zeros((vocab,), dtype=mx.float32)
        zeros_b = mx.zeros((vocab,), dtype=mx.bool_)
        counts = mx.stack([zeros_f if s.counts is None else s.counts for s in states])
        prompt = mx.stack([zeros_b if s.prompt_mask is None else s.prompt_mask for s in states])
        out["counts"], out["seen"] = counts, prompt | (counts > 0)
        out["penalties"] = tuple(
            mx.array([getattr(p, name) for p in params], dtype=mx.float32)[:, None]
            for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
        )
    entries = [(row, tid, value) for row, p in enumerate(params) for tid, value in p.logit_bias]
    if entries:
        rows, ids, values = zip(*entries)
        out["bias"] = (
            mx.array(rows, dtype=mx.int32),
            mx.array(ids, dtype=mx.int32),
            mx.array(values, dtype=mx.float32),
        )
    return out


def _final_logits(processed: mx.array, params: Sequence) -> mx.array:
    """Temperature then the top_k/top_p/min_p floor: the logits whose softmax the sampler
    draws from (greedy rows get temperature 1 and are not read)."""

    def col(values: list, dtype: mx.Dtype) -> mx.array:
        return mx.array(values, dtype=dtype)[:, None]

    temperature = [
        max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else 1.0 for p in params
    ]
    scaled = apply_temperature(processed, col(temperature, mx.float32))
    if not any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        return scaled
    top_k = col([p.top_k for p in params], mx.int32)
    top_p = col([p.top_p for p in params], mx.float32)
    min_p = col([p.min_p for p in params], mx.float32)
    vocab = processed.shape[-1]
    head, _ = sorted_head(scaled, min(PREFIX, vocab))
    floor, exact = truncation_floor(scaled, head, top_k, top_p, min_p)
    if not mx.all(exact).item():  # a nucleus wider than the head: sort whole rows
        floor, _ = truncation_floor(scaled, sorted_head(scaled, vocab)[0], top_k, top_p, min_p)
    return apply_floor(scaled, floor)
