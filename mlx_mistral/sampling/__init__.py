"""Sampling: logits of a batch -> one token per sequence, each with its own request's parameters.

- :mod:`~mlx_mistral.sampling.params`: :class:`SamplingParams`, its fields declared once
  (defaults, ranges, other names), validated at the boundary;
- :mod:`~mlx_mistral.sampling.filters`: pure logit filters over ``[batch, vocab]``;
- :mod:`~mlx_mistral.sampling.state`: one sequence's seeded RNG key and token history;
- :mod:`~mlx_mistral.sampling.sampler`: the batched draw, one token per sequence per step.

Import from those modules; this package re-exports nothing.
"""
