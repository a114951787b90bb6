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

from .sampling.filters import (
    HEAD_WIDTH,
    NEG_INF,
    apply_floor,
    apply_temperature,
    sorted_head,
    truncation_floor,
)
from .sampling.sampler import (
    TokenLogprobs,
    _BatchParams,
    _bias_inputs,
    _penalty_inputs,
    process_logits,
    sample_async,
)
from .sampling.state import SamplerState


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
    # The sampler's own steps build the processed logits: one definition of what a token's
    # probability is, for the plain draw and for verification alike.
    counts, seen, penalties = _penalty_inputs(states, logits.shape[-1])
    processed = process_logits(
        logits,
        counts=counts,
        seen=seen,
        penalties=penalties,
        bias=_bias_inputs(params),
        allowed=allowed,
    )
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


def _final_logits(processed: mx.array, params: Sequence) -> mx.array:
    """Temperature then the top_k/top_p/min_p floor: the logits whose softmax the sampler
    draws from (greedy rows get temperature 1 and are not read)."""

    batch = _BatchParams.of(params)
    scaled = apply_temperature(processed, batch.temperature)
    if not batch.any_truncated:
        return scaled
    vocab = processed.shape[-1]
    head, _ = sorted_head(scaled, min(HEAD_WIDTH, vocab))
    args = (batch.top_k, batch.top_p, batch.min_p)
    floor, exact = truncation_floor(scaled, head, *args)
    if not mx.all(exact | batch.greedy).item():  # a nucleus wider than the head: sort it all
        floor, _ = truncation_floor(scaled, sorted_head(scaled, vocab)[0], *args)
    return apply_floor(scaled, floor)
