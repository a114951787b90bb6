"""Continuous batching, the prefix cache, cancellation and the engine thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral import Engine, EngineConfig, SamplingParams
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.cache import BatchKVCache
from mlx_mistral.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    InvalidRequestError,
)
from mlx_mistral.prefix_cache import PrefixCache
from mlx_mistral.tools.grammar import make_constraints
from mlx_mistral.tools.validation import parse_structured_request

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def prompts(tokenizer, n):
    questions = [
        "Hello!",
        "What is the capital of France?",
        "2+2?",
        "Tell me a story about a cat.",
        "Convert 5 km to miles",
        "¿Qué tal? 你好 👋",
    ]
    return [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions[:n]]


def run(
    generator: BatchGenerator, steps_before: dict[int, list] | None = None
) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while generator.has_work:
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
    return tokens


def alone(model, tokenizer, prompt, params=GREEDY):
    generator = BatchGenerator(model, tokenizer)
    uid = generator.add(prompt, params)
    return run(generator)[uid]


def test_batched_greedy_equals_alone(tiny_model):
    model, tokenizer = tiny_model
    ps = prompts(tokenizer, 5)
    generator = BatchGenerator(model, tokenizer)
    uids = [generator.add(p, GREEDY) for p in ps]
    batched = run(generator)
    for uid, p in zip(uids, ps):
        assert batched[uid] == alone(model, tokenizer, p)


def test_joining_and_leaving_mid_batch_leaves_others_unchanged(tiny_model):
    model, tokenizer = tiny_model
    ps = prompts(tokenizer, 4)
    generator = BatchGenerator(model, tokenizer, prefill_chunk=4)  # chunked prefill too
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (16, 3, 9, 12)]
    tokens: dict[int, list[int]] = {}
    uids = [generator.add(ps[0], params[0])]
    for step in range(40):
        if step == 5:
            uids.append(generator.add(ps[1], params[1]))  # short: leaves early
        if step == 8:
            uids += [generator.add(ps[2], params[2]), generator.add(ps[3], params[3])]
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
        if step > 8 and not generator.has_work:
            break
    for uid, p, sp in zip(uids, ps, params):
        assert tokens[uid] == alone(model, tokenizer, p, sp)


def test_seeded_requests_reproducible_inside_a_batch(tiny_model):
    model, tokenizer = tiny_model
    ps = prompts(tokenizer, 3)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10)
    generator = BatchGenerator(model, tokenizer)
    others = [
        generator.add(p, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=14)) for p in ps[1:]
    ]
    uid = generator.add(ps[0], seeded)
    in_batch = run(generator)[uid]
    assert in_batch == alone(model, tokenizer, ps[0], seeded)
    other_seed = alone(
        model, tokenizer, ps[0], SamplingParams(temperature=1.0, seed=99, max_tokens=10)
    )
    assert other_seed != in_batch
    assert others


def test_prefix_cache_hit_gives_cold_logits(tiny_model):
    model, tokenizer = tiny_model
    history = [
        {"role": "system", "content": "You are a careful assistant who answers briefly. " * 3},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first = tokenizer.encode_chat(history)
    cache = PrefixCache(1 << 30)
    generator = BatchGenerator(model, tokenizer, prefix_cache=cache)
    uid = generator.add(first, GREEDY)
    answer = run(generator)[uid]
    turn2 = history + [
        {"role": "assistant", "content": tokenizer.decode(answer)},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = tokenizer.encode_chat(turn2)
    hit = cache.lookup(second)
    assert hit is not None and hit.length >= len(first)
    warm = [BatchKVCache.from_state(k, v) for k, v in hit.layers]
    warm_logits = model(mx.array([second[hit.length :]]), warm)[0, -1]
    cold_logits = model(mx.array([second]))[0, -1]
    assert np.abs(np.array(warm_logits) - np.array(cold_logits)).max() < 1e-4
    # Through the generator: the same tokens, and the usage reports the cached prompt tokens.
    generator = BatchGenerator(model, tokenizer, prefix_cache=cache)
    uid = generator.add(second, GREEDY)
    events = []
    while generator.has_work:
        events += generator.step()
    assert events[-1].cached_tokens == hit.length
    assert [e.token for e in events] == alone(model, tokenizer, second)


def test_requests_arriving_together_share_a_system_prompt(tiny_model):
    """Requests admitted in the same step find the prefix the first one stored, and give the
    tokens they give alone."""
    model, tokenizer = tiny_model
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 4}
    chats = [
        tokenizer.encode_chat([system, {"role": "user", "content": q}])
        for q in ("Hello!", "2+2?", "Convert 5 km to miles")
    ]
    generator = BatchGenerator(model, tokenizer, prefix_cache=PrefixCache(1 << 30))
    uids = [generator.add(chat, GREEDY) for chat in chats]
    events = _drain(generator)
    cached = {e.uid: e.cached_tokens for e in events}
    shared = len(tokenizer.encode_chat([system, {"role": "user", "content": ""}])) - 5
    assert cached[uids[0]] == 0 and all(cached[u] >= shared for u in uids[1:]), cached
    for uid, chat in zip(uids, chats):
        assert [e.token for e in events if e.uid == uid] == alone(model, tokenizer, chat)


def test_finished_sequence_stores_every_token_it_fed(tiny_model):
    """A pipelined step feeds a sequence's last token before the host learns it finished, so
    the stored prefix covers the whole answer, and its KV is the cold forward's."""
    model, tokenizer = tiny_model
    prompt = prompts(tokenizer, 1)[0]
    cache = PrefixCache(1 << 30)
    generator = BatchGenerator(model, tokenizer, prefix_cache=cache)
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={tokenizer.eos_id: -100})
    uid = generator.add(prompt, params)
    answer = run(generator)[uid]
    assert len(answer) == 8
    hit = cache.lookup(prompt + answer + [tokenizer.eos_id])
    assert hit is not None and hit.length == len(prompt) + len(answer)
    cold = model.make_cache()
    model(mx.array([prompt + answer]), cold)
    np.testing.assert_allclose(np.array(hit.layers[0][0]), np.array(cold[0].state[0]), atol=1e-5)


