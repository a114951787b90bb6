"""The `mlx-mistral` command: serve, convert, generate, chat, service.

The CLI is the one place that stitches the layers together, so it imports the server and the
converter lazily (inside their subcommands); the library itself never imports them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .device import DTYPE_HELP, DTYPES, check_requested_dtype
from .errors import InvalidRequestError, MistralError
from .sampling.params import FIELDS, SamplingParams

# Defaults of the terminal's own: a little variety in a chat, and an answer that ends.
CLI_DEFAULTS = {"temperature": 0.7, "max_tokens": 256}


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per sampling field declared for the command line (--top-p for top_p, ...)."""
    for field in FIELDS:
        if field.cli:
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                type=int if field.kind == "integer" else float,
                default=CLI_DEFAULTS.get(field.name, field.default),
                help=f"{field.doc} In {field.bounds}; default: %(default)s.",
            )


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local checkpoint directory or Hugging Face repo id (default: "
        "Mistral-7B-Instruct-v0.2 if its weights are on this machine, else the bundled demo model)",
    )


def _dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)


def _load(name: str | None, dtype: str | None = None):
    from .demo import default_model
    from .loader import load

    if name is None:
        name, is_demo = default_model()
        if is_demo:
            print(
                "mlx-mistral: Mistral-7B-Instruct-v0.2 not found locally; "
                "using the bundled demo model",
                file=sys.stderr,
            )
    return load(name, dtype=dtype)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, validated before the (slow) model load.

    Raises:
        InvalidRequestError: a flag's value is out of its field's range, naming the field.
    """
    return SamplingParams(**{f.name: getattr(args, f.name) for f in FIELDS if f.cli})


def _checked_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; bytes that were not UTF-8 (which Python decodes from argv
    and stdin as lone surrogates) are a one-line error, not a tokenizer's traceback.

    Raises:
        InvalidRequestError: naming `what` and the first bad byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        byte = f"byte 0x{bad - 0xDC00:02X}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise InvalidRequestError(
            f"{what} is not valid UTF-8 text ({byte} at character {exc.start})", param=what
        ) from None
    return text


def run_generate(args: argparse.Namespace) -> int:
    from .generation import stream_generate

    _checked_text(args.prompt, "--prompt")
    if args.system is not None:
        _checked_text(args.system, "--system")
    params = _sampling_params(args)
    check_requested_dtype(args.dtype)
    model, tokenizer = _load(args.model, args.dtype)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    if args.system and not args.raw:
        prompt.insert(0, {"role": "system", "content": args.system})
    for chunk in stream_generate(model, tokenizer, prompt, params=params):
        print(chunk.text, end="", flush=True)
    print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .generation import stream_generate

    if args.system is not None:
        _checked_text(args.system, "--system")
    params = _sampling_params(args)
    check_requested_dtype(args.dtype)
    model, tokenizer = _load(args.model, args.dtype)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D quits, /reset starts over.", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach `_checked_text`
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        try:
            messages.append({"role": "user", "content": _checked_text(line, "the message")})
        except InvalidRequestError as exc:  # the conversation goes on: type it again
            print(f"mlx-mistral: error: {exc.message}", file=sys.stderr)
            continue
        answer = []
        for chunk in stream_generate(model, tokenizer, messages, params=params):
            print(chunk.text, end="", flush=True)
            answer.append(chunk.text)
        print()
        messages.append({"role": "assistant", "content": "".join(answer).strip()})


def run_service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import service

    files = service.ServiceFiles(Path.home(), args.manager or service.default_manager())
    if args.action == "install":
        serve_args = [a for a in args.serve_args if a != "--"]
        # The flags are checked as `serve` checks them, now rather than at the next login.
        build_parser().parse_args(["serve", *serve_args])
        lines = service.install(serve_args, files, start=not args.no_start)
        code = 0
    elif args.action == "uninstall":
        lines, code = service.uninstall(files), 0
    else:
        code, lines = service.status(files)
    print("\n".join(lines))
    return code


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes get one line on stderr (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="mlx-mistral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible chat API")
    from mlx_mistral.server.cli import add_arguments as add_serve_arguments

    add_serve_arguments(serve)

    convert = sub.add_parser("convert", help="convert a Hugging Face checkpoint to MLX weights")
    from mlx_mistral.convert.cli import add_arguments as add_convert_arguments

    add_convert_arguments(convert)

    gen = sub.add_parser("generate", help="generate an answer to one prompt")
    _model_argument(gen)
    _dtype_argument(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="a system message")
    gen.add_argument(
        "--raw", action="store_true", help="send the prompt as raw text, no chat format"
    )
    _add_sampling_arguments(gen)

    chat = sub.add_parser("chat", help="chat in the terminal (multi-turn)")
    _model_argument(chat)
    _dtype_argument(chat)
    chat.add_argument("--system", default=None, help="a system message")
    _add_sampling_arguments(chat)

    svc = sub.add_parser(
        "service", help="run the server in the background from login (LaunchAgent, systemd)"
    )
    actions = svc.add_subparsers(dest="action", required=True)
    install = actions.add_parser(
        "install", help="write the service and start it: `service install -- [serve flags]`"
    )
    install.add_argument(
        "--no-start", action="store_true", help="write the definition, do not load it"
    )
    install.add_argument("serve_args", nargs=argparse.REMAINDER, help="flags for `serve`")
    actions.add_parser("uninstall", help="stop the service and remove it")
    actions.add_parser("status", help="is it installed, loaded, and answering /health?")
    for action in actions.choices.values():
        action.add_argument(
            "--manager",
            choices=["launchd", "systemd"],
            default=None,
            help="launchd (macOS's default) or systemd (elsewhere)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from mlx_mistral.server.cli import run as run_serve  # lazy: see module docstring

            return run_serve(args)
        if args.command == "convert":
            from mlx_mistral.convert.cli import run as run_convert

            return run_convert(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "service":
            return run_service(args)
        return run_chat(args)
    except MistralError as exc:
        print(f"mlx-mistral: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
