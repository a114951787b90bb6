"""Pure logit filters over ``[batch, vocab]``, each row with its own ``[B, 1]`` parameters.

The sampler (:mod:`mlx_mistral.sampling.sampler`) composes them in its documented order. The
truncation filters (top_k, top_p, min_p) are expressed as per-row logit *floors*: each keeps the
tokens at or above its floor, so together they cost one masking pass, and the sort they need
covers only the head of each row (its ``HEAD_WIDTH`` largest logits) unless a nucleus is wider.
"""

from __future__ import annotations

import mlx.core as mx

NEG_INF = float("-inf")

HEAD_WIDTH = 1024
"""How many of each row's largest logits are sorted (the row's head). top_k < 1000 always fits;
top_p and min_p use the head when the tokens they keep fit in it (checked per row), so a full
sort of the vocabulary is rare."""


def apply_penalties(
    logits: mx.array,
    counts: mx.array,
    seen: mx.array,
    presence: mx.array,
    frequency: mx.array,
    repetition: mx.array,
) -> mx.array:
    """Apply repetition, then presence and frequency penalties.

    Args:
        logits: ``[B, V]`` float32.
        counts: ``[B, V]`` float32, times each token was generated.
        seen: ``[B, V]`` bool, token occurs in the prompt or the generated tokens.
        presence, frequency, repetition: ``[B, 1]`` float32 (0, 0, 1 leave a row unchanged).

    Returns:
        ``[B, V]`` penalised logits.
    """
    penalised = mx.where(logits > 0, logits / repetition, logits * repetition)
    logits = mx.where(seen, penalised, logits)
    return logits - presence * (counts > 0) - frequency * counts


def apply_logit_bias(logits: mx.array, rows: mx.array, ids: mx.array, values: mx.array) -> mx.array:
    """Add ``values[j]`` to ``logits[rows[j], ids[j]]``: a request's bias names a few tokens,
    so it is scattered, not added as a dense ``[B, V]`` array."""
    return logits.at[rows, ids].add(values)


def apply_allowed(logits: mx.array, allowed: mx.array) -> mx.array:
    """Send tokens a grammar forbids (``allowed`` False, ``[B, V]`` bool) to -inf."""
    return mx.where(allowed, logits, NEG_INF)


def apply_temperature(logits: mx.array, temperature: mx.array) -> mx.array:
    """Divide by ``[B, 1]`` temperatures (callers put 1 on greedy rows, which never sample)."""
    return logits / temperature


def apply_floor(logits: mx.array, floor: mx.array) -> mx.array:
    """Send logits below the row's ``floor`` (``[B, 1]``) to -inf.

    Every truncation filter keeps the tokens above a per-row logit floor, so the three of them
    compose into one floor (their maximum) and one masking pass.
    """
    return mx.where(logits >= floor, logits, NEG_INF)


def top_k_floor(sorted_desc: mx.array, top_k: mx.array) -> mx.array:
    """The k-th largest logit per row (``top_k`` ``[B, 1]`` int32; 0 -> -inf, keep all).

    ``sorted_desc`` holds at least the row's ``top_k`` largest logits, sorted descending.
    Tokens tied with the k-th are kept too.
    """
    width = sorted_desc.shape[-1]
    kth = mx.take_along_axis(sorted_desc, mx.clip(top_k, 1, width) - 1, axis=-1)
    return mx.where(top_k > 0, kth, NEG_INF)


def top_p_floor(
    sorted_desc: mx.array, log_norm: mx.array, top_p: mx.array
) -> tuple[mx.array, mx.array]:
    """Nucleus floor: the least likely token still needed for the mass to reach ``top_p``.

    A token is kept when the mass of the tokens more likely than it is below ``top_p``.

    Args:
        sorted_desc: ``[B, W]`` the row's largest logits (already top_k-filtered), descending.
        log_norm: ``[B, 1]`` logsumexp of the whole (top_k-filtered) row.
        top_p: ``[B, 1]``; 1 keeps all.

    Returns:
        ``(floor, exact)``: the floor, and per row whether ``sorted_desc`` held enough mass to
        place it (always true for top_p = 1 or a full sort).
    """
    probs = mx.exp(sorted_desc - log_norm)
    mass = mx.cumsum(probs, axis=-1)
    n_keep = mx.sum(mass - probs < top_p, axis=-1, keepdims=True)
    edge = mx.take_along_axis(sorted_desc, mx.maximum(n_keep, 1) - 1, axis=-1)
    # Rounding can push the running mass to 1 before the tail ends: top_p = 1 must keep all.
    whole = top_p >= 1.0
    exact = whole | (mass[:, -1:] >= top_p)
    return mx.where(whole, NEG_INF, edge), exact


