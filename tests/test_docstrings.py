"""The examples in the public API's docstrings run (on the bundled demo model)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mlx_mistral",
    "mlx_mistral.loader",
    "mlx_mistral.generation",
    "mlx_mistral.engine",
    "mlx_mistral.model",
    "mlx_mistral.sampling.sampler",
    "mlx_mistral.sampling.state",
    "mlx_mistral.sampling.params",
    "mlx_mistral.stopping",
    "mlx_mistral.tokenizer",
    "mlx_mistral.chat",
    "mlx_mistral.tools.format",
    "mlx_mistral.tools.spec",
    "mlx_mistral.tools.validation",
    "mlx_mistral.tools.grammar",
    "mlx_mistral.tools.parsing",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
