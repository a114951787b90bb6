"""Speculative decoding in the batch: decode tok/s with and without drafts, acceptance beside,
and mlx-lm on the same checkpoint and prompt.

    python bench/bench_speculative.py [--model 150m|tiny|7b4|PATH] [--layers N] [--tokens N]
                                      [--repeats N] [--draft tiny|PATH]

The model has random weights, so the "edit" workload is built from its own greedy answer: the
prediction is that answer (perfect), or it with one token in 20 changed; "no draft" runs with
prompt lookup on and no prediction (a random model's text rarely repeats its prompt, so this
measures what trying costs). Every speculative run is checked token for token against the plain
run. Batch 8: eight streams decoded together (four with a perfect prediction; all eight
with prompt lookup; all eight with a perfect prediction), against the same eight without. The
aggregate rate counts every token until the last stream ends.

The peer: mlx-lm 0.32 has no prompt lookup and no Predicted Outputs; its speculation needs a
draft model sharing the tokenizer, so it runs plain (`stream_generate`) and with `--draft` (the
tiny random checkpoint by default: same tokenizer, no trained knowledge, so its drafts are
rarely accepted) and `num_draft_tokens` 3 (its CLI's and server's default), in its own process
with our OpenBLAS. Its rate is timed as ours is: tokens after the first over the time since it.

Speeds are medians of `--repeats` rounds; in a round our plain and speculative runs alternate
per workload, and our side and mlx-lm's go in turn, the order swapped from round to round.
`--model 7b4`: Mistral-7B's dimensions, 4-bit, with `--layers` of its 32 layers (a CPU decodes
8 of them at ~0.5 tok/s); only the batch-1 workloads run. Results go to the `speculative`
section of docs/benchmarks.md (`speculative-7b4` for the 7B shape).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Sibling modules: `python bench/NAME.py` puts bench/ first on sys.path. None imports mlx, so
# the mlx-lm worker below loads it with mlx-lm's own environment.
from checkpoints import write_random_checkpoint
from report import machine, write_section
from workers import in_turn, mlx_lm_blas_env, run_worker

TOPICS = ["a lighthouse", "a river", "a market", "a violin", "the moon", "a bakery", "snow", "ink"]
# name -> (checkpoints.SHAPES key, bits)
MODELS = {"tiny": ("tiny", None), "150m": ("150m", None), "7b4": ("7b", 4)}
NUM_DRAFT_TOKENS = 3  # mlx-lm's default (mlx_lm.generate --num-draft-tokens, mlx_lm.server)
EOS = 2


def checkpoint(name: str, layers: int | None) -> Path:
    if Path(name).exists():
        return Path(name)
    shape, bits = MODELS[name]
    suffix = f"-{layers}layers" if layers else ""
    out = Path(tempfile.gettempdir()) / f"mlx-mistral-bench-{name}{suffix}"
    return write_random_checkpoint(out, shape, layers=layers, bits=bits)


# ----------------------------------------------------------------------------- ours
def decode(model, tok, prompts, params, *, predictions=None, prompt_lookup=False):
    """Run the prompts together; returns (tokens per prompt, decode tok/s, last events).

    Decode time starts once every stream has its first token (prefill excluded)."""
    from mlx_mistral.batch import BatchGenerator

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


def ours_round(model, tok, batch, params, kwargs, name, plain_run=None):
    """One plain and one speculative run of a workload (or the given plain run's result);
    returns (plain tok/s, speculative tok/s, last events). The speculative tokens must be the
    plain run's."""
    out, plain, _ = plain_run or decode(model, tok, batch, params)
    spec_out, spec, last = decode(model, tok, batch, params, **kwargs)
    assert spec_out == out, f"{name}: speculation changed the output"
    return plain, spec, last


# ----------------------------------------------------------------------------- mlx-lm
def mlx_lm_worker(model_path: str, draft_path: str, prompt: list[int], tokens: int) -> dict:
    """Runs in its own process: mlx-lm's batch-1 greedy decode, plain and with a draft model."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = load(model_path)
    draft, _ = load(draft_path)
    procs = make_logits_processors(logit_bias={EOS: -100})  # as ours: every run is full length

    def run(max_tokens: int, draft_model=None, ids=prompt) -> dict:
        extra = dict(draft_model=draft_model, num_draft_tokens=NUM_DRAFT_TOKENS)
        times, out, from_draft = [], [], 0
        for response in stream_generate(
            model,
            tokenizer,
            mx.array(ids),
            max_tokens=max_tokens,
            logits_processors=procs,
            **(extra if draft_model is not None else {}),
        ):
            times.append(time.perf_counter())
            out.append(response.token)
            from_draft += response.from_draft
        # Each verification proposes NUM_DRAFT_TOKENS (fewer only at max_tokens) and yields
        # one token of the model's own after the accepted ones.
        proposed = (len(out) - from_draft) * NUM_DRAFT_TOKENS if draft_model is not None else 0
        return {
            "decode_tps": (len(out) - 1) / (times[-1] - times[0]),
            "reported_tps": response.generation_tps,
            "tokens": out,
            "accepted": from_draft,
            "proposed": proposed,
        }

    run(2, ids=prompt[:2]), run(2, draft, ids=prompt[:2])  # warm-up (a short prefill)
    plain = run(tokens)
    drafted = run(tokens, draft)
    drafted["same_as_plain"] = drafted.pop("tokens") == plain["tokens"]
    return {"plain": plain, "draft": drafted}


# ----------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_path, draft_path, prompt, tokens = sys.argv[2:]
        print(json.dumps(mlx_lm_worker(model_path, draft_path, json.loads(prompt), int(tokens))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="150m", help="tiny, 150m, 7b4 (4-bit) or a path")
    ap.add_argument("--layers", type=int, help="decoder layers of a written checkpoint")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft", default="tiny", help="mlx-lm's draft model: tiny or a path")
    ap.add_argument("--only", help="run the workloads whose name has this text; no docs update")
    args = ap.parse_args()
    # Here, not at the top: the mlx-lm worker must not get our BLAS preload, and this process
    # must get it before anything imports mlx (machine() does).
    import mlx_mistral
    from mlx_mistral.sampling.params import SamplingParams

    where = machine()  # the load average as the run starts
    path, draft_path = checkpoint(args.model, args.layers), checkpoint(args.draft, None)

    model, tok = mlx_mistral.load(path)
    # The forward's cost is measured once per loaded model, at the first speculation decision
    # (a one-off stall, logged by the server); here before the timed runs, and reported.
    from mlx_mistral.forward_cost import forward_cost_of

    started = time.perf_counter()
    cost = forward_cost_of(model)
    measured = f"measured in {time.perf_counter() - started:.1f} s: {cost!r}"
    print(f"forward cost {measured}")
    params = SamplingParams(temperature=0, max_tokens=args.tokens, logit_bias={EOS: -100})
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write about {t}."}]) for t in TOPICS]
    batch1_only = args.model == "7b4"
    # The model's own greedy answers (and our warm-up).
    first_plain = decode(model, tok, prompts[:1] if batch1_only else prompts, params)
    answers = first_plain[0]
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
    if batch1_only:
        busy = {}
    selected = [n for n in [*cases, *busy] if not args.only or args.only in n]
    runs = {name: {"plain": [], "spec": [], "last": None} for name in selected}

    def measure(name: str, batch: list, kwargs: dict, plain_run=None) -> None:
        plain, spec, runs[name]["last"] = ours_round(
            model, tok, batch, params, kwargs, name, plain_run
        )
        runs[name]["plain"].append(plain)
        runs[name]["spec"].append(spec)
        print(f"{name}: {plain:.2f} -> {spec:.2f} tok/s", flush=True)

    peer: list[dict] = []
    worker_args = [str(path), str(draft_path), json.dumps(prompts[0]), str(args.tokens)]
    for round_ in range(args.repeats):
        for side in in_turn(round_, "ours", "mlx_lm"):
            if side == "ours":
                shared = None
                if batch1_only:  # the 7B shape is slow: one plain run per round serves all
                    shared = first_plain if round_ == 0 else decode(model, tok, prompts[:1], params)
                for name in (n for n in selected if n in cases):
                    measure(name, prompts[:1], cases[name], shared)
            elif any(n in cases for n in selected):
                peer.append(run_worker(__file__, worker_args, mlx_lm_blas_env()))
                print(f"mlx-lm: {summary(peer[-1], answers[0])}", flush=True)
    for name in (n for n in selected if n in busy):  # no peer: mlx-lm speculates at batch 1 only
        for _ in range(args.repeats):
            measure(name, prompts, busy[name])
    rows = [
        (
            name,
            statistics.median(r["plain"]),
            statistics.median(r["spec"]),
            acceptance(r["last"]),
            peer if name in cases else None,
        )
        for name, r in runs.items()
    ]
    if not args.only:
        render(rows, args, where, path, answers[0], measured)


def summary(result: dict, ours: list[int]) -> str:
    plain, drafted = result["plain"], result["draft"]
    return (
        f"plain {plain['decode_tps']:.2f} tok/s (mlx-lm reports {plain['reported_tps']:.2f}), "
        f"same tokens as ours: {plain['tokens'] == ours}; with the draft model "
        f"{drafted['decode_tps']:.2f} tok/s, accepted {drafted['accepted']}/~{drafted['proposed']}"
        f", same tokens as its plain run: {drafted['same_as_plain']}"
    )


def peer_figures(peer: list[dict]) -> tuple[float, float, str]:
    """mlx-lm's median plain and drafted rates and its drafts' acceptance (all rounds)."""
    plain = statistics.median(r["plain"]["decode_tps"] for r in peer)
    drafted = statistics.median(r["draft"]["decode_tps"] for r in peer)
    accepted = sum(r["draft"]["accepted"] for r in peer)
    proposed = sum(r["draft"]["proposed"] for r in peer)
    return plain, drafted, f"{accepted}/~{proposed} ({accepted / max(proposed, 1):.0%})"


def render(rows, args, where: str, path: Path, answer: list[int], measured: str) -> None:
    import mlx_lm

    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    seven_b = args.model == "7b4"
    flags = f" --layers {args.layers}" if args.layers else ""
    peer = next((p for *_, p in rows if p), None)
    lines = [
        "## Speculative decoding in the batch (prompt lookup, Predicted Outputs)"
        + (f": 7B-shaped 4-bit, {layers} of 32 layers" if seven_b else ""),
        "",
        f"`python bench/bench_speculative.py --model {args.model}{flags} --tokens {args.tokens} "
        f"--repeats {args.repeats}` on {where}; at the end {os.getloadavg()[0]:.1f}.",
        "",
        "Greedy decode of the model's own answer (random weights; see the script's docstring), "
        f"{args.tokens} tokens"
        + (
            f", Mistral-7B's dimensions with {layers} of its 32 decoder layers, 4-bit (group 64, "
            "float32 scales, as both loaders compute on this CPU); one plain run per round serves "
            "the three workloads"
            if seven_b
            else ""
        )
        + ". Every speculative run gave the plain run's tokens exactly. Draft length at most 8; "
        "the cost model (`mlx_mistral.speculative.verification_width`) picks each step's width "
        f"from the forward's cost, {measured} (once per loaded model, before the timed runs). "
        f"mlx-lm {mlx_lm.__version__} (no prompt lookup or Predicted Outputs: it can only "
        "decode an edit plainly, or speculate with a draft model) runs the same prompt on the "
        f"same checkpoint in its own process with the same OpenBLAS, plain and with the tiny "
        f"random checkpoint as its draft model ({NUM_DRAFT_TOKENS} draft tokens, its default; "
        "random weights, so its drafts are almost never accepted: a trained small model sharing "
        "Mistral's tokenizer does not exist, see the issue).",
        "",
        "| workload | ours plain tok/s | ours speculative tok/s | speed-up | accepted / proposed "
        "| mlx-lm tok/s | mlx-lm + draft model tok/s (accepted / proposed) "
        "| ours speculative / mlx-lm |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, b, s, a, p in rows:
        if p:
            lm, lm_draft, lm_acc = peer_figures(p)
            theirs = f"{lm:.2f} | {lm_draft:.2f} ({lm_acc}) | {s / lm:.2f}x"
        else:
            theirs = "- | - | -"
        lines.append(f"| {name} | {b:.2f} | {s:.2f} | {s / b:.2f}x | {a} | {theirs} |")
    if peer:
        lines += [
            "",
            "mlx-lm per round (plain, with draft model; timed as ours, from its first token; "
            "its own `generation_tps` in brackets): "
            + "; ".join(
                f"{r['plain']['decode_tps']:.2f} [{r['plain']['reported_tps']:.2f}], "
                f"{r['draft']['decode_tps']:.2f} [{r['draft']['reported_tps']:.2f}]"
                for r in peer
            )
            + ". Its greedy tokens "
            + ("equal ours" if all(r["plain"]["tokens"] == answer for r in peer) else "differ")
            + "; with the draft model it gives "
            + (
                "its plain run's tokens"
                if all(r["draft"]["same_as_plain"] for r in peer)
                else "other tokens than its plain run"
            )
            + ".",
        ]
    write_section("speculative-7b4" if seven_b else "speculative", "\n".join(lines))


if __name__ == "__main__":
    main()