def test_constrained_request_joins_and_leaves_a_pipelined_batch(tiny_model):
    """A grammar row makes the batch step synchronously while it runs; the rows around it
    (pipelined before and after) still give exactly what they give alone."""
    model, tokenizer = tiny_model
    ps = prompts(tokenizer, 3)
    plain = SamplingParams(temperature=0, max_tokens=30, logit_bias={tokenizer.eos_id: -100})
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
    spec = parse_structured_request(response_format={"type": "json_object"})

    def constrained(generator: BatchGenerator) -> int:
        return generator.add(ps[2], seeded, constraints=make_constraints(spec, tokenizer, 1))

    generator = BatchGenerator(model, tokenizer)
    uids = [generator.add(p, plain) for p in ps[:2]]
    tokens: dict[int, list[int]] = {}
    for step in range(200):
        if step == 4:
            uids.append(constrained(generator))
        for event in generator.step():
            if event.token is not None:
                tokens.setdefault(event.uid, []).append(event.token)
        if not generator.has_work:
            break
    for uid, p in zip(uids[:2], ps[:2]):
        assert tokens[uid] == alone(model, tokenizer, p, plain)
    solo = BatchGenerator(model, tokenizer)
    uid = constrained(solo)
    assert tokens[uids[2]] == run(solo)[uid]


def test_cancel_frees_the_cache_slot(tiny_model):
    model, tokenizer = tiny_model
    ps = prompts(tokenizer, 2)
    generator = BatchGenerator(model, tokenizer)
    keep = generator.add(ps[0], SamplingParams(temperature=0, max_tokens=50))
    drop = generator.add(ps[1], SamplingParams(temperature=0, max_tokens=50))
    for _ in range(4):
        generator.step()
    assert generator.num_sequences == 2
    before = generator.kv_bytes_in_use
    generator.cancel(drop)
    events = generator.step()
    assert any(e.uid == drop and e.finish_reason == "cancelled" for e in events)
    assert generator.num_sequences == 1 and generator.cache[0].batch_size == 1
    assert generator.kv_bytes_in_use < before
    assert keep in {e.uid for e in events}