def min_p_floor(logits: mx.array, min_p: mx.array) -> mx.array:
    """``p >= min_p * p_max`` in log space: ``logit >= max_logit + log(min_p)`` (0 -> -inf)."""
    return mx.max(logits, axis=-1, keepdims=True) + mx.log(min_p)


def sorted_head(logits: mx.array, width: int) -> tuple[mx.array, mx.array]:
    """The ``width`` largest logits of each row and their ids, both ``[B, width]``, descending.

    A partition then a sort of the head: at vocab 32000 this is several times cheaper than
    sorting whole rows.
    """
    if width >= logits.shape[-1]:
        ids = mx.argsort(-logits, axis=-1)
    else:
        ids = mx.argpartition(-logits, width - 1, axis=-1)[:, :width]
        vals = mx.take_along_axis(logits, ids, axis=-1)
        ids = mx.take_along_axis(ids, mx.argsort(-vals, axis=-1), axis=-1)
    return mx.take_along_axis(logits, ids, axis=-1), ids


def truncation_floor(
    scaled: mx.array,
    head: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    min_p: mx.array,
    *,
    full_norm: bool = True,
) -> tuple[mx.array, mx.array]:
    """top_k, then top_p on what top_k left, then min_p, as one ``[B, 1]`` floor.

    Args:
        scaled: ``[B, V]`` temperature-scaled logits.
        head: ``[B, W]`` the largest of them, descending (W >= 1000, or W = V for a full sort).
        top_k, top_p, min_p: ``[B, 1]`` per-row parameters.
        full_norm: False when no row has top_p < 1 without top_k (no row-wide softmax needed).

    Returns:
        ``(floor, exact)``: the floor and, per row, whether it is exact (False only where top_p
        needs more tokens than ``head`` holds; a full sort then settles it).
    """
    k_floor = top_k_floor(head, top_k)
    head = apply_floor(head, k_floor)
    # With top_k on, the survivors all sit in the head; otherwise normalise over the whole row
    # (an exp over [B, V]: skipped when no row needs it, which changes no row's result).
    log_norm = mx.logsumexp(head, axis=-1, keepdims=True)
    if full_norm:
        log_norm = mx.where(top_k > 0, log_norm, mx.logsumexp(scaled, axis=-1, keepdims=True))
    p_floor, exact = top_p_floor(head, log_norm, top_p)
    floor = mx.maximum(mx.maximum(k_floor, p_floor), min_p_floor(scaled, min_p))
    return floor, exact


def apply_top_k(logits: mx.array, top_k: mx.array) -> mx.array:
    """Keep the ``top_k`` (``[B, 1]`` int32, 0 = off) most likely tokens of each row."""
    return apply_floor(logits, top_k_floor(sorted_head(logits, logits.shape[-1])[0], top_k))


def apply_top_p(logits: mx.array, top_p: mx.array) -> mx.array:
    """Keep each row's nucleus of mass ``top_p`` (``[B, 1]``)."""
    head = sorted_head(logits, logits.shape[-1])[0]
    log_norm = mx.logsumexp(logits, axis=-1, keepdims=True)
    return apply_floor(logits, top_p_floor(head, log_norm, top_p)[0])


def apply_min_p(logits: mx.array, min_p: mx.array) -> mx.array:
    """Keep tokens with ``p >= min_p * p_max`` (``min_p`` ``[B, 1]``; 0 keeps all)."""
    return apply_floor(logits, min_p_floor(logits, min_p))
