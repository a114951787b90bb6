"""`python -m mlx_mistral.convert SRC --out DIR ...`: the converter without the main CLI."""

from __future__ import annotations

import sys

from mlx_mistral.cli import OneLineErrors

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(
        prog="python -m mlx_mistral.convert",
        description="Convert a Hugging Face Mistral checkpoint to MLX weights.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
