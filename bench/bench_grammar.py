"""Per-token grammar mask cost at vocab 32000: llguidance vs xgrammar vs outlines-core.

Each engine gets the real Mistral v0.2 vocabulary (mistral-common's tokenizer.model.v1) and the
JSON schema of a typical tool (string, number, integer, enum, array fields). We walk one valid
answer token by token: at every step the engine computes the allowed-token mask, then consumes
the answer's next token. Reported: grammar compile time, and the per-token mask time (mean,
median, p90, max). For llguidance (the engine the package uses) we also time the conversion of
its bitmask into the MLX bool array the sampler takes, and the package's own grammars (a forced
tool call; free text in `tool_choice: "auto"`).

Run:  python bench/bench_grammar.py             (prints the table and rewrites the `grammar`
                                                section of docs/benchmarks.md)
      python bench/bench_grammar.py --no-write  (prints only)

xgrammar and outlines-core are not dependencies of the package: install them to compare
(`pip install xgrammar outlines-core`); an engine that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mistral_common
import numpy as np

from mlx_mistral.tokenizer import Tokenizer

# Sibling modules: `python bench/NAME.py` puts bench/ first on sys.path.
from report import write_section

TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
REPEATS = 5  # walks of the answer per engine; the statistics pool every step of every walk

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "threshold": {"type": "number"},
        "fields": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}
ANSWER = {
    "location": "San Francisco, California, USA",
    "unit": "fahrenheit",
    "days": 7,
    "threshold": -3.75,
    "fields": ["temperature", "wind speed", "precipitation probability"],
}


def answer_ids(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no dummy-prefix space (as the grammar sees it from byte 0)."""
    return tok.encode("\n" + text)[2:]  # "▁", "<0x0A>" first; no piece spans the newline


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.machine()}",
        **{pkg: ver(pkg) for pkg in ("llguidance", "xgrammar", "outlines-core", "mlx", "numpy")},
    }


# -- engines: each returns (compile seconds, per-step mask seconds) -------------------------------
def walk(
    compute_mask: Callable[[], Any], consume: Callable[[int], Any], ids: list[int]
) -> list[float]:
    times = []
    for t in ids:
        start = time.perf_counter()
        compute_mask()
        times.append(time.perf_counter() - start)
        consume(t)
    return times


def bench_llguidance(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance

    from mlx_mistral.tools.grammar import make_llg_tokenizer

    lltok = make_llg_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, overrides={"whitespace_flexible": False}
    )
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    times: list[float] = []
    for _ in range(REPEATS):
        matcher.reset()
        times += walk(matcher.compute_bitmask, matcher.consume_token, ids)
        assert not matcher.is_error(), matcher.get_error()
        assert matcher.is_accepting()
    return compile_s, times


def bench_xgrammar(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(
        pieces,
        vocab_type=xgr.VocabType.BYTE_FALLBACK,
        stop_token_ids=[tok.eos_id],
        add_prefix_space=True,
    )
    start = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    times: list[float] = []
    for _ in range(REPEATS):
        matcher.reset()
        times += walk(lambda: matcher.fill_next_token_bitmask(bitmask), matcher.accept_token, ids)
        assert matcher.is_terminated() or matcher.accept_token(tok.eos_id)
    return compile_s, times


def bench_outlines_core(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    table = tok.token_bytes()
    special = tok.special_ids
    vocab: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        if i not in special:
            vocab.setdefault(b, []).append(i)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    vocabulary = Vocabulary(tok.eos_id, vocab)
    start = time.perf_counter()
    index = Index(regex, vocabulary)  # the whole-vocabulary automaton, up front
    compile_s = time.perf_counter() - start
    guide = Guide(index)
    mask = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    times: list[float] = []
    for _ in range(REPEATS):
        guide.reset()
        times += walk(
            lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4), guide.advance, ids
        )
    return compile_s, times


def bench_mask_to_mlx(tok: Tokenizer, ids: list[int]) -> list[float]:
    """llguidance bitmask bytes -> numpy unpackbits -> mx.array bool [vocab], per step."""
    import llguidance
    import mlx.core as mx

    from mlx_mistral.tools.grammar import bitmask_to_mlx, make_llg_tokenizer

    matcher = llguidance.LLMatcher(
        make_llg_tokenizer(tok),
        llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, overrides={"whitespace_flexible": False}
        ),
        log_level=0,
    )
    times = []
    for t in ids * REPEATS:
        if matcher.is_accepting() and t == ids[0]:
            matcher.reset()
        raw = matcher.compute_bitmask()
        start = time.perf_counter()
        mx.eval(bitmask_to_mlx(raw, tok.vocab_size))
        times.append(time.perf_counter() - start)
        matcher.consume_token(t)
    return times


