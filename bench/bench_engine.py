"""Our engine and server against mlx-lm, side by side, in one run on the same checkpoints.

    python bench/bench_engine.py [--models tiny 150m PATH...] [--quick]

For each checkpoint (a tiny random Mistral, a ~150M-parameter random one this script writes, or
any checkpoint by path): prefill and batch-1 decode tok/s (ours vs mlx_lm.stream_generate), the
aggregate decode tok/s of 1/4/8/16 concurrent streaming HTTP clients (our server vs
mlx_lm.server), time to first token of turn 5 of a chat with and without the prefix cache, HTTP
streaming tok/s next to the engine's direct tok/s, and peak memory. Every side runs in its own
process; mlx-lm gets the same BLAS as ours (LD_PRELOAD) so the comparison is of the code, and
is also run as shipped. Results go to the `engine` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoints import write_random_checkpoint  # noqa: E402
from report import machine, write_section  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
STORY = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
         "with dialogue, weather, and the history of the coast. ")


# ----------------------------------------------------------------------------- in-process workers
def worker(side: str, model_path: str, prompt_tokens: int, decode_tokens: int) -> dict:
    """Runs in a subprocess: prefill and batch-1 decode speed of one side."""
    if side == "ours":
        import mlx_mistral  # first: its BLAS preload must precede mlx
    import mlx.core as mx

    if side == "ours":
        from mlx_mistral import SamplingParams, load
        from mlx_mistral.batch import BatchGenerator

        model, tok = load(model_path)
        ids = tok.encode(STORY * 200, bos=True)[:prompt_tokens]
        params = SamplingParams(temperature=0, max_tokens=decode_tokens, logit_bias={2: -100})

        def run():
            gen = BatchGenerator(model, tok, prefill_chunk=2048)
            gen.add(ids, params)
            t0, times = time.perf_counter(), []
            while gen.has_work:
                for _ in gen.step():
                    times.append(time.perf_counter())
            return t0, times
    else:
        from mlx_lm import load as lm_load, stream_generate
        from mlx_lm.sample_utils import make_logits_processors

        model, tok = lm_load(model_path)
        from mlx_mistral.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(model_path).encode(STORY * 200, bos=True)[:prompt_tokens]
        procs = make_logits_processors(logit_bias={2: -100})

        def run():
            t0, times = time.perf_counter(), []
            for _ in stream_generate(model, tok, ids, max_tokens=decode_tokens, logits_processors=procs,
                                     prefill_step_size=2048):
                times.append(time.perf_counter())
            return t0, times

    run()  # warm-up
    t0, times = run()
    prefill = len(ids) / (times[0] - t0)
    decode = (len(times) - 1) / (times[-1] - times[0])
    return {"prefill_tps": prefill, "decode_tps": decode, "tokens": len(times),
            "peak_mlx_mb": mx.get_peak_memory() / 2**20,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# Single-token English words. A random model's answers are byte soup that SentencePiece
# re-encodes differently, so the next turn's prompt diverges from the cached tokens at the
# answer; a trained model's answers survive decode -> re-encode. Biasing a random model towards
# whole words gives it that property (checked: every generated token is matched next turn).
WORDS = ("the of and to in is was for on that with as it by at from his her an be this are or "
         "which one had not but what all were when we there can").split()


def _final_turn_ttft(gen, tok, params, turns: int) -> tuple[float, int, int]:
    """Play a chat of `turns` user turns, the model's answers fed back as the client would;
    returns the last turn's TTFT, prompt tokens and tokens served from the prefix cache."""
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: " + STORY * 3})
        ids = tok.encode_chat(messages)
        t0 = time.perf_counter()
        gen.add(ids, params)
        ttft, cached, text = None, 0, ""
        while gen.has_work:
            for event in gen.step():
                if ttft is None:
                    ttft, cached = time.perf_counter() - t0, event.cached_tokens
                text += event.text
        messages.append({"role": "assistant", "content": text.strip() or "ok"})
    return ttft, len(ids), cached


