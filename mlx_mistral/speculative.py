"""Speculative sampling: accept or replace drafted tokens so that the output keeps its exact law.

The batch feeds every row its newest token and its draft (:mod:`mlx_mistral.drafts`) in one
forward. At each position a row draws the token the ordinary sampler
(:func:`~mlx_mistral.sampling.sample_async`) would draw there, with every parameter applied as
in a plain step (penalties over the tokens before the position, logit_bias, the grammar's mask,
temperature, top_k, top_p, min_p) and the key the plain step would use; the drafted token is
accepted when the draw equals it. A draft that is one fixed token ``x`` (no draft model) is
then accepted with probability ``p(x)``, as in the standard rule, and when it is not the token
has law ``p(y) / (1 - p(x))`` over ``y != x``: the standard residual. So the output is exactly
the sampler's, token for token for a seeded row, whether it speculates or not, and in any batch.

A row stops at its first rejected position (the token drawn there replaces the draft) or takes
one more token from the position after its whole draft. Positions are independent given the
draft (its prefix is what the row has said when a position is reached), so
:class:`Verification` settles all of them in one pass and one wait for the host; only a row
under a grammar, whose mask for a position depends on the tokens before it, is walked position
by position with :func:`choose_tokens`.

Whether a step verifies, and how wide, is :func:`verification_width`'s call, from the forward's
cost measured on the loaded model (:mod:`mlx_mistral.forward_cost`): where a forward's cost grows
in proportion to its tokens, it never verifies. :class:`SpeculationSchedule` says when a batch
looks for drafts at all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import mlx.core as mx

from .drafts import MAX_DRAFT
from .sampling.sampler import TokenLogprobs, sample_async
from .sampling.state import SamplerState


def choose_tokens(
    logits: mx.array,
    states: Sequence[SamplerState],
    proposals: Sequence[int | None],
    allowed: mx.array | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The token of every row at one position: the sampler's draw, which verifies a proposal
    by equalling it (see the module docstring). Advances each state as the sampler does.

    Args:
        logits: ``[B, V]`` the model's logits at this position.
        states: each row's sampler state, holding its tokens up to this position.
        proposals: each row's drafted token here, or None (the draw does not depend on it).
        allowed: ``[B, V]`` grammar masks for this position, or None.

    Returns:
        The tokens, and their logprobs for rows that asked.
    """
    out = sample_async(logits, states, allowed).resolve()
    return out.tokens, out.logprobs


class Verification:
    """Every row's tokens for one verification step, all positions drawn in one pass.

    Position ``j`` of a row is drawn from a copy of its state advanced as if it had said its
    draft's first ``j`` tokens (its key split ``j`` times as the sampler splits it, its
    penalty counts grown by them): what the state is when that position is reached.

    Args:
        logits: ``[B, W + 1, V]`` the forward's logits.
        states: each row's sampler state.
        drafts: each row's draft (empty: the row only takes position 0).
        allowed: ``[B, V]`` grammar masks for position 0, or None; rows with a draft have none.

    Attributes:
        tokens: per row, its accepted draft tokens then the token drawn after them.
        logprobs: per row, each token's logprobs (for rows that asked).
    """

    def __init__(
        self,
        logits: mx.array,
        states: Sequence[SamplerState],
        drafts: Sequence[Sequence[int]],
        allowed: mx.array | None = None,
    ):
        self._states = list(states)
        self._positions: list[list[SamplerState]] = []
        index, masks = [], []
        for row, (state, draft) in enumerate(zip(states, drafts)):
            positions = [state] if not draft else _ahead(state, draft)
            self._positions.append(positions)
            index += [(row, j) for j in range(len(positions))]
            if allowed is not None:
                full = mx.ones_like(allowed[row])
                masks += [allowed[row] if j == 0 else full for j in range(len(positions))]
        rows, cols = (mx.array(list(a)) for a in zip(*index))
        flat = [s for positions in self._positions for s in positions]
        out = sample_async(logits[rows, cols], flat, mx.stack(masks) if masks else None).resolve()
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[TokenLogprobs | None]] = []
        start = 0
        for draft, positions in zip(drafts, self._positions):
            drawn = out.tokens[start : start + len(positions)]
            lps = out.logprobs[start : start + len(positions)]
            start += len(positions)
            kept = next((j for j, (x, y) in enumerate(zip(draft, drawn)) if x != y), len(draft))
            self.tokens.append(drawn[: kept + 1])
            self.logprobs.append(lps[: kept + 1])

    def commit(self, row: int, emitted: int) -> None:
        """Leave row `row`'s state as the sampler would after its first `emitted` tokens."""
        if emitted == 1 and len(self._positions[row]) == 1:
            return  # drawn from the state itself
        done = self._positions[row][emitted - 1]
        state = self._states[row]
        state.key, state.counts, state.num_generated = done.key, done.counts, done.num_generated


def _ahead(state: SamplerState, draft: Sequence[int]) -> list[SamplerState]:
    """Copies of `state` at each position of a verification: after 0, 1, ... len(draft) of the
    draft's tokens. The key advances as `sample_async` advances it (the first half of a split)."""
    positions = []
    key, counts = state.key, state.counts
    for j in range(len(draft) + 1):
        ahead = copy.copy(state)
        ahead.key, ahead.counts, ahead.num_generated = key, counts, state.num_generated + j
        positions.append(ahead)
        if j < len(draft):
            key = mx.random.split(key)[0]
            if counts is not None:
                counts = counts + (mx.arange(state.vocab_size) == draft[j])
    return positions