def bench_package_grammars(tok: Tokenizer) -> dict[str, list[float]]:
    """The package's own constraints, driven through `TokenConstraint` (mask -> MLX included)."""
    import mlx.core as mx

    from mlx_mistral.tools.grammar import make_constraints
    from mlx_mistral.tools.validation import parse_structured_request

    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
            },
        },
    ]
    out: dict[str, list[float]] = {}
    cases = {
        "forced tool call (tool_choice required, 2 tools)": "required",
        "free text under tool_choice auto": "auto",
    }
    for label, choice in cases.items():
        spec = parse_structured_request(tools=tools, tool_choice=choice)
        (constraint,) = make_constraints(spec, tok, 1)
        if choice == "required":
            text = " [TOOL_CALLS] " + json.dumps(
                [{"name": "get_weather", "arguments": ANSWER, "id": constraint.call_ids[0]}],
                separators=(", ", ": "),
            )
        else:
            text = " The forecast for San Francisco is sunny all week, with light wind. " * 3
        ids = tok.encode(text.lstrip(" "))  # SentencePiece's dummy prefix gives back the space
        times = []
        for t in ids:
            start = time.perf_counter()
            mx.eval(constraint.allowed_mask())
            times.append(time.perf_counter() - start)
            constraint.advance(t)
        if choice == "required":
            assert constraint.forced_finish_reason() == "tool_calls"
        out[label] = times
    return out


