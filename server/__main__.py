"""`python -m mlx_mistral.server [options]`: the same as `mlx-mistral serve [options]`."""

from __future__ import annotations

import sys

from mlx_mistral.cli import OneLineErrors

from .cli import add_arguments, run


def main() -> int:
    parser = OneLineErrors(
        prog="python -m mlx_mistral.server", description="Serve the OpenAI-compatible chat API."
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
