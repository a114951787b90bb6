"""The sampler: logits ``[batch, vocab]`` of every active sequence -> one token per sequence.

Each sequence has its own :class:`SamplingParams`, token history and seeded RNG
(:class:`~mlx_mistral.sampling.state.SamplerState`); one call to :func:`sample` serves the whole
batch in one vectorized pass (per-sequence parameters become ``[B, 1]`` arrays; nothing loops over
the vocabulary).

Order of operations (vLLM's documented order); :func:`sample` composes :func:`process_logits`
(steps 1-3) and the draw (steps 4-8):

1. penalties, on the raw logits (float32):
   a. repetition_penalty (HF/CTRL, multiplicative) over tokens of the prompt *and* the
      generated text: a positive logit is divided by the penalty, any other multiplied by it;
   b. presence_penalty (OpenAI, additive): ``- presence_penalty * [count > 0]``;
   c. frequency_penalty (OpenAI, additive): ``- frequency_penalty * count``;
   where ``count`` is how often the token was *generated* so far (every token, no window);
2. logit_bias, added;
3. the grammar mask ``allowed`` (False -> -inf).
   -> These are the *processed logits*. Reported logprobs are ``log_softmax`` of them: the
      model's distribution as this request shaped it, before temperature and truncation, so a
      logprob means the same at any temperature (and is defined at temperature 0).
4. temperature: logits / T, T at least ``MIN_TEMPERATURE`` (rows with T = 0 take the exact
   argmax of the processed logits and skip everything below);
5. top_k: keep tokens whose logit is at least the k-th largest (ties at the edge are kept);
6. top_p: on the distribution left by top_k, keep the most likely tokens until their mass reaches
   top_p (a token is kept if the mass of the tokens more likely than it is < top_p, so tokens
   tied at the edge are all kept, as with top_k; top_p = 1 keeps all);
7. min_p: keep tokens with ``p >= min_p * p_max`` under the temperature-scaled distribution;
   (5-7 each keep the tokens above a per-row logit floor, so they combine into one floor, found
   on the sorted head of each row, see :func:`truncation_floor`);
8. draw: Gumbel-max, ``argmax(logits + Gumbel noise)``, the noise drawn from the row's own key;
   over the row's sorted head alone when all the tokens it keeps lie there (cheaper, and decided
   by the row's own values, so it never depends on the batch).

Reproducibility: a row's noise comes only from its own key (split once per step), and every other
op works row by row, so a seeded sequence yields the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlx_mistral.sampling.filters import (
    HEAD_WIDTH,
    NEG_INF,
    apply_allowed,
    apply_floor,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    sorted_head,
    truncation_floor,
)
from mlx_mistral.sampling.params import SamplingParams
from mlx_mistral.sampling.state import SamplerState

# A valid but tiny temperature (1e-40) would turn logits / T into infinities and the draw into
# NaN; below this, scaling is already one-hot for any logit gap over ~1e-4.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class _BatchParams:
    """Per-row parameters as ``[B, 1]`` arrays, plus host-side flags to skip unused work."""

    temperature: mx.array
    top_k: mx.array
    top_p: mx.array
    min_p: mx.array
    greedy: mx.array
    any_sampled: bool
    any_truncated: bool
    full_norm: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> _BatchParams:
        def col(values: list, dtype: mx.Dtype) -> mx.array:
            return mx.array(values, dtype=dtype)[:, None]

        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=col(
                [max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else 1.0 for p in params],
                mx.float32,
            ),
            top_k=col([p.top_k for p in params], mx.int32),
            top_p=col([p.top_p for p in params], mx.float32),
            min_p=col([p.min_p for p in params], mx.float32),
            greedy=col([p.greedy for p in params], mx.bool_),
            any_sampled=bool(sampled),
            any_truncated=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sampled),
            full_norm=any(p.top_k == 0 and p.top_p < 1.0 for p in sampled),
        )


def process_logits(
    logits: mx.array,
    *,
    counts: mx.array | None = None,
    seen: mx.array | None = None,
    penalties: tuple[mx.array, mx.array, mx.array] | None = None,
    bias: tuple[mx.array, mx.array, mx.array] | None = None,
    allowed: mx.array | None = None,
) -> mx.array:
    """Steps 1-3 of the module docstring: penalties, logit_bias, grammar mask.

    Args:
        logits: ``[B, V]`` model output (any float dtype; computed in float32).
        counts, seen, penalties: penalty state and ``(presence, frequency, repetition)`` ``[B, 1]``;
            None when no row uses penalties.
        bias: logit_bias as ``(rows, token ids, values)``, one entry per biased token; or None.
        allowed: ``[B, V]`` bool grammar mask, or None.

    Returns:
        The processed logits ``[B, V]`` float32 (logprobs and greedy rows use them as they are).
    """
    logits = logits.astype(mx.float32)
    if penalties is not None:
        logits = apply_penalties(logits, counts, seen, *penalties)
    if bias is not None:
        logits = apply_logit_bias(logits, *bias)
    if allowed is not None:
        logits = apply_allowed(logits, allowed)
    return logits


def _draw(
    processed: mx.array, batch: _BatchParams, keys: mx.array
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Steps 4-8: temperature, truncation floor, Gumbel-max draw from each row's own key.

    A row whose kept tokens all lie in its sorted head draws over the head only (``HEAD_WIDTH``
    noise values instead of ``V``); the choice depends on the row alone, so seeded rows stay
    reproducible in any batch. Returns the drawn tokens ``[B]``, the next keys ``[B, 2]`` and the
    head ids ``[B, W]`` (None when no row truncates).
    """
    vocab = processed.shape[-1]
    scaled = apply_temperature(processed, batch.temperature)
    floor = mx.full((processed.shape[0], 1), NEG_INF)
    head = head_ids = None
    in_head = mx.zeros((processed.shape[0],), dtype=mx.bool_)
    if batch.any_truncated:
        head, head_ids = sorted_head(scaled, min(HEAD_WIDTH, vocab))
        floor, exact = truncation_floor(
            scaled, head, batch.top_k, batch.top_p, batch.min_p, full_norm=batch.full_norm
        )
        mx.eval(floor, exact, head, head_ids)  # one sync: is a full sort needed?
        if not mx.all(exact | batch.greedy).item():
            full, _ = sorted_head(scaled, vocab)
            floor, _ = truncation_floor(scaled, full, batch.top_k, batch.top_p, batch.min_p)
        in_head = ((floor > head[:, -1:]) | batch.greedy)[:, 0]
    split = mx.vmap(mx.random.split)(keys)  # [B, 2, 2]: next key, this step's key
    step_keys = split[:, 1]
    tokens = None
    if head is not None:
        noise = mx.vmap(lambda k: mx.random.gumbel((head.shape[-1],), key=k))(step_keys)
        pick = mx.argmax(apply_floor(head, floor) + noise, axis=-1, keepdims=True)
        tokens = mx.take_along_axis(head_ids, pick, axis=-1)[:, 0]
    if head is None or not mx.all(in_head).item():
        noise = mx.vmap(lambda k: mx.random.gumbel((vocab,), key=k))(step_keys)
        full_draw = mx.argmax(apply_floor(scaled, floor) + noise, axis=-1)
        tokens = full_draw if tokens is None else mx.where(in_head, tokens, full_draw)
    return tokens, split[:, 0], head_ids