# -- report ---------------------------------------------------------------------------------------
def stats_us(times: list[float]) -> tuple[float, float, float, float]:
    us = sorted(t * 1e6 for t in times)
    return (statistics.fmean(us), us[len(us) // 2], us[int(len(us) * 0.9)], us[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    tok = Tokenizer.from_file(TOKENIZER)
    text = json.dumps(ANSWER, separators=(",", ":"))
    ids = answer_ids(tok, text)
    assert tok.decode(ids) == text
    info = machine()

    rows = []
    for name, fn in (
        ("llguidance", bench_llguidance),
        ("xgrammar", bench_xgrammar),
        ("outlines-core", bench_outlines_core),
    ):
        if info[name] == "not installed":
            rows.append(f"| {name} | not installed | | | | |")
            continue
        compile_s, times = fn(tok, ids)
        mean, p50, p90, mx_ = stats_us(times)
        rows.append(
            f"| {name} {info[name]} | {compile_s * 1e3:,.1f} ms | {mean:,.0f} | {p50:,.0f} "
            f"| {p90:,.0f} | {mx_:,.0f} |"
        )
    conv = stats_us(bench_mask_to_mlx(tok, ids))
    pkg_rows = []
    for label, times in bench_package_grammars(tok).items():
        mean, p50, p90, mx_ = stats_us(times)
        pkg_rows.append(
            f"| {label} | {len(times)} | {mean:,.0f} | {p50:,.0f} | {p90:,.0f} | {mx_:,.0f} |"
        )

    table = "\n".join(
        [
            "| engine | compile (schema + vocab) | mask mean µs | p50 µs | p90 µs | max µs |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    pkg_table = "\n".join(
        [
            "| grammar (llguidance, incl. bitmask -> MLX) | tokens | mean µs | p50 µs | p90 µs "
            "| max µs |",
            "|---|---|---|---|---|---|",
            *pkg_rows,
        ]
    )
    machine_text = (
        f"{info['cpu']}, {info['cores']} cores, {info['os']}, Python {info['python']}; "
        f"llguidance {info['llguidance']}, xgrammar {info['xgrammar']}, "
        f"outlines-core {info['outlines-core']}, mlx {info['mlx']}, numpy {info['numpy']}"
    )
    print(f"Machine: {machine_text}")
    print(f"Answer: {len(ids)} tokens x {REPEATS} walks\n")
    print(table)
    print(
        f"\nllguidance bitmask -> MLX bool[32000]: mean {conv[0]:.0f} µs, p50 {conv[1]:.0f} µs, "
        f"max {conv[3]:.0f} µs\n"
    )
    print(pkg_table)
    if not args.no_write:
        write_section("grammar", render_doc(machine_text, len(ids), table, conv, pkg_table))
        print("\nwrote the grammar section of docs/benchmarks.md")


def render_doc(
    machine_text: str, n_ids: int, table: str, conv: tuple[float, ...], pkg_table: str
) -> str:
    return DOC_TEMPLATE.format(
        machine=machine_text,
        n_ids=n_ids,
        repeats=REPEATS,
        table=table,
        conv_mean=conv[0],
        conv_p50=conv[1],
        conv_max=conv[3],
        pkg_table=pkg_table,
        schema=json.dumps(SCHEMA, indent=2),
    )


DOC_TEMPLATE = """## Grammar engine: per-token mask cost at vocab 32000

Written by `python bench/bench_grammar.py` (numbers below are from its last run).

Machine: {machine}.

Vocabulary: the real Mistral-7B-Instruct-v0.2 SentencePiece model (32000 tokens, byte fallback),
from mistral-common's `tokenizer.model.v1`. Grammar: the JSON schema of a typical tool (below).
Each engine walks one valid answer ({n_ids} tokens) {repeats} times; at every step it computes the
mask of allowed next tokens (timed), then consumes the answer's next token. Compact JSON (no free
whitespace) for all three.

{table}

"compile" is what a request with a new schema pays before its first token (the per-tokenizer
preparation each engine does once, at load, is not included; xgrammar compiles on one thread):
llguidance builds a parser and computes masks lazily; xgrammar pre-computes per-schema token
caches; outlines-core builds the automaton of the whole vocabulary against the schema's regex
up front (then each mask is a table lookup). Masks are computed on the calling thread.

Turning llguidance's bitmask into the MLX `bool[32000]` the sampler takes (numpy `unpackbits`,
then `mx.array`): mean {conv_mean:.0f} µs, p50 {conv_p50:.0f} µs, max {conv_max:.0f} µs per step.

The package's own grammars through its `TokenConstraint` (mask computation + conversion):

{pkg_table}

### Decision: llguidance

- Per-token cost does not separate the three: each computes a 32000-token mask in microseconds
  (tens at worst) on this CPU, and the conversion to an MLX array costs about as much again. A
  decode step of the 7B model takes tens of milliseconds on a Mac GPU and far longer on this
  CPU, so the mask is well under 1% of a step for any of them (xgrammar's cached masks were the
  fastest in this walk; the difference is a few microseconds).
- What does separate them is the cost before the first token, paid per request because tools
  and response formats change from request to request: llguidance builds its parser in under a
  millisecond and computes masks lazily; xgrammar pre-computes per-schema token caches (several
  milliseconds); outlines-core builds an automaton of the whole vocabulary against the schema's
  regex (tens of milliseconds, growing with the schema), and being regex-only it cannot express
  recursive schemas at all.
- llguidance's Lark dialect says what the package needs directly: inline `%json {{...}}` schemas
  (one per tool), lazy lexemes and regex negation (`&`, `~`) for "free text that never contains
  `[TOOL_CALLS]`, or text then a call" under `tool_choice: "auto"` and `"none"`, and configurable
  JSON separators and escapes, so generated calls are byte for byte what `mlx_mistral.chat`
  renders back into the next prompt. It reports schema features it cannot compile at request
  time, which validation turns into a 400 naming the field.
- It is one small self-contained wheel (installing xgrammar here also brought apache-tvm-ffi and
  triton), maintained and widely deployed (llama.cpp, vLLM, SGLang, OpenAI's structured outputs).

Tool schema used:

```json
{schema}
```
"""


if __name__ == "__main__":
    main()
