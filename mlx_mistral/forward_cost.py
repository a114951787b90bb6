"""What a forward of T tokens costs on the loaded model and device, measured, in one-token forwards.

Speculation trades one forward of ``rows x (width + 1)`` tokens for several of ``rows`` tokens, so
it pays only where wide forwards are cheap, and how cheap depends on the device and the weights:
on a Mac GPU a decode step reads the weights whatever the rows (hundreds of tokens cost little
more than one); on this CPU a float32 forward of 16 rows costs ~1.6x one row, and OpenBLAS makes
4-15 rows cost what 16 do (which `mlx_mistral.padded_linear` turns into padding); MLX's CPU
quantized matmul is scalar code, so there T rows cost about T times one row and speculation can
only lose. Assumed constants were wrong somewhere (an earlier ``1 + T/24`` for this CPU estimated
~2.9x for 8 rows x 9 positions where 1.24x was measured), so :meth:`ForwardCost.measure` times the
model's own forward, padding and all, once per loaded model (:func:`forward_cost_of`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx

from .model import Model

log = logging.getLogger("mlx_mistral.engine")

Announce = Callable[[int], None]
"""Called with a timed forward's token count before it runs: tensor-parallel serving's rank 0
announces it, so that every rank runs the same forward (its all-reduces pair up)."""

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
"""Token counts timed: doublings up to past a full batch's widest verification (32 rows x 8
drafted positions is 288; beyond the last size the cost grows in proportion), and the multiples
of 16 between them where OpenBLAS's padding (16 to 64 rows) makes the cost jump."""

ROUNDS = (2, 12)
"""Rounds over the sizes, fewest and most; each size keeps its fastest time (a shared machine's
interference only adds time, and on a busy 2-core machine a single forward's time varies 2-5x).
Rounds interleave the sizes, so a busy spell slows several of them, not all the samples of one;
the one-token forward, the unit, is timed twice a round. A cheap model gets more rounds."""

LINEAR = 0.9
"""Stop adding sizes once the cost per token has stopped falling twice in a row (each size
costing at least this fraction of the previous size's time scaled by the ratio of the sizes):
the forward is compute-bound from there, and extrapolating in proportion is accurate. Twice,
because one step up can be padding's (OpenBLAS: 4 rows are padded to 16) or noise; a wrong stop
only overestimates wide forwards. A CPU quantized model stops at 4 tokens."""

BUDGET_SECONDS = 1.5
"""No round past the fewest starts after this long."""


class ForwardCost:
    """A forward's cost as a function of its tokens (rows x positions), ``cost(1) == 1``.

    Between timed sizes the cost is interpolated linearly; past the last one it grows in
    proportion to the tokens. Non-decreasing by construction (each size costs at least what
    every smaller one did), so timing noise never makes a wider forward look cheaper.

    Args:
        seconds: timed token counts (1 among them) -> seconds per forward.
    """

    def __init__(self, seconds: Mapping[int, float]):
        if 1 not in seconds:
            raise ValueError("seconds: a one-token forward's time is required (the unit)")
        self.sizes = sorted(seconds)
        self.costs: list[float] = []
        for size in self.sizes:
            relative = seconds[size] / seconds[1]
            self.costs.append(max(relative, self.costs[-1] if self.costs else 1.0))

    def __call__(self, tokens: int) -> float:
        """A forward of `tokens` tokens, in one-token forwards."""
        sizes, costs = self.sizes, self.costs
        if tokens >= sizes[-1]:
            return costs[-1] * tokens / sizes[-1]
        for i in range(1, len(sizes)):
            if tokens <= sizes[i]:
                low, high = sizes[i - 1], sizes[i]
                fraction = (tokens - low) / (high - low)
                return costs[i - 1] + fraction * (costs[i] - costs[i - 1])
        return 1.0  # unreachable: tokens < sizes[-1] lies in some interval (or is <= 1)

    @classmethod
    def measure(
        cls,
        model: Model,
        sizes: Sequence[int] = SIZES,
        *,
        rounds: tuple[int, int] = ROUNDS,
        budget_seconds: float = BUDGET_SECONDS,
        announce: Announce | None = None,
    ) -> ForwardCost:
        """Time `model`'s forward (every position projected, as a verification projects them)
        on one row of each size with a fresh cache, after a warm-up; see the module constants
        for the rounds and when sizes stop being added. `announce` is called before each."""

        def forward(tokens: int) -> float:
            if announce is not None:
                announce(tokens)
            cache = model.make_cache()
            start = time.perf_counter()
            h = model.hidden_states(mx.zeros((1, tokens), dtype=mx.int32), cache)
            mx.eval(model.project(h))
            return time.perf_counter() - start

        forward(1)  # the first call may allocate buffers
        began = time.perf_counter()
        wider = sorted(set(sizes) - {1})
        times: dict[int, list[float]] = {1: []}
        for round_ in range(rounds[1]):
            if round_ >= rounds[0] and time.perf_counter() - began > budget_seconds:
                break
            times[1].append(forward(1))
            linear_steps, previous = 0, 1
            for i, size in enumerate(wider):
                times.setdefault(size, []).append(forward(size))
                if round_ == 0:
                    proportional = min(times[previous]) * size / previous
                    linear = min(times[size]) >= LINEAR * proportional
                    linear_steps, previous = (linear_steps + 1 if linear else 0), size
                    if linear_steps >= 2:
                        wider = wider[: i + 1]
                        break
            times[1].append(forward(1))
        return cls({size: min(t) for size, t in times.items()})

    def __repr__(self) -> str:
        pairs = ", ".join(f"{s}: {c:.2f}" for s, c in zip(self.sizes, self.costs))
        return f"ForwardCost({{{pairs}}})"


def flat_cost(tokens: int) -> float:
    """A forward of any width costing what one token's does (`--speculation always`; tests pin
    it so that whether drafts are verified does not turn on how busy the machine is)."""
    return 1.0


# One measurement per loaded model, whichever generator asks (the engine, the Python API and
# the benchmarks make several over the same weights). Keyed by id: an mlx Module is a dict,
# so it cannot be hashed; the weak reference tells a reused id from the model measured.
_measured: dict[int, tuple[weakref.ref, ForwardCost]] = {}


def forward_cost_of(model: Model, announce: Announce | None = None) -> ForwardCost:
    """`model`'s measured forward cost, timed the first time it is asked for (a one-off stall
    of the engine: ~0.1-10 s, the most on a busy CPU; logged)."""
    for key in [k for k, (ref, _) in _measured.items() if ref() is None]:
        del _measured[key]  # models since unloaded
    entry = _measured.get(id(model))
    if entry is None or entry[0]() is not model:
        started = time.perf_counter()
        entry = (weakref.ref(model), ForwardCost.measure(model, announce=announce))
        _measured[id(model)] = entry
        # The widest forwards' buffers (the logits of 256 positions: 32 MiB) go back to the
        # system, not to MLX's pool, where a script would keep them for good (a server empties
        # the pool whenever it falls idle).
        mx.clear_cache()
        log.info(
            "speculation: measured the forward's cost in %.1f s: %r",
            time.perf_counter() - started,
            entry[1],
        )
    return entry[1]