# ----------------------------------------------------------------------------- batched sampling
@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the most likely alternatives (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SampleOutput:
    """What one step gives back: plain Python values, safe to hand to another thread.

    Attributes:
        tokens: one token id per row.
        logprobs: per row, :class:`TokenLogprobs` if its request asked for logprobs, else None.
    """

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(frozen=True)
class PendingSample:
    """One step's draw while it is still being computed (see :func:`sample_async`).

    ``tokens`` can feed the next forward pass before anything reaches the host; :meth:`resolve`
    waits for the values. ``top_n[i]`` is row ``i``'s top_logprobs, or None when it asked for no
    logprobs.
    """

    tokens: mx.array  # [B] int
    top_n: tuple[int | None, ...]
    chosen: mx.array | None = None  # [B] logprob of the chosen token
    top_ids: mx.array | None = None  # [B, k]
    top_lp: mx.array | None = None  # [B, k]

    def take(self, rows: Sequence[int]) -> PendingSample:
        """Only `rows`, in that order (sequences left the batch before their token was read)."""
        index = mx.array(list(rows), dtype=mx.int32)

        def pick(a: mx.array | None) -> mx.array | None:
            return None if a is None else a[index]

        return PendingSample(
            self.tokens[index],
            tuple(self.top_n[r] for r in rows),
            pick(self.chosen),
            pick(self.top_ids),
            pick(self.top_lp),
        )

    def resolve(self) -> SampleOutput:
        """Wait for the draw; plain ints and floats."""
        tokens = self.tokens.tolist()
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        if self.chosen is not None:
            chosen = self.chosen.tolist()
            ids = self.top_ids.tolist() if self.top_ids is not None else None
            lps = self.top_lp.tolist() if self.top_lp is not None else None
            for i, n_top in enumerate(self.top_n):
                if n_top is None:
                    continue
                top = tuple(zip(ids[i][:n_top], lps[i][:n_top])) if n_top else ()
                out[i] = TokenLogprobs(tokens[i], chosen[i], top)
        return SampleOutput(tokens, out)


def _stack_rows(rows: list[mx.array | None], vocab: int, dtype: mx.Dtype) -> mx.array:
    zeros = mx.zeros((vocab,), dtype=dtype)
    return mx.stack([zeros if r is None else r for r in rows])


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.uses_penalties and not p.logit_bias and not p.logprobs


def sample(
    logits: mx.array, states: Sequence[SamplerState], allowed: mx.array | None = None
) -> SampleOutput:
    """Choose the next token of every sequence in one vectorized pass.

    Advances each state's RNG key and records the chosen token in its history (counts for the
    penalties), so the caller must not :meth:`SamplerState.record` it again.

    Args:
        logits: ``[B, V]`` last-position logits, row ``i`` belonging to ``states[i]``.
        states: one :class:`SamplerState` per row.
        allowed: optional ``[B, V]`` bool mask from a grammar (True = allowed), applied after
            logit_bias and before temperature. Each row must allow at least one token.

    Returns:
        A :class:`SampleOutput` (evaluated; plain ints and floats).

    Example:
        >>> state = SamplerState(SamplingParams(temperature=0), [], vocab_size=4)
        >>> sample(mx.array([[0.1, 2.0, 0.3, -1.0]]), [state]).tokens
        [1]
    """
    return sample_async(logits, states, allowed).resolve()


def sample_async(
    logits: mx.array, states: Sequence[SamplerState], allowed: mx.array | None = None
) -> PendingSample:
    """:func:`sample` without waiting: the draw is scheduled (``mx.async_eval``) and returned
    as arrays, so the caller can build the next forward pass on its tokens and do host work
    while the device computes. The states are advanced at once (their keys and counts become
    the pending arrays). Rows whose truncation needs a host decision (the full-sort fallback
    of top_p/top_k/min_p) still wait for the logits here.
    """
    params = [s.params for s in states]
    if allowed is None and all(_plain_greedy(p) for p in params):
        return _argmax_step(logits, states)
    vocab = logits.shape[-1]
    batch = _BatchParams.of(params)
    counts, seen, penalties = _penalty_inputs(states, vocab)
    processed = process_logits(
        logits,
        counts=counts,
        seen=seen,
        penalties=penalties,
        bias=_bias_inputs(params),
        allowed=allowed,
    )
    tokens = mx.argmax(processed, axis=-1)
    keys = head_ids = None
    if batch.any_sampled:
        drawn, keys, head_ids = _draw(processed, batch, mx.stack([s.key for s in states]))
        tokens = mx.where(batch.greedy[:, 0], tokens, drawn)
    if counts is not None:
        counts = counts + (mx.arange(vocab)[None, :] == tokens[:, None])
    chosen, top_ids, top_lp = _logprobs(processed, tokens, params, head_ids)
    mx.async_eval(*(a for a in (tokens, keys, counts, chosen, top_ids, top_lp) if a is not None))
    _advance(states, keys, counts)
    top_n = tuple(p.top_logprobs if p.logprobs else None for p in params)
    return PendingSample(tokens, top_n, chosen, top_ids, top_lp)


def _argmax_step(logits: mx.array, states: Sequence[SamplerState]) -> PendingSample:
    """The common greedy decode step, with nothing to process: the argmax of the raw logits."""
    tokens = mx.argmax(logits, axis=-1)
    mx.async_eval(tokens)
    _advance(states, None, None)
    return PendingSample(tokens, (None,) * len(states))


def _penalty_inputs(
    states: Sequence[SamplerState], vocab: int
) -> tuple[mx.array | None, mx.array | None, tuple[mx.array, mx.array, mx.array] | None]:
    """``(counts, seen, (presence, frequency, repetition))`` as batch arrays for
    :func:`process_logits`, or all None when no row uses a penalty (rows that use none get zero
    counts and neutral penalties)."""
    if not any(s.params.uses_penalties for s in states):
        return None, None, None
    counts = _stack_rows([s.counts for s in states], vocab, mx.float32)
    prompt = _stack_rows([s.prompt_mask for s in states], vocab, mx.bool_)
    penalties = tuple(
        mx.array([getattr(s.params, name) for s in states], dtype=mx.float32)[:, None]
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
    )
    return counts, prompt | (counts > 0), penalties


def _bias_inputs(
    params: Sequence[SamplingParams],
) -> tuple[mx.array, mx.array, mx.array] | None:
    """Every row's logit_bias as ``(rows, token ids, values)``, or None when no row has one."""
    entries = [(row, tid, value) for row, p in enumerate(params) for tid, value in p.logit_bias]
    if not entries:
        return None
    rows, ids, values = zip(*entries)
    return (
        mx.array(rows, dtype=mx.int32),
        mx.array(ids, dtype=mx.int32),
        mx.array(values, dtype=mx.float32),
    )


def _logprobs(
    processed: mx.array,
    tokens: mx.array,
    params: Sequence[SamplingParams],
    head_ids: mx.array | None,
) -> tuple[mx.array | None, mx.array | None, mx.array | None]:
    """``(chosen, top_ids, top_lp)``: the chosen tokens' logprobs ``[B]`` and the ``k`` most
    likely ids with their logprobs ``[B, k]`` (k the largest top_logprobs asked for); None for
    what no row asked for."""
    want = [p for p in params if p.logprobs]
    if not want:
        return None, None, None
    logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = max(p.top_logprobs for p in want)
    if not k:
        return chosen, None, None
    # Temperature keeps the order, so the sorted head (when there is one) is the answer.
    if head_ids is None:
        head_ids = sorted_head(processed, min(k, processed.shape[-1]))[1]
    top_ids = head_ids[:, :k]
    return chosen, top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1)


def _advance(
    states: Sequence[SamplerState], keys: mx.array | None, counts: mx.array | None
) -> None:
    """Move each state past this step: its next RNG key (if it drew) and its token counts."""
    for i, state in enumerate(states):
        state.num_generated += 1
        if keys is not None:
            state.key = keys[i]
        if state.counts is not None:
            state.counts = counts[i]
