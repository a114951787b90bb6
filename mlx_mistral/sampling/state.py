"""One sequence's sampling state: its parameters, its seeded RNG key and its token history.

The sampler (:mod:`mlx_mistral.sampling.sampler`) reads a batch of these and advances each one
per step; a seeded sequence's key depends on its seed and choice index alone, so it draws the same
tokens alone or in any batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import mlx.core as mx

from mlx_mistral.sampling.params import SamplingParams


def _choice_seed(seed: int, index: int) -> int:
    """Seed of choice ``index`` of a seeded request: choice 0 keeps the seed itself, so n=1 and
    the first of n choices agree; the others get well-mixed, distinct seeds (splitmix64)."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & (2**63 - 1)


class SamplerState:
    """One sequence's sampling state: params, RNG key and token history, kept as MLX arrays.

    Args:
        params: the request's validated parameters.
        prompt_ids: the prompt's token ids (for repetition_penalty).
        vocab_size: the model's vocabulary size (logits width).
        choice: index of this sequence among the request's ``n`` choices; seeded requests get
            distinct, reproducible streams per choice.

    Raises:
        InvalidRequestError: a logit_bias id is not in the vocabulary.
        ValueError: a prompt id is outside ``[0, vocab_size)`` or ``choice`` outside ``[0, n)``.

    Example:
        >>> state = SamplerState(SamplingParams(seed=7), [1, 733], vocab_size=32000)
        >>> state.seed
        7
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int, *, choice: int = 0
    ):
        params.validate_for_vocab(vocab_size)
        if not 0 <= choice < params.n:
            raise ValueError(f"choice must be in [0, {params.n - 1}], got {choice}.")
        if prompt_ids and not (0 <= min(prompt_ids) and max(prompt_ids) < vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size - 1}].")
        self.params = params
        self.vocab_size = vocab_size
        self.choice = choice
        # An unseeded request still gets its own stream; the drawn seed is kept for logs/replay.
        base = params.seed if params.seed is not None else secrets.randbits(63)
        self.seed = _choice_seed(base, choice) if params.seed is not None else base
        self.key = mx.random.key(self.seed)
        self.num_generated = 0
        self.counts: mx.array | None = None
        self.prompt_mask: mx.array | None = None
        if params.uses_penalties:
            self.counts = mx.zeros((vocab_size,), dtype=mx.float32)
            mask = mx.zeros((vocab_size,), dtype=mx.bool_)
            if prompt_ids:
                mask[mx.array(list(prompt_ids), dtype=mx.int32)] = True
            self.prompt_mask = mask

    @classmethod
    def for_choices(
        cls, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int
    ) -> list[SamplerState]:
        """The ``params.n`` states of one request, choice 0 first."""
        return [cls(params, prompt_ids, vocab_size, choice=i) for i in range(params.n)]

    def record(self, token: int) -> None:
        """Add a token that entered the sequence without the sampler (e.g. forced by a grammar).

        The sampler records the tokens it chooses itself; do not record those again.
        """
        self.num_generated += 1
        if self.counts is not None:
            self.counts = self.counts + (mx.arange(self.vocab_size) == token)
