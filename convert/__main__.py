"""`python -m mlx_mistral.convert SRC --out DIR ...`: the converter without the main CLI."""

from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_mistral.convert",
        description="Convert a Hugging Face Mistral checkpoint to MLX weights.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