def prefix_worker(model_path: str, turns: int, repeats: int = 3) -> dict:
    """TTFT of the last turn of a multi-turn chat, with and without the prefix cache (median
    of `repeats` chats, each from an empty cache), with answers in whole words and raw."""
    import statistics

    import mlx_mistral  # noqa: F401
    from mlx_mistral import SamplingParams, load
    from mlx_mistral.batch import BatchGenerator
    from mlx_mistral.prefix_cache import PrefixCache

    model, tok = load(model_path)
    words = {ids[0]: 100.0 for ids in (tok.encode(w, bos=False) for w in WORDS) if len(ids) == 1}
    out = {}
    for variant, bias in (("words", {2: -100.0, **words}), ("raw", {2: -100.0})):
        params = SamplingParams(temperature=0, max_tokens=48, logit_bias=bias)
        for label, cache_bytes in (("cold", 0), ("prefix_cache", 1 << 32)):
            runs = [_final_turn_ttft(BatchGenerator(model, tok, prefix_cache=PrefixCache(cache_bytes)
                                                    if cache_bytes else None), tok, params, turns)
                    for _ in range(repeats)]
            out.setdefault(variant, {})[label] = {
                "ttft_s": statistics.median(r[0] for r in runs), "prompt_tokens": runs[0][1],
                "cached_tokens": runs[0][2]}
    return out


def direct_worker(model_path: str, tokens: int) -> dict:
    """Decode tok/s of one stream through the engine thread, without HTTP."""
    import mlx_mistral
    from mlx_mistral import Engine, SamplingParams

    engine = Engine(lambda: mlx_mistral.load(model_path)).start()
    ids = engine.tokenizer.encode(STORY, bos=True)
    params = SamplingParams(temperature=0, max_tokens=tokens, logit_bias={2: -100})
    list(engine.submit(ids, params))
    times = [time.perf_counter() for _ in engine.submit(ids, params)]
    engine.shutdown()
    return {"decode_tps": (len(times) - 1) / (times[-1] - times[0])}


def run_worker(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, env: dict | None = None):
        self.port = port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})

    def wait(self, path: str, timeout: float = 180) -> "Server":
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server on {self.port} did not start")

    def peak_rss_mb(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_one(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {"2": -100}}
    chunks, usage, first = 0, None, None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                first = first or time.perf_counter()
    return (usage or chunks), first or time.perf_counter(), time.perf_counter()


async def aggregate(port: int, model: str, clients: int, max_tokens: int) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, model, "[INST] warm up [/INST]", 4)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            stream_one(client, url, model, f"[INST] Story {i}: {STORY} [/INST]", max_tokens)
            for i in range(clients)])
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    single = results[0]
    return {"aggregate_tps": tokens / wall, "tokens": tokens,
            "stream_tps": (single[0] - 1) / (single[2] - single[1]) if single[0] > 1 else float("nan")}


def measure(run, *args, attempts: int = 3) -> dict:
    """One HTTP measurement, retried when a server drops a connection (mlx_lm.server has,
    under 16 clients); after the last attempt the error is reported instead of a figure."""
    import httpx

    for attempt in range(attempts):
        try:
            return asyncio.run(run(*args))
        except httpx.HTTPError as exc:
            print(f"  attempt {attempt + 1}: {type(exc).__name__}: {exc}", file=sys.stderr)
            error = f"{type(exc).__name__} ({attempts} attempts)"
    return {"aggregate_tps": float("nan"), "tokens": 0, "stream_tps": float("nan"), "error": error}