def test_context_and_budget_limits(tiny_model):
    model, tokenizer = tiny_model
    generator = BatchGenerator(model, tokenizer, kv_budget_bytes=64 * generator_bytes(model))
    with pytest.raises(ContextLengthExceededError) as err:
        generator.add([1] * (model.args.max_position_embeddings + 1), GREEDY)
    assert err.value.code == "context_length_exceeded" and "too many" in err.value.message
    with pytest.raises(ContextLengthExceededError):
        generator.add([1, 2, 3], SamplingParams(max_tokens=model.args.max_position_embeddings))
    with pytest.raises(InvalidRequestError, match="KV cache") as err:  # could never fit
        generator.add([1] * 60, SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"
    # Two that fit only one at a time: the second waits for the first, then runs.
    a = generator.add([1] * 20, SamplingParams(temperature=0, max_tokens=30))
    b = generator.add([1] * 20, SamplingParams(temperature=0, max_tokens=30))
    generator.step()
    assert generator.num_sequences == 1 and len(generator.waiting) == 1
    finished = {e.uid for e in _drain(generator) if e.finish_reason}
    assert finished == {a, b}


def test_requests_without_max_tokens_share_the_budget(tiny_model):
    """No max_tokens means "up to the context window" (2048 here), but a request holds KV room
    for `open_reserve` tokens at a time: three such requests run together in a budget that
    could never hold one whole window, grow their room while it lasts, then end with "length"."""
    model, tokenizer = tiny_model
    budget = 3 * 200 * generator_bytes(model)  # 3 rows x 200 tokens; the window is 2048
    generator = BatchGenerator(model, tokenizer, kv_budget_bytes=budget, open_reserve=32)
    open_ended = SamplingParams(temperature=0, logit_bias={tokenizer.eos_id: -100})
    uids = [generator.add(p, open_ended) for p in prompts(tokenizer, 3)]
    for _ in range(4):
        generator.step()
    assert generator.num_sequences == 3 and not generator.waiting
    events = _drain(generator)
    ends = {e.uid: e for e in events if e.finish_reason}
    assert set(ends) == set(uids) and {e.finish_reason for e in ends.values()} == {"length"}
    # Rows x the longest row stay within 600 tokens: 3 rows of <= 200, then 2 of <= 300, then
    # the last alone grows to <= 600.
    lengths = sorted(ends[u].prompt_tokens + ends[u].completion_tokens for u in uids)
    assert all(n <= 600 // (3 - i) for i, n in enumerate(lengths)), lengths
    assert lengths[0] > 150 and lengths[2] > 500, lengths  # and the budget gets used
    # A prompt that leaves no room at all is refused naming the prompt, not max_tokens.
    with pytest.raises(InvalidRequestError) as err:
        generator.add([1] * 700, open_ended)
    assert err.value.param == "messages" and "KV cache" in err.value.message


def test_rows_out_of_room_together_leave_it_to_each_other(tiny_model):
    """The two choices of one open-ended request need more room at the same step, and the
    budget has it for one: the first ends with "length" and the second grows into its room
    (before, both ended there)."""
    model, tokenizer = tiny_model
    generator = BatchGenerator(
        model, tokenizer, kv_budget_bytes=2 * 200 * generator_bytes(model), open_reserve=32
    )
    params = SamplingParams(temperature=0, n=2, logit_bias={tokenizer.eos_id: -100})
    generator.add(prompts(tokenizer, 1)[0], params)
    ends = {e.index: e for e in _drain(generator) if e.finish_reason}
    assert {e.finish_reason for e in ends.values()} == {"length"}
    first, second = (ends[i].prompt_tokens + ends[i].completion_tokens for i in (0, 1))
    assert first <= 200 and 300 < second <= 400, (first, second)


def generator_bytes(model) -> int:
    return model.args.kv_bytes_per_token(model.model.norm.weight.dtype.size)


def _drain(generator):
    events = []
    while generator.has_work:
        events += generator.step()
    return events


def test_engine_thread_serves_other_threads(tiny_hf_checkpoint):
    """The engine thread loads the model itself; callers on other threads only see plain values."""
    import mlx_mistral

    engine = Engine(lambda: mlx_mistral.load(tiny_hf_checkpoint), EngineConfig(max_batch=8)).start()
    try:
        tokenizer = engine.tokenizer
        ps = prompts(tokenizer, 4)
        results: dict[int, list] = {}

        def client(i):
            results[i] = list(engine.submit(ps[i], GREEDY))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for events in results.values():
            assert events[-1].finish_reason in ("stop", "length")
            assert all(isinstance(e.token, int) for e in events)
            assert not any(isinstance(v, mx.array) for e in events for v in vars(e).values())
        assert len(results) == 4
        # A cancelled request ends at once and frees its slot.
        handle = engine.submit(ps[0], SamplingParams(temperature=0, max_tokens=500))
        first = next(iter(handle))
        handle.cancel()
        rest = list(handle)
        assert first.token is not None and rest[-1].finish_reason == "cancelled"
        assert engine.generator.num_sequences == 0
        # Leaving the loop early cancels too: the rest ends "cancelled", not after 1500 tokens.
        long = SamplingParams(temperature=0, max_tokens=1500, logit_bias={tokenizer.eos_id: -100})
        handle = engine.submit(ps[1], long)
        for _ in handle:
            break
        rest = list(handle)
        assert rest[-1].finish_reason == "cancelled" and len(rest) < 1000

        async def leave_early():
            handle = engine.submit(ps[2], long, loop=asyncio.get_running_loop())
            async for _ in handle:
                break
            await asyncio.sleep(0.05)  # the abandoned iterator is closed by the event loop
            return [event async for event in handle]

        rest = asyncio.run(leave_early())
        assert rest[-1].finish_reason == "cancelled" and len(rest) < 1000
        assert engine.num_active == 0
        # Idle again: the finished requests' buffers went back to the system, not to MLX's pool
        # (where a long context's KV would otherwise stay until the model is unloaded).
        deadline = time.monotonic() + 5
        while mx.get_cache_memory() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mx.get_cache_memory() == 0
    finally:
        engine.shutdown()


def test_lazy_arrays_do_not_cross_threads():
    """Pins the MLX behaviour the engine's design rests on (mlx >= 0.31.2: streams per thread)."""
    lazy = mx.arange(4) * 2
    errors = []

    def evaluate():
        try:
            mx.eval(lazy)
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=evaluate)
    t.start()
    t.join()
    evaluated = mx.arange(3) + 1
    mx.eval(evaluated)
    seen = []
    t = threading.Thread(target=lambda: seen.append(evaluated.tolist()))
    t.start()
    t.join()
    assert seen == [[1, 2, 3]]
    assert errors and "Stream" in errors[0]


def test_engine_queue_limit_counts_requests_waiting_for_room(tiny_hf_checkpoint):
    import mlx_mistral

    config = EngineConfig(max_batch=1, max_queue=2)
    engine = Engine(lambda: mlx_mistral.load(tiny_hf_checkpoint), config).start()
    try:
        long = SamplingParams(temperature=0, max_tokens=400, logit_bias={2: -100})
        running = engine.submit([1, 2, 3], long)
        next(iter(running))  # the first request is decoding; max_batch=1 keeps the rest waiting
        waiting = [engine.submit([1, 2, 3], long) for _ in range(2)]
        with pytest.raises(EngineOverloadedError) as err:
            engine.submit([1, 2, 3], long)
        assert err.value.retry_after > 0
        for handle in [running, *waiting]:
            handle.cancel()
    finally:
        engine.shutdown()


def test_long_prompt_prefills_in_chunks_while_others_decode(tiny_model):
    model, tokenizer = tiny_model
    # One token per step for the running stream: no speculation (drafts give several).
    generator = BatchGenerator(model, tokenizer, prefill_chunk=32, prompt_lookup=False)
    running = generator.add(prompts(tokenizer, 1)[0], SamplingParams(temperature=0, max_tokens=40))
    generator.step()
    long_prompt = tokenizer.encode("word " * 300, bos=True)
    newcomer = generator.add(long_prompt, SamplingParams(temperature=0, max_tokens=2))
    steps_until_first_token = 0
    while True:
        events = generator.step()
        steps_until_first_token += 1
        # The running stream gets a token on every step of the newcomer's prefill.
        assert any(e.uid == running and e.token is not None for e in events)
        if any(e.uid == newcomer for e in events):
            break
    assert steps_until_first_token == -(-len(long_prompt) // 32)


def test_prefix_cache_budget_counts_keys_and_bounds_entries():
    layers = [(mx.zeros((1, 2, 40, 8)), mx.zeros((1, 2, 40, 8)))]
    kv_bytes = 2 * layers[0][0].nbytes
    cache = PrefixCache(10 * kv_bytes, max_entries=3)
    for start in range(5):
        cache.store(list(range(start * 100, start * 100 + 40)), layers)
    assert len(cache) == 3  # the oldest two were evicted
    assert cache.nbytes > 3 * kv_bytes  # keys are counted, not only the KV arrays
    assert cache.lookup(list(range(0, 40))) is None
    hit = cache.lookup(list(range(400, 440)) + [7, 8])
    assert hit is not None and hit.length == 40
    # A longer conversation replaces the entry that is its prefix.
    cache.store(list(range(400, 440)) + [7, 8, 9] + [1] * 30, [(mx.zeros((1, 2, 73, 8)),) * 2])
    assert len(cache) == 3 and cache.lookup(list(range(400, 440)) + [7, 8, 9, 1, 1, 1]).length == 45


def test_prefix_cache_hit_makes_its_entry_the_most_recently_used():
    """Store A, B, C in room for three; a hit on A refreshes it, so the fourth entry evicts B."""
    layers = [(mx.zeros((1, 2, 20, 8)), mx.zeros((1, 2, 20, 8)))]
    cache = PrefixCache(1 << 30, max_entries=3)
    a, b, c, d = (list(range(start, start + 20)) for start in (0, 100, 200, 300))
    for tokens in (a, b, c):
        cache.store(tokens, layers)
    assert cache.lookup(a + [1]).length == 20
    cache.store(d, layers)
    hits = [cache.lookup(tokens + [1]) for tokens in (a, b, c, d)]
    assert [hit and hit.length for hit in hits] == [20, None, 20, 20]


EXIT_AFTER_SHUTDOWN = """
import sys
import mlx_mistral
from mlx_mistral import Engine, SamplingParams
engine = Engine(lambda: mlx_mistral.load(sys.argv[1])).start()
ids = engine.tokenizer.encode("[INST] hi [/INST]", bos=True)
list(engine.submit(ids, SamplingParams(temperature=0, max_tokens=20, logit_bias={2: -100})))
engine.shutdown()
"""


def test_a_script_exits_cleanly_right_after_engine_shutdown(tiny_hf_checkpoint):
    """The engine thread tears down its MLX streams before it ends; left to the thread's exit,
    that teardown raced the interpreter's and aborted the process ("terminate called")."""
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_AFTER_SHUTDOWN, str(tiny_hf_checkpoint)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr[-2000:]


def test_batch_generate_equals_generate_per_prompt(tiny_model):
    """Chat messages, raw text and token ids, decoded together: each text is what `generate`
    gives for that prompt alone (raw text and ids keep the first word's leading space)."""
    import mlx_mistral

    model, tokenizer = tiny_model
    prompts_ = [
        [{"role": "user", "content": "Hello!"}],
        "The capital of France is",
        tokenizer.encode("Once upon a time", bos=True),
        [{"role": "user", "content": "Tell me a story about a cat."}],
    ]
    texts = mlx_mistral.batch_generate(model, tokenizer, prompts_, params=GREEDY)
    assert texts == [mlx_mistral.generate(model, tokenizer, p, params=GREEDY) for p in prompts_]
