"""The `convert` subcommand: arguments, one-line errors, exit codes (0 ok, 1 error, 2 usage)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_mistral.checkpoint_files import INDEX_FILE
from mlx_mistral.device import DTYPES
from mlx_mistral.errors import ConversionError, MistralError

from .pipeline import DEFAULT_MAX_SHARD_BYTES, convert
from .quantize import SUPPORTED_GROUP_SIZES

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """A byte count from "5GB" (10^9, as Hugging Face counts), "4GiB" (2^30), "500MB", "1024".

    Raises:
        argparse.ArgumentTypeError: not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 5GB, 500MB, 4GiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the converter's arguments to `parser` (the `convert` subcommand or `-m` entry)."""
    parser.add_argument("src", metavar="SRC", help="local Hugging Face checkpoint or repo id")
    parser.add_argument(
        "--out",
        "-o",
        required=True,
        type=Path,
        metavar="DIR",
        help="output directory (must not exist unless --force)",
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        metavar="|".join(DTYPES),
        help="dtype of float weights, scales and biases (default: float16)",
    )
    parser.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="quantize Linear and Embedding weights (mlx-lm's affine format)",
    )
    parser.add_argument(
        "--bits",
        type=int,
        default=None,
        metavar="4|8",
        help="bits per quantized weight (default: 4; needs -q)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="|".join(map(str, SUPPORTED_GROUP_SIZES)),
        help="weights per quantization group (default: 64; needs -q)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace DIR if it holds only an earlier conversion (once the new one is complete)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        metavar="SIZE",
        help="largest safetensors shard (default: 5GiB)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")  # fmt: skip


def _summary(out: Path) -> str:
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    shards = len(set(index["weight_map"].values()))
    q = config.get("quantization")
    kind = f"{q['bits']}-bit, group size {q['group_size']}" if q else "float"
    gib = index["metadata"]["total_size"] / 2**30
    return f"wrote {out} ({kind}, {gib:.2f} GiB in {shards} shard{'s' * (shards > 1)})"


class Terminated(BaseException):
    """SIGTERM, raised where the converter stands so that its clean-up runs, as Ctrl-C's does."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while converting (the default would skip the clean-up and
    leave a temporary directory as large as the model)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a library caller keeps its own
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; print one line on error, never a traceback.

    Returns:
        0 on success, 1 when the conversion is refused or fails, 130 when interrupted (SIGINT),
        143 when terminated (SIGTERM); interrupted or terminated, it leaves nothing behind.
    """
    with _sigterm_raises():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if not args.quantize and (args.bits is not None or args.group_size is not None):
            raise ConversionError("--bits and --group-size apply only with -q/--quantize")
        out = convert(
            args.src,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            bits=4 if args.bits is None else args.bits,
            group_size=64 if args.group_size is None else args.group_size,
            force=args.force,
            max_shard_bytes=args.max_shard_size,
            progress=getattr(args, "progress", True),
        )
    except MistralError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated; no output was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(_summary(out))
    return 0