# ----------------------------------------------------------------------------- main
def bench_model(name: str, path: Path, quick: bool) -> dict:
    prompt_tokens, decode_tokens = (128, 64) if quick else (512, 128)
    result = {"name": name}
    blas_env = {"LD_PRELOAD": OPENBLAS} if os.path.exists(OPENBLAS) else {}
    result["ours"] = run_worker(["ours", str(path), str(prompt_tokens), str(decode_tokens)])
    result["mlx_lm"] = run_worker(["mlx_lm", str(path), str(prompt_tokens), str(decode_tokens)], blas_env)
    result["mlx_lm_shipped"] = run_worker(["mlx_lm", str(path), str(prompt_tokens), str(decode_tokens)],
                                          {"LD_PRELOAD": ""})
    result["prefix"] = run_worker(["prefix", str(path), "5"])
    result["direct"] = run_worker(["direct", str(path), str(decode_tokens * 2)])

    ours_port, lm_port = free_port(), free_port()
    ours = Server([sys.executable, "-m", "mlx_mistral.server", "--model", str(path), "--port", str(ours_port)],
                  ours_port)
    lm = Server([sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--port", str(lm_port)],
                lm_port, blas_env)
    try:
        ours.wait("/health")
        lm.wait("/v1/models")
        result["http"] = {}
        for clients in ((1, 4, 8) if quick else (1, 4, 8, 16)):
            result["http"][clients] = {
                "ours": measure(aggregate, ours_port, name, clients, decode_tokens),
                "mlx_lm": measure(aggregate, lm_port, "default_model", clients, decode_tokens),
            }
        result["server_rss_mb"] = {"ours": ours.peak_rss_mb(), "mlx_lm": lm.peak_rss_mb()}
    finally:
        ours.stop()
        lm.stop()
    return result


def render(results: list[dict], quick: bool) -> str:
    lines = [
        "## Engine and server vs mlx-lm",
        "",
        f"Machine: {machine()}.",
        "",
        "Reproduce: `python bench/bench_engine.py" + (" --quick" if quick else "") + "` (writes this section). "
        "Random-weight checkpoints, float32 compute (the CPU default), greedy decoding with EOS banned "
        "so every run generates the same number of tokens. mlx-lm runs with the same OpenBLAS "
        "(LD_PRELOAD) as ours, and once as shipped (its bundled reference BLAS).",
        "",
        "| model | metric | ours | mlx-lm (same BLAS) | mlx-lm (as shipped) | ours / mlx-lm |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for metric, key in (("prefill tok/s", "prefill_tps"), ("batch-1 decode tok/s", "decode_tps"),
                            ("peak MLX memory MiB", "peak_mlx_mb")):
            o, m, s = r["ours"][key], r["mlx_lm"][key], r["mlx_lm_shipped"][key]
            lines.append(f"| {r['name']} | {metric} | {o:.1f} | {m:.1f} | {s:.1f} | {o / m:.2f}x |")
    lines += ["", "Aggregate decode throughput of concurrent streaming HTTP clients (`/v1/completions`, "
              "each client one stream):", "",
              "| model | clients | ours tok/s | mlx_lm.server tok/s | ours / mlx-lm | ours vs our 1 client |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        base = r["http"][1]["ours"]["aggregate_tps"]
        for clients, sides in r["http"].items():
            o, m = sides["ours"]["aggregate_tps"], sides["mlx_lm"]["aggregate_tps"]
            theirs = f"failed: {sides['mlx_lm']['error']}" if "error" in sides["mlx_lm"] else f"{m:.1f}"
            lines.append(f"| {r['name']} | {clients} | {o:.1f} | {theirs} | {o / m:.2f}x | {o / base:.2f}x |")
    lines += ["", "Time to first token of turn 5 of a chat (median of 3 chats), and streaming speed:", "",
              "| model | turn-5 prompt tokens | from prefix cache | TTFT cold s | TTFT with prefix cache s | "
              "ratio | ratio, raw random answers | HTTP stream tok/s | engine direct tok/s | "
              "HTTP / direct | server peak RSS MiB (ours / mlx-lm) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        words, raw = r["prefix"]["words"], r["prefix"]["raw"]
        ratio = words["prefix_cache"]["ttft_s"] / words["cold"]["ttft_s"]
        raw_ratio = raw["prefix_cache"]["ttft_s"] / raw["cold"]["ttft_s"]
        http_tps, direct = r["http"][1]["ours"]["stream_tps"], r["direct"]["decode_tps"]
        rss = r["server_rss_mb"]
        lines.append(
            f"| {r['name']} | {words['cold']['prompt_tokens']} | {words['prefix_cache']['cached_tokens']} | "
            f"{words['cold']['ttft_s']:.3f} | {words['prefix_cache']['ttft_s']:.3f} | {ratio:.2f} | "
            f"{raw_ratio:.2f} | {http_tps:.1f} | {direct:.1f} | {http_tps / direct:.2f} | "
            f"{rss['ours']:.0f} / {rss['mlx_lm']:.0f} |")
    lines += ["", "The chat's answers are the model's own, fed back as a client would. *ratio*: answers "
              "biased to whole English words, which (like a trained model's) re-encode to the tokens "
              "generated, so only the new user turn is prefilled; *raw*: a random model's byte soup, "
              "which does not, so the previous answer is prefilled again too."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "prefix":
            out = prefix_worker(rest[0], int(rest[1]))
        elif kind == "direct":
            out = direct_worker(rest[0], int(rest[1]))
        else:
            out = worker(kind, rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "150m"])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and clients")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mlx-mistral-bench"))
    args = parser.parse_args()
    results = []
    for name in args.models:
        path = Path(name) if Path(name).is_dir() else write_random_checkpoint(Path(args.workdir) / name, name)
        print(f"benchmarking {name} ...", file=sys.stderr)
        results.append(bench_model(Path(name).name, path, args.quick))
    text = render(results, args.quick)
    print(text)
    write_section("engine", text)


if __name__ == "__main__":
    main()