# -- when a draft is worth verifying -----------------------------------------------------------
SYNC_COST = 0.1
"""A verification step waits for its tokens (no pipelining), in one-token forwards. Assumed, not
measured: what pipelining hides is the host's bookkeeping per step (reading, detokenizing and
emitting every row's tokens), which a timed forward alone does not contain, and which varies
with the rows and the text. The forward itself is measured (:mod:`mlx_mistral.forward_cost`)."""

SLOWDOWN = 0.05
"""How much slower than a plain step any row's expected token rate may get from a verification
step: rows that do not speculate (free text) are never made noticeably slower by those that do."""


def expected_accepted(rate: float, length: int) -> float:
    """Expected accepted tokens of a `length`-token draft whose tokens each hold with `rate`
    (a draft is accepted up to its first miss)."""
    return sum(rate**j for j in range(1, length + 1))


def verification_width(
    draft_lengths: Sequence[int], rates: Sequence[float], cost: Callable[[int], float]
) -> int:
    """How many drafted positions to verify this step (0: a plain step), by a cost model.

    Each row's expected tokens at width `w` are 1 plus its expected accepted draft tokens
    (drafts cut to `w`); the step costs a forward of rows x (w + 1) tokens plus the wait. A
    width is allowed only if no row's expected rate falls more than `SLOWDOWN` below its plain
    step's (a row without a draft gets 1 token either way, so this caps the width by what the
    plain rows can afford); the allowed width with the most tokens per unit of cost wins.

    Args:
        draft_lengths: each row's draft length (0: no draft).
        rates: each row's expected acceptance per drafted token.
        cost: a forward of T tokens (rows x positions) in one-token forwards, as
            :class:`~mlx_mistral.forward_cost.ForwardCost` measures it. Where T tokens cost T
            one-token forwards (a CPU quantized model) no width ever pays.
    """
    rows = len(draft_lengths)
    plain = cost(rows)
    best, best_value = 0, rows / plain
    for width in range(1, max(draft_lengths, default=0) + 1):
        step = cost(rows * (width + 1)) + SYNC_COST
        gains = [expected_accepted(r, min(d, width)) for d, r in zip(draft_lengths, rates)]
        if min(1 + g for g in gains) * plain < (1 - SLOWDOWN) * step:
            continue
        value = (rows + sum(gains)) / step
        if value > best_value:
            best, best_value = width, value
    return best


LOOK_PAUSE = (4, 64)
"""Decode steps without looking for drafts after a look that verified none: first, most."""


class SpeculationSchedule:
    """When a batch looks for drafts, and how wide it verifies what it finds.

    A look waits for the step in flight (the rows' newest tokens must be on the host), which
    costs the batch its pipelining. So after a look that verified nothing the batch skips
    looking for a number of steps that doubles, and where not even one row's sure draft would
    pay (a forward of T tokens costs about T one-token forwards, as MLX's CPU quantized matmul
    does) it stops looking for good.

    Args:
        forward_cost: a forward of T tokens in one-token forwards; None: `measure()` it at the
            first drafts.
        measure: times the loaded model's forward (`forward_cost.forward_cost_of`).
        defer: measure not at the first drafts but when the engine is next idle
            (`measure_if_wanted`), declining drafts until then. Timing takes seconds on a large
            model; a server must not stall a running answer for it (an agent's next turn waited
            2-3 s on the demo model with a 6k-token prompt).
    """

    def __init__(
        self,
        forward_cost: Callable[[int], float] | None,
        measure: Callable[[], Callable[[int], float]],
        *,
        defer: bool = False,
    ):
        self._measure = measure
        self._defer = defer
        self.forward_cost: Callable[[int], float] | None = forward_cost
        self.never_pays = self.forward_cost is not None and _never_pays(self.forward_cost)
        self.wanted = False  # drafts appeared before the cost was known: measure when idle
        self._steps = 0
        self._look_at = 0
        self._pause = LOOK_PAUSE[0]

    def look(self) -> bool:
        """A decode step begins: whether it may look for drafts."""
        self._steps += 1
        return self._steps >= self._look_at and not self.never_pays

    def width(self, draft_lengths: Sequence[int], rates: Sequence[float]) -> int:
        """How many drafted positions to verify (0: decode plainly), by the forward's cost."""
        if self.forward_cost is None:
            if self._defer:
                self.wanted = True
                return 0
            self.forward_cost = self._measure()
            self.never_pays = _never_pays(self.forward_cost)
        width = verification_width(draft_lengths, rates, self.forward_cost)
        if width:
            self._pause = LOOK_PAUSE[0]
        return width

    def measure_if_wanted(self) -> bool:
        """Time the forward now if drafts have been waiting for it (the engine is idle).
        Returns whether it measured."""
        if not self.wanted or self.forward_cost is not None:
            return False
        self.forward_cost = self._measure()
        self.never_pays = _never_pays(self.forward_cost)
        self._look_at = 0
        return True

    def newcomer(self) -> None:
        """A request joined the batch: it may bring a prediction, so the next step looks."""
        self._look_at = 0

    def found_nothing(self) -> None:
        """The look cost the pipeline and verified nothing: skip the next few."""
        self._look_at = self._steps + self._pause
        self._pause = min(LOOK_PAUSE[1], self._pause * 2)


def _never_pays(forward_cost: Callable[[int], float]) -> bool:
    """Not even one row's sure draft would pay: stop looking for good."""
    return verification_width([MAX_DRAFT], [1.0], forward_cost) == 0
