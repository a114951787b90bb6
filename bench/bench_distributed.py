"""Tensor-parallel decode: per-step communication (bytes and time) against compute, two ranks on
one machine, and the projected speed-up on 2 and 4 Macs.

    python bench/bench_distributed.py [--model 150m|tiny|PATH] [--tokens N] [--batches 1,8]

Runs the engine's `BatchGenerator` once in one process and once over `mlx.launch --backend ring
-n 2` on localhost (rank 0 schedules and samples, rank 1 replays: `distributed_engine`), greedy,
end-of-sequence banned so every stream decodes `--tokens` tokens. Per decode step it records the
time and the bytes every `mx.distributed.all_sum` carried (the model's two all-reduces a layer,
and the lockstep's messages), counted by wrapping `all_sum`. Then both ranks run the same
all-reduces with no model in between: that is the step's communication time on this link.
On one machine the two ranks share its cores, so the measured step is no faster than one
process; the projection for Macs (bandwidth-bound decode, weights split across the ranks'
memories) uses the measured bytes and published link rates, and is labelled as a projection.
Results go to the `distributed` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx_mistral  # noqa: E402  (first: its BLAS preload precedes mlx)
from checkpoints import write_random_checkpoint  # noqa: E402
from report import machine, write_section  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402

from mlx_mistral.batch import BatchGenerator  # noqa: E402
from mlx_mistral.distributed_engine import Follower, attach_leader  # noqa: E402
from mlx_mistral.sampling.params import SamplingParams  # noqa: E402

LAUNCH = (
    "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"
)
TOPICS = ["a lighthouse", "a river", "a market", "a violin", "the moon", "a bakery", "snow", "ink"]

# Published link rates (bits/s) and Mistral-7B-Instruct-v0.2's shapes, for the projection.
LINKS = {"10GbE": 10e9, "Thunderbolt 4 (IP)": 40e9, "Thunderbolt 5 (IP)": 80e9}
MISTRAL_7B = dict(layers=32, hidden=4096, activation_bytes=2, weights_bytes=4.1e9)  # 4-bit
MAC_BANDWIDTH = 273e9  # bytes/s, M4 Pro: decode reads every weight once a token
# Seconds per message hop: assumptions (TCP over either link; RDMA over Thunderbolt 5, JACCL).
LINK_LATENCIES = (50e-6, 10e-6)


class Counter:
    """Wraps `mx.distributed.all_sum` (which MLX's sharded layers call) to count its traffic."""

    def __init__(self):
        self.bytes = self.calls = 0
        self._all_sum = mx.distributed.all_sum
        mx.distributed.all_sum = self._count

    def _count(self, x, *args, **kwargs):
        self.bytes += x.nbytes
        self.calls += 1
        return self._all_sum(x, *args, **kwargs)


def decode_steps(generator, tok, batch: int, tokens: int, counter: Counter | None):
    """Decode `batch` streams. Per decode step while every stream runs (prefills and the
    steps where streams finish excluded): seconds, and all_sum (bytes, calls)."""
    params = SamplingParams(temperature=0, max_tokens=tokens, logit_bias={"2": -100})
    prompts = [tok.encode(f"Tell me about {TOPICS[i % 8]}.") for i in range(batch)]
    uids = [generator.add(prompt, params) for prompt in prompts]
    started: set[int] = set()
    times, traffic = [], []
    while generator.has_work:
        before = time.perf_counter()
        sent = (counter.bytes, counter.calls) if counter else (0, 0)
        events = generator.step()
        if len(started) == batch and not any(e.finish_reason for e in events):
            times.append(time.perf_counter() - before)
            if counter:
                traffic.append((counter.bytes - sent[0], counter.calls - sent[1]))
        started |= {e.uid for e in events if e.token is not None}
    assert started == set(uids)
    return times, traffic


def comm_only(group, batch: int, hidden: int, layers: int, steps: int) -> list[float]:
    """A decode step's all-reduces (two lockstep messages, two per layer) without the model."""
    times = []
    for _ in range(steps):
        before = time.perf_counter()
        mx.eval(mx.distributed.all_sum(mx.zeros((4,), mx.int32), group=group))
        x = mx.distributed.all_sum(mx.zeros((batch,), mx.int32), group=group).astype(mx.float32)
        h = mx.zeros((batch, 1, hidden)) + x[:, None, None]
        for _ in range(2 * layers):
            h = mx.distributed.all_sum(h, group=group)
        mx.eval(h)
        times.append(time.perf_counter() - before)
    return times


def rank_main(path: str, out: str, batches: list[int], tokens: int) -> None:
    """One rank of the two-rank run (rank 0 writes the results), or the one-process run."""
    group = mx.distributed.init()
    size = group.size()
    model, tok = mlx_mistral.load(path, group=group if size > 1 else None)
    args = model.args
    counter = Counter() if size > 1 else None
    results = {}
    for batch in batches:
        if group.rank() == 0:
            generator = BatchGenerator(model, tok, prompt_lookup=False)
            leader = attach_leader(generator, group) if size > 1 else None
            decode_steps(generator, tok, batch, 4, None)  # warm-up
            times, traffic = decode_steps(generator, tok, batch, tokens, counter)
            row = {"step_s": statistics.median(times), "steps": len(times)}
            if counter:
                row["bytes_per_step"] = statistics.median(b for b, _ in traffic)
                row["calls_per_step"] = statistics.median(c for _, c in traffic)
                leader.stop()
        else:
            Follower(model, group).run()
        if size > 1:
            comm = comm_only(group, batch, args.hidden_size, args.num_hidden_layers, 20)
            if group.rank() == 0:
                row["comm_s"] = statistics.median(comm)
        if group.rank() == 0:
            results[batch] = row
    if group.rank() == 0:
        Path(out).write_text(json.dumps({"size": size, "results": results}))
    mx.synchronize()


def projection(bytes_per_token_7b: float) -> list[str]:
    """Decode tok/s for one stream of Mistral-7B 4-bit on N Macs (a model, not a measurement):
    each rank reads 1/N of the weights; a step adds 64 ring all-reduces of `bytes_per_token_7b`
    in total, each of which sends 2(N-1)/N of its bytes per rank and takes 2(N-1) hops."""
    alone = MISTRAL_7B["weights_bytes"] / MAC_BANDWIDTH
    lines = [
        "| link | latency / hop | 1 Mac tok/s | 2 Macs tok/s (speed-up) | "
        "4 Macs tok/s (speed-up) |",
        "|---|---:|---:|---:|---:|",
    ]
    for latency in LINK_LATENCIES:
        for name, bits in LINKS.items():
            cells = []
            for n in (2, 4):
                transfer = bytes_per_token_7b * 2 * (n - 1) / n / (bits / 8)
                hops = 2 * MISTRAL_7B["layers"] * 2 * (n - 1) * latency
                step = alone / n + transfer + hops
                cells.append(f"{1 / step:.0f} ({alone / step:.2f}x)")
            lines.append(
                f"| {name} | {latency * 1e6:.0f} µs | {1 / alone:.0f} | {cells[0]} | {cells[1]} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="150m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rank", nargs=2, metavar=("PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.rank:
        return rank_main(*args.rank, batches, args.tokens)
    path = Path(args.model)
    if not path.exists():
        path = write_random_checkpoint(
            Path(tempfile.gettempdir()) / f"mlx-mistral-bench-{args.model}", args.model
        )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--tokens", str(args.tokens), "--batches", args.batches]
        for ranks in (1, 2):
            out = Path(tmp) / f"{ranks}.json"
            me = [sys.executable, __file__, *common, "--rank", str(path), str(out)]
            launch = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2"]
            subprocess.run([*launch, "--", *me] if ranks == 2 else me, check=True, timeout=1800)
            runs[ranks] = json.loads(out.read_text())["results"]
    config = json.loads((path / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    lines = [
        f"`python bench/bench_distributed.py --model {args.model} --tokens {args.tokens} "
        f"--batches {args.batches}` on {machine()}.",
        "",
        f"Measured: the {args.model} model ({layers} layers, hidden {hidden}, float32), greedy "
        "decode, median step. Two ranks on this one machine share its cores, so their step is "
        "not faster than one process's; what matters is the communication column against the "
        "step.",
        "",
        "| batch | 1 process step | 2 ranks step | all-reduces / step | bytes / step | "
        "communication alone / step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in batches:
        one, two = runs[1][str(batch)], runs[2][str(batch)]
        lines.append(
            f"| {batch} | {one['step_s'] * 1e3:.1f} ms | {two['step_s'] * 1e3:.1f} ms | "
            f"{two['calls_per_step']:.0f} | {two['bytes_per_step'] / 1024:.1f} KiB | "
            f"{two['comm_s'] * 1e3:.2f} ms |"
        )
    # Per token of one stream: the model's all-reduces carry 2 x layers x hidden activations.
    measured = runs[2][str(batches[0])]["bytes_per_step"] / batches[0]
    per_token_7b = 2 * MISTRAL_7B["layers"] * MISTRAL_7B["hidden"] * MISTRAL_7B["activation_bytes"]
    lines += [
        "",
        f"Bytes per step match the model: 2 all-reduces x {layers} layers x {hidden} x 4 bytes = "
        f"{2 * layers * hidden * 4 / 1024:.1f} KiB per stream, plus the lockstep's messages "
        f"(measured {measured / 1024:.1f} KiB per stream at batch {batches[0]}). For "
        f"Mistral-7B (32 layers, hidden 4096, float16 activations) that is "
        f"{per_token_7b / 1024:.0f} KiB per token.",
        "",
        "**Projection, not a measurement**: one stream of Mistral-7B 4-bit "
        f"({MISTRAL_7B['weights_bytes'] / 1e9:.1f} GB of weights) on Macs with "
        f"{MAC_BANDWIDTH / 1e9:.0f} GB/s of memory bandwidth (M4 Pro), decode bound by reading "
        "the weights (each rank reads its 1/N), plus ring all-reduces at the link's published "
        "rate, and an assumed latency per message hop (50 µs for TCP, 10 µs for RDMA over "
        "Thunderbolt 5 with JACCL; the localhost figure above, two ranks time-sharing a busy "
        "machine's cores, says nothing about a link's). A ring all-reduce takes 2(N-1) hops "
        "and a token 64 all-reduces: latency, not bandwidth, limits the speed-up.",
        "",
        *projection(per_token_7b),
    ]
    write_section("distributed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
