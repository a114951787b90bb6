"""What each rank runs in test_distributed.py: load checkpoints sharded over the group, record.

    python tests/distributed_rank.py OUT_DIR NAME=CHECKPOINT ...      (one process: the reference)
    mlx.launch --backend ring -n 2 -- python tests/distributed_rank.py OUT_DIR NAME=CHECKPOINT ...

Per checkpoint and rank it writes OUT_DIR/NAME-rankR.npz (logits of a batch without a cache, and
of a prefill plus decode steps through the KV cache) and OUT_DIR/NAME-rankR.json (greedy and
seeded sampled tokens, parameter bytes, the process's resident-memory growth from loading, after
it and at its peak, and the KV heads in a layer's cache).
The first checkpoint is loaded first, so its memory growth is measured in a fresh process.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx_mistral  # first: its BLAS preload must precede mlx's import

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

# Token ids below 512, the smallest test vocabulary; two rows of one length.
BATCH = [[1, 415, 293, 96, 285, 114, 20], [1, 22, 333, 44, 505, 6, 77]]
PROMPT = [1, 415, 293, 96, 285, 114]


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident size now (VmRSS) or at its peak so far (VmHWM), from Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def record(name: str, path: str, group: mx.distributed.Group, out: Path) -> None:
    gc.collect()
    rss_before = resident_bytes()
    model, tokenizer = mlx_mistral.load(path, group=group)
    gc.collect()
    mx.clear_cache()
    rss_growth = resident_bytes() - rss_before
    peak_growth = resident_bytes("VmHWM") - rss_before

    logits = model(mx.array(BATCH))
    cache = model.make_cache(batch_size=len(BATCH))
    steps = [model(mx.array(BATCH)[:, :5], cache)]
    for i in (5, 6):  # decode one token at a time through the cache
        steps.append(model(mx.array(BATCH)[:, i : i + 1], cache))
    cached = mx.concatenate(steps, axis=1)
    mx.eval(logits, cached)

    def sample(**sampling) -> list[int]:
        params = mlx_mistral.SamplingParams(max_tokens=12, **sampling)
        chunks = mlx_mistral.stream_generate(model, tokenizer, PROMPT, params=params)
        return [chunk.token for chunk in chunks if chunk.token is not None]

    tokens = sample(temperature=0)
    sampled = sample(temperature=0.8, top_p=0.95, seed=7)
    layer_bytes = sum(v.nbytes for _, v in tree_flatten(model.layers[0].parameters()))
    rank = group.rank()
    np.savez(out / f"{name}-rank{rank}.npz", logits=np.array(logits), cached=np.array(cached))
    facts = {
        "size": group.size(),
        "tokens": tokens,
        "sampled": sampled,
        "parameter_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        "layer_bytes": layer_bytes * len(model.layers),
        "rss_growth": rss_growth,
        "peak_growth": peak_growth,
        "kv_heads": int(cache[0].keys.shape[1]),
    }
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(facts))


def main() -> None:
    out = Path(sys.argv[1])
    group = mx.distributed.init()
    for spec in sys.argv[2:]:
        name, path = spec.split("=", 1)
        record(name, path, group, out)


if __name__ == "__main__":
    main()
