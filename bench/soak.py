"""Soak: a server under an hour (by default) of mixed requests; does its memory creep?

    python bench/soak.py --minutes 60                  # the bundled demo model
    python bench/soak.py --minutes 10 --model PATH     # any checkpoint
    python bench/soak.py --minutes 10 --prefix-cache-mib 64   # a small prefix cache

Two processes. The server runs in a child (`bench/soak.py --child`), which serves exactly as
`mlx-mistral serve` does and samples, every `--interval` seconds from a side thread: its RSS
(/proc/self/status VmRSS), MLX active memory, MLX peak memory since the previous sample, MLX
cache memory, the KV bytes of the running batch and the prefix cache's bytes. The parent drives
the load with `--concurrency` client threads, each looping over a seeded mix:

    30% chat, long context: a system prompt and a multi-turn history, 200 to ~75% of the window
    20% chat streamed to the end           10% chat streamed, dropped after a few chunks
    10% n=2..4 sampled with a seed + logprobs   10% /v1/completions with a long text prompt
    10% invalid requests (bad fields, over the context)   10% short chat (max_tokens 1..8)

At the end it prints a markdown report: request counts by status, and a text plot of RSS and
MLX memory over time with the least-squares slope over the second half of the run (after the
caches have warmed up). A slope near zero means no upward trend. The samples go to `--csv`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "warm",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "old",
    "stone",
    "bridges",
    "carried",
    "travellers",
    "towards",
    "distant",
    "markets",
    "full",
    "of",
    "spices",
    "bread",
    "wool",
    "and",
    "copper",
]


# -- the child: a server that samples its own memory ---------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_child(argv: list[str]) -> int:
    """Serve like `mlx-mistral serve` and write memory samples to $SOAK_SAMPLES."""
    import mlx.core as mx
    import uvicorn

    from mlx_mistral.loader import load
    from mlx_mistral.server.app import begin_drain, create_app, start_engine
    from mlx_mistral.server.cli import add_arguments, bind_socket, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    config = build_config(args)
    sock = bind_socket(config.host, config.port)
    engine = start_engine(config, lambda: load(config.model))
    app = create_app(config, engine=engine)
    samples = open(os.environ["SOAK_SAMPLES"], "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    started = time.monotonic()

    def sample() -> None:
        while True:
            generator = engine.generator
            prefix = generator.prefix_cache if generator is not None else None
            row = {
                "t": round(time.monotonic() - started, 1),
                "rss_kib": _rss_kib(),
                "mlx_active": mx.get_active_memory(),
                "mlx_peak": max(mx.get_peak_memory(), mx.get_active_memory()),
                "mlx_cache": mx.get_cache_memory(),
                "kv_bytes": generator.kv_bytes_in_use if generator is not None else 0,
                "prefix_bytes": prefix.nbytes if prefix is not None else 0,
                "engine_steps": engine.steps,
            }
            # Peak since the previous sample: a one-off spike must not hide a later trend.
            mx.reset_peak_memory()
            samples.write(json.dumps(row) + "\n")
            time.sleep(args.interval)

    threading.Thread(target=sample, daemon=True, name="soak-sampler").start()
    print(f"SOAK LISTENING {sock.getsockname()[1]}", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            begin_drain(app)
            super().handle_exit(sig, frame)
            # A drained SIGTERM is a clean exit (status 0), as in `mlx-mistral serve`.
            self._captured_signals = [s for s in self._captured_signals if s != sig]

    Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
    return 0


# -- the parent: load and report -----------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _history(rng: random.Random, words: int) -> list[dict[str, str]]:
    turns = rng.randint(1, 4)
    messages = [{"role": "system", "content": _words(rng, rng.randint(10, 60))}]
    per_turn = max(1, words // (2 * turns))
    for _ in range(turns - 1):
        messages += [
            {"role": "user", "content": _words(rng, per_turn)},
            {"role": "assistant", "content": _words(rng, per_turn)},
        ]
    messages.append({"role": "user", "content": _words(rng, per_turn)})
    return messages


def one_request(http, rng: random.Random, context: int) -> str:
    """Send one request of the mix; returns a label for the tally."""
    kind = rng.choices(
        ["long", "stream", "drop", "n", "text", "invalid", "short"],
        weights=[30, 20, 10, 10, 10, 10, 10],
    )[0]
    # ~1.3 tokens per word with this vocabulary: keep prompts within ~75% of the window.
    long_words = rng.randint(150, int(context * 0.75 / 1.3))
    if kind == "long":
        body = {
            "messages": _history(rng, long_words),
            "max_tokens": rng.randint(16, 64),
            "temperature": rng.choice([0, 0.7]),
        }
    elif kind in ("stream", "drop"):
        body = {
            "messages": _history(rng, rng.randint(20, 400)),
            "stream": True,
            "max_tokens": rng.randint(32, 128),
        }
    elif kind == "n":
        body = {
            "messages": _history(rng, rng.randint(20, 300)),
            "n": rng.randint(2, 4),
            "seed": rng.randint(0, 10**6),
            "temperature": 1.0,
            "logprobs": True,
            "top_logprobs": 3,
            "max_tokens": rng.randint(8, 32),
        }
    elif kind == "text":
        body = {"prompt": _words(rng, long_words), "max_tokens": rng.randint(8, 48)}
    elif kind == "invalid":
        body = rng.choice(
            [
                {"messages": [{"role": "user", "content": _words(rng, context)}]},
                {"messages": [], "temperature": "hot"},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
                {"messages": [{"role": "user", "content": "x"}], "top_p": 7},
            ]
        )
    else:
        body = {"messages": _history(rng, rng.randint(5, 40)), "max_tokens": rng.randint(1, 8)}
    path = "/v1/completions" if kind == "text" else "/v1/chat/completions"
    if not body.get("stream"):
        return f"{kind}:{http.post(path, json=body).status_code}"
    with http.stream("POST", path, json=body) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if kind == "drop" and seen >= rng.randint(2, 6):
                return f"drop:{response.status_code}"
        return f"stream:{response.status_code}"


def load_loop(
    base_url: str, seed: int, deadline: float, context: int, tally: Counter, lock: threading.Lock
) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, timeout=300) as http:
        while time.monotonic() < deadline:
            try:
                label = one_request(http, rng, context)
            except Exception as exc:  # noqa: BLE001 - counted and shown in the report
                label = f"client-error:{type(exc).__name__}"
            with lock:
                tally[label] += 1


def slope_per_minute(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per minute."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


def text_plot(
    ts: list[float], ys: list[float], label: str, width: int = 60, height: int = 10
) -> str:
    """An ASCII plot of ys over ts (for a markdown code block)."""
    lo, hi = min(ys), max(ys)
    span = hi - lo or 1.0
    grid = [[" "] * width for _ in range(height)]
    t0, t1 = ts[0], ts[-1] or 1.0
    for t, y in zip(ts, ys):
        x = min(width - 1, int((t - t0) / ((t1 - t0) or 1) * (width - 1)))
        row = height - 1 - int((y - lo) / span * (height - 1))
        grid[row][x] = "*"
    lines = [f"{label}: {lo:,.1f} .. {hi:,.1f}"]
    for i, row in enumerate(grid):
        value = hi - i * span / (height - 1)
        lines.append(f"{value:>12,.1f} |" + "".join(row))
    lines.append(" " * 13 + "+" + "-" * width)
    lines.append(" " * 13 + f"0{'':>{width - 12}}{t1 / 60:>8.1f} min")
    return "\n".join(lines)


def report(
    samples: list[dict], tally: Counter, minutes: float, model: str, concurrency: int
) -> str:
    ts = [s["t"] for s in samples]
    half = [i for i, t in enumerate(ts) if t >= ts[-1] / 2]
    out = [
        (
            f"Soak: {minutes:g} min, model {model}, {concurrency} client threads, "
            f"{sum(tally.values())} requests, {len(samples)} samples."
        ),
        "",
        "Requests by kind:status: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())),
        "",
        "| series | first | last | max | slope, 2nd half |",
        "|---|---|---|---|---|",
    ]
    series = {
        "RSS (MiB)": [s["rss_kib"] / 1024 for s in samples],
        "MLX active (MiB)": [s["mlx_active"] / 2**20 for s in samples],
        "MLX peak per interval (MiB)": [s["mlx_peak"] / 2**20 for s in samples],
        "MLX cache (MiB)": [s["mlx_cache"] / 2**20 for s in samples],
        "prefix cache (MiB)": [s["prefix_bytes"] / 2**20 for s in samples],
        # What is left once the prefix cache (which grows by design up to its budget)
        # is taken out: the figure a leak would show in.
        "RSS - prefix cache (MiB)": [
            (s["rss_kib"] * 1024 - s["prefix_bytes"]) / 2**20 for s in samples
        ],
    }
    for name, ys in series.items():
        slope = slope_per_minute([ts[i] for i in half], [ys[i] for i in half])
        out.append(
            f"| {name} | {ys[0]:,.1f} | {ys[-1]:,.1f} | {max(ys):,.1f} | {slope:+.2f} MiB/min |"
        )
    out += [
        "",
        "```",
        text_plot(ts, series["RSS (MiB)"], "RSS (MiB)"),
        "",
        text_plot(ts, series["RSS - prefix cache (MiB)"], "RSS - prefix cache (MiB)"),
        "",
        text_plot(ts, series["MLX peak per interval (MiB)"], "MLX peak per interval (MiB)"),
        "```",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write the samples here")
    parser.add_argument(
        "--prefix-cache-mib",
        type=int,
        default=None,
        help="prefix-cache budget (default: the engine's, a quarter of its KV "
        "budget, itself 60%% of the memory available at start)",
    )
    args = parser.parse_args(argv)

    samples_path = Path(tempfile.mkstemp(prefix="soak-", suffix=".jsonl")[1])
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the report
        "w+", prefix="soak-server-", suffix=".log", delete=False
    )
    child = [
        sys.executable,
        __file__,
        "--child",
        "--port",
        "0",
        "--log-level",
        "warning",
        "--interval",
        str(args.interval),
    ]
    if args.model:
        child += ["--model", args.model]
    if args.prefix_cache_mib is not None:
        child += ["--prefix-cache-mib", str(args.prefix_cache_mib)]
    proc = subprocess.Popen(
        child,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "SOAK_SAMPLES": str(samples_path)},
    )
    line = proc.stdout.readline()
    match = re.match(r"SOAK LISTENING (\d+)", line or "")
    if not match:
        proc.kill()
        log.seek(0)
        print(f"the server did not start:\n{log.read()}", file=sys.stderr)
        return 1
    base_url = f"http://127.0.0.1:{match.group(1)}"
    import httpx

    card = httpx.get(base_url + "/v1/models").json()["data"][0]
    context = card.get("context_length", 2048)
    tally: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.minutes * 60
    threads = [
        threading.Thread(
            target=load_loop, args=(base_url, args.seed + i, deadline, context, tally, lock)
        )
        for i in range(args.concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(args.interval + 1)  # one more sample with the server idle
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
    print(report(samples, tally, args.minutes, card["id"], args.concurrency))
    log.seek(0)
    errors = [ln for ln in log.read().splitlines() if "Traceback" in ln or " ERROR " in ln]
    print(
        f"\nserver exit status {proc.returncode}; {len(errors)} error lines in its log ({log.name})"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(run_child(sys.argv[2:]))
    sys.exit(main())
