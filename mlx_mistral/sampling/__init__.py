"""Sampling: logits of a batch -> one token per sequence, each with its own request's parameters.

- :mod:`~mlx_mistral.sampling.params`: :class:`SamplingParams`, its fields declared once
  (defaults, ranges, other names), validated at the boundary;
- :mod:`~mlx_mistral.sampling.filters`: pure logit filters over ``[batch, vocab]``;
- :mod:`~mlx_mistral.sampling.sampler`: per-sequence state and the batched draw.

Import from those modules; this package re-exports nothing.
"""
