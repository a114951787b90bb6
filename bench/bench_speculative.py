"""Speculative decoding in the batch: decode tok/s with and without drafts, acceptance beside.

    python bench/bench_speculative.py [--model 150m|tiny|PATH] [--tokens N] [--repeats N]

The model has random weights, so the "edit" workload is built from its own greedy answer: the
prediction is that answer (perfect), or it with one token in 20 changed; "no draft" runs with
prompt lookup on and no prediction (a random model's text rarely repeats its prompt, so this
measures what trying costs). Every speculative run is checked token for token against the plain
run. Batch 8: eight streams decoded together (four with a perfect prediction; all eight
with prompt lookup; all eight with a perfect prediction), against the same eight without. The
aggregate rate counts every token until the last stream ends. Speeds are medians of
`--repeats` rounds, the plain and speculative runs alternating. Results go to the
`speculative` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx_mistral  # first: its BLAS preload precedes mlx

# checkpoints and report are sibling modules: `python bench/NAME.py` puts bench/ on sys.path.
from checkpoints import write_random_checkpoint
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.sampling.params import SamplingParams
from report import machine, write_section

TOPICS = ["a lighthouse", "a river", "a market", "a violin", "the moon", "a bakery", "snow", "ink"]


def decode(model, tok, prompts, params, *, predictions=None, prompt_lookup=False):
    """Run the prompts together; returns (tokens per prompt, decode tok/s, last events).

    Decode time starts once every stream has its first token (prefill excluded)."""
    generator = BatchGenerator(model, tok, prompt_lookup=prompt_lookup)
    uids = [
        generator.add(p, params, prediction=(predictions or [None] * len(prompts))[i])
        for i, p in enumerate(prompts)
    ]
    tokens = {uid: [] for uid in uids}
    last = {}
    start = None
    while generator.has_work:
        for event in generator.step():
            if event.token is not None:
                tokens[event.uid].append(event.token)
            last[event.uid] = event
        if start is None and all(tokens[u] for u in uids):
            start, first = time.perf_counter(), sum(len(t) for t in tokens.values())
    elapsed = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values()) - first
    return [tokens[u] for u in uids], generated / elapsed, [last[u] for u in uids]


def acceptance(events) -> str:
    accepted = sum(e.accepted_prediction_tokens for e in events)
    proposed = accepted + sum(e.rejected_prediction_tokens for e in events)
    return f"{accepted}/{proposed} ({accepted / proposed:.0%})" if proposed else "0/0"


def edit(tokens: list[int], every: int) -> list[int]:
    return [(t + 7) % 32000 if i % every == every // 2 else t for i, t in enumerate(tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="150m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="run the workloads whose name has this text; no docs update")
    args = ap.parse_args()
    path = Path(args.model)
    if not path.exists():
        path = write_random_checkpoint(
            Path(tempfile.gettempdir()) / f"mlx-mistral-bench-{args.model}", args.model
        )
    model, tok = mlx_mistral.load(path)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, logit_bias={tok.eos_id: -100})
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write about {t}."}]) for t in TOPICS]
    answers, _, _ = decode(model, tok, prompts, params)  # the model's own greedy answers
    one = prompts[:1]
    cases = {
        "perfect prediction": dict(predictions=[answers[0]]),
        "1 token in 20 changed": dict(predictions=[edit(answers[0], 20)]),
        "no usable draft (prompt lookup on)": dict(prompt_lookup=True),
    }
    half = [a if i % 2 == 0 else None for i, a in enumerate(answers)]
    busy = {
        "8 streams, 4 with a perfect prediction": dict(predictions=half),
        "8 streams, prompt lookup on (no usable draft)": dict(predictions=None, prompt_lookup=True),
        "8 streams, all with a perfect prediction": dict(predictions=answers),
    }
    rows = []
    for name, kwargs in [*cases.items(), *busy.items()]:
        if args.only and args.only not in name:
            continue
        batch = prompts if name in busy else one
        base, spec, last = [], [], None
        for _ in range(args.repeats):
            out, tps, _ = decode(model, tok, batch, params)
            base.append(tps)
            spec_out, tps, last = decode(model, tok, batch, params, **kwargs)
            spec.append(tps)
            assert spec_out == out, f"{name}: speculation changed the output"
        b, s = statistics.median(base), statistics.median(spec)
        rows.append((name, b, s, s / b, acceptance(last)))
        print(f"{name}: {b:.1f} -> {s:.1f} tok/s ({s / b:.2f}x), accepted {acceptance(last)}")
    if not args.only:
        render(rows, args)


def render(rows, args) -> None:
    lines = [
        "## Speculative decoding in the batch (prompt lookup, Predicted Outputs)",
        "",
        f"`python bench/bench_speculative.py --model {args.model} --tokens {args.tokens} "
        f"--repeats {args.repeats}` on {machine()}.",
        "",
        "Greedy decode of the model's own answer (random weights; see the script's docstring).",
        "Every speculative run gave the plain run's tokens exactly. Draft length at most 8; the "
        "cost model (`mlx_mistral.speculative.verification_width`) picks each step's width.",
        "",
        "| workload | plain tok/s | speculative tok/s | speed-up | accepted / proposed |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {b:.1f} | {s:.1f} | {r:.2f}x | {a} |" for n, b, s, r, a in rows]
    write_section("speculative", "\n".join(lines))


if __name__ == "__main__":
    main()
