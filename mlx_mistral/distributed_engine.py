"""Serving a tensor-parallel model: rank 0 schedules and samples, the other ranks replay its steps.

Under `mlx.launch ... -- mlx-mistral serve --distributed`, rank 0 runs the HTTP server, the
engine thread and the `BatchGenerator`; every other rank runs `Follower.run`, holding its shard
of the model (`mlx_mistral.distributed`) and a mirror of rank 0's KV caches (its share of the
heads). Each forward pass and each change to the caches that the generator makes is first
announced by `Leader` (the generator's `replica` hook) as a small int32 message, which every
follower replays on its shard, so the ranks' caches stay row for row alike and their forwards
meet in the same all-reduces. Sampling happens once, on rank 0: the followers never see logits
(they do not project at all), only the token ids rank 0 chose, so seeds and every sampling
parameter behave as on one machine.

Every rank must run the same all-reduces in the same order, so each forward is evaluated (or
scheduled with `mx.async_eval`) before the next message is sent. A message is a header
all-reduced on its own (op, two arguments, payload length), then its
payload: `all_sum` with rank 0 contributing the values and the others zeros is a broadcast that
every backend has. The decode step's payload, the tokens drawn by the previous step, is still
being computed when the next step is scheduled (`batch`'s pipelining); its broadcast stays lazy
and feeds the forward on every rank, so rank 0 never waits for it.

The in-memory prefix cache is mirrored by id: rank 0's `PrefixCache` decides what to keep and
what to evict, and announces it (an entry made of a prompt just prefilled or of a finished
row's cache; an entry dropped; a prefill that starts from an entry's first L tokens), and each
follower keeps the same entries of its own heads. Speculative decoding's verification forward
and the cache trim after it are announced like a decode step, and so are the forwards rank 0
times once to learn what a wide forward costs (`forward_cost`: the timing includes the links).
Not replicated: the disk prompt cache (each rank would need its own files, kept in step), so
`--prompt-cache-dir` is refused.
With `--kv-bits` every rank quantizes its own heads' cache alike.

A rank that dies makes the next collective fail on the others ("connection to a peer was
lost"): rank 0's engine ends every request with an error and the process stops itself; a
follower exits with status 1.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

import mlx.core as mx

from .cache import BatchKVCache, cache_from_state, filter_caches, merge_caches, trim_cache_rows
from .model import Model
from .prefix_cache import LayerKV, layers_copy, layers_prefix

log = logging.getLogger("mlx_mistral.distributed")

# Op codes of the messages rank 0 sends (the header's first int).
PREFILL = 1  # a: request uid, b: 1 for the prompt's last chunk; payload: the chunk's token ids
JOIN = 2  # a: request uid, b: n; the prefilled request's rows join the batch, n times
DECODE = 3  # payload: one token per running row
FILTER = 4  # payload: the rows to keep, in order (none: the batch is empty)
DROP = 5  # a: request uid; a cancelled request's prefill cache is dropped
STOP = 6  # rank 0's engine has stopped: exit
REUSE = 7  # a: request uid, b: prefix-cache entry; payload: [length]; its prefill starts there
STORE_PROMPT = 8  # a: entry, b: request uid; the prompt just joined becomes the entry
STORE_ROW = 9  # a: entry, b: row; that row's cache (a finished sequence) becomes the entry
FORGET = 10  # a: entry; the prefix cache dropped it
VERIFY = 11  # a: rows, b: positions; payload: each row's token and draft (speculation)
TRIM = 12  # payload: per row, the positions its cache drops after a verification
PROBE = 13  # a: tokens; a forward timed by rank 0 (`forward_cost`), on a fresh cache
HEADER_INTS = 4


def token_ids(received: mx.array, vocab_size: int) -> mx.array:
    """Broadcast token ids made safe to embed. A broadcast that fails (a peer died) leaves its
    buffer unwritten, and the embedding's gather reads wherever stale ids point: rank 0 crashed
    with SIGSEGV there in about 1 of 15 killed peers, before it could tell its clients.
    Clipped, the forward runs on harmless ids and the failure reaches the engine as the
    collective's error.
    """
    return mx.clip(received, 0, vocab_size - 1)


class Leader:
    """Rank 0's side of the lockstep: `BatchGenerator` calls it before each model or cache op.

    `bytes_sent` counts what the messages carry (4 bytes an int), for the benchmark.
    """

    def __init__(self, group: mx.distributed.Group, vocab_size: int):
        self.group = group
        self.vocab_size = vocab_size
        self.bytes_sent = 0
        self.messages = 0

    def _broadcast(self, values: mx.array) -> mx.array:
        self.bytes_sent += values.size * 4
        return mx.distributed.all_sum(values.astype(mx.int32), group=self.group)

    def _send(self, op: int, a: int = 0, b: int = 0, payload: mx.array | None = None):
        """Announce `op`; returns the broadcast payload (lazy), which the op must consume."""
        size = 0 if payload is None else payload.size
        mx.eval(self._broadcast(mx.array([op, a, b, size], dtype=mx.int32)))
        self.messages += 1
        return None if payload is None else self._broadcast(payload)

    def prefill(self, uid: int, chunk: mx.array, *, last: bool) -> mx.array:
        """Announce a prefill chunk (1, L); returns the chunk to feed the model."""
        tokens = self._send(PREFILL, uid, int(last), chunk.reshape(-1))
        return token_ids(tokens, self.vocab_size).reshape(chunk.shape)

    def join(self, uid: int, n: int, logits: mx.array) -> None:
        """Announce that a prefilled request's rows join the batch. `logits`, its last
        chunk's, are scheduled first: a message must follow the forward passes made before
        it, as on the followers, or the ranks would pair up different all-reduces."""
        mx.async_eval(logits)
        self._send(JOIN, uid, n)

    def decode(self, tokens: mx.array) -> mx.array:
        """Announce a decode step over `tokens` [B] (possibly not computed yet)."""
        return token_ids(self._send(DECODE, payload=tokens), self.vocab_size)

    def filter(self, rows: Sequence[int]) -> None:
        if rows:
            mx.eval(self._send(FILTER, payload=mx.array(list(rows), dtype=mx.int32)))
        else:
            self._send(FILTER)

    def drop(self, uid: int) -> None:
        self._send(DROP, uid)

    def reuse(self, uid: int, entry: int, length: int) -> None:
        """Announce that request `uid`'s prefill starts from `entry`'s first `length` tokens."""
        mx.eval(self._send(REUSE, uid, entry, mx.array([length], dtype=mx.int32)))

    def store_prompt(self, entry: int, uid: int) -> None:
        self._send(STORE_PROMPT, entry, uid)

    def store_row(self, entry: int, row: int) -> None:
        self._send(STORE_ROW, entry, row)

    def forget(self, entry: int) -> None:
        self._send(FORGET, entry)

    def verify(self, tokens: mx.array) -> mx.array:
        """Announce a verification forward over `tokens` [B, W]; returns them to feed."""
        rows, width = tokens.shape
        tokens = self._send(VERIFY, rows, width, tokens.reshape(-1))
        return token_ids(tokens, self.vocab_size).reshape(rows, width)

    def probe(self, tokens: int) -> None:
        self._send(PROBE, tokens)

    def trim(self, drop: Sequence[int]) -> None:
        mx.eval(self._send(TRIM, payload=mx.array(list(drop), dtype=mx.int32)))

    def stop(self) -> None:
        self._send(STOP)


class Follower:
    """A rank other than 0: replays rank 0's ops on its shard until told to stop."""

    def __init__(self, model: Model, group: mx.distributed.Group, *, kv_bits: int | None = None):
        self.model = model
        self.kv_bits = kv_bits  # rank 0's cache format (`--kv-bits`): every rank's is alike
        self.group = group
        self.prefilling: dict[int, list[BatchKVCache]] = {}
        self.cache: list[BatchKVCache] | None = None
        self.entries: dict[int, list[LayerKV]] = {}  # rank 0's prefix-cache entries, our heads
        # The prompt KV of the request that joined last, until rank 0 stores it (or not).
        self.joined: tuple[int, list[LayerKV]] | None = None
        self.steps = 0

    def _receive(self, shape: int) -> mx.array:
        return mx.distributed.all_sum(mx.zeros((shape,), dtype=mx.int32), group=self.group)

    def run(self) -> None:
        """Replay until STOP. Raises RuntimeError when a peer is lost."""
        while True:
            header = self._receive(HEADER_INTS)
            op, a, b, size = header.tolist()
            payload = self._receive(size) if size else None
            if op == STOP:
                return
            self._apply(op, a, b, payload)
            self.steps += 1

    def _apply(self, op: int, a: int, b: int, payload: mx.array | None) -> None:
        model = self.model
        if op in (PREFILL, DECODE, VERIFY):
            self.joined = None  # past the point where rank 0 stores a joined prompt
            payload = token_ids(payload, model.args.vocab_size)
        if op == PREFILL:
            cache = self.prefilling.get(a) or model.make_cache(kv_bits=self.kv_bits)
            self.prefilling[a] = cache
            h = model.hidden_states(payload[None], cache)
            # Evaluate what rank 0 evaluates, so that both run the same all-reduces: a middle
            # chunk's caches (the last layer's outputs are not needed, nor reduced), or for the
            # last chunk the hidden states its logits come from.
            mx.eval(h if b else [c.state for c in cache])
        elif op == JOIN:
            joined = self.prefilling.pop(a)
            self.joined = (a, [c.state for c in joined])
            self.cache = merge_caches(([self.cache] if self.cache else []) + [joined] * b)
        elif op == DECODE:
            h = model.hidden_states(payload[:, None], self.cache)
            mx.async_eval(h)  # the next header's all-reduce queues behind it, as on rank 0
        elif op == FILTER:
            if payload is None:  # the batch is empty: rank 0 has fallen idle, and so do we
                self.cache = None
                mx.clear_cache()
            else:
                filter_caches(self.cache, payload.tolist())
        elif op == DROP:
            self.prefilling.pop(a, None)
        elif op == REUSE:
            length = payload.item()
            self.prefilling[a] = [
                cache_from_state(k, v) for k, v in layers_prefix(self.entries[b], length)
            ]
        elif op == STORE_PROMPT:
            if self.joined is None or self.joined[0] != b:
                raise RuntimeError(f"rank 0 stored the prompt of request {b}, not the last joined")
            self.entries[a] = layers_copy(self.joined[1])  # as rank 0's prefix cache keeps it
            self.joined = None
        elif op == STORE_ROW:
            self.entries[a] = layers_copy([c.extract(b) for c in self.cache])
        elif op == FORGET:
            del self.entries[a]
        elif op == VERIFY:
            h = model.hidden_states(payload.reshape(a, b), self.cache)
            mx.async_eval(h)
        elif op == TRIM:
            trim_cache_rows(self.cache, payload.tolist())
        elif op == PROBE:
            h = model.hidden_states(mx.zeros((1, a), dtype=mx.int32), model.make_cache())
            mx.eval(h)
        else:
            raise RuntimeError(f"unknown lockstep op {op} from rank 0")


def attach_leader(generator, group: mx.distributed.Group) -> Leader:
    """Make `generator` (rank 0's BatchGenerator) announce its ops to the other ranks.

    Each rank's KV cache holds its share of the KV heads, so a token costs each rank
    1/size of what `kv_bytes_per_token` counts for the whole model; the budget (rank 0's
    memory) is spent at that rate. The prefix cache's entries are rank 0's share too, so its
    budget holds on every rank; the followers mirror them (`PrefixCache.on_drop` says when
    one goes).
    """
    prefix_cache = generator.prefix_cache
    if prefix_cache is not None and prefix_cache.disk is not None:
        raise ValueError("the disk prompt cache is not replicated across ranks: turn it off")
    leader = Leader(group, generator.model.args.vocab_size)
    generator.kv_bytes_per_token //= group.size()
    generator.replica = leader
    if prefix_cache is not None:
        prefix_cache.on_drop = leader.forget
    return leader


def leader_exit_hook(leader: Leader):
    """What rank 0's engine thread runs as it ends: tell the followers to stop; after a
    failure (a lost rank), stop this process too, since the group can serve no more."""

    def on_exit(error: BaseException | None) -> None:
        if error is None:
            try:
                leader.stop()
                return
            except RuntimeError as exc:  # a follower is gone already: nothing to stop
                error = exc
        log.error("the distributed group failed (%s); stopping this server", error)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: drain, then exit

    return on_exit


def run_follower(
    model: str,
    group: mx.distributed.Group,
    *,
    kv_bits: int | None = None,
    dtype: str | None = None,
) -> int:
    """A rank other than 0 of `serve --distributed`: load its shard, replay until rank 0 stops.
    Returns the exit status: 0 when rank 0 stopped the group, 1 when a rank was lost."""
    from .loader import load

    rank = group.rank()
    # Ctrl-C on `mlx.launch` reaches every rank: rank 0 drains its streams, then stops this
    # one with a message; dying at once would fail those streams.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info(
        "rank %d of %d (pid %d): loading its shard of %s", rank, group.size(), os.getpid(), model
    )
    follower = Follower(load(model, group=group, dtype=dtype)[0], group, kv_bits=kv_bits)
    log.info("rank %d: following rank 0", rank)
    try:
        follower.run()
    except RuntimeError as exc:
        log.error("rank %d: %s; exiting", rank, exc)
        return 1
    log.info("rank %d: rank 0 stopped after %d steps; exiting", rank, follower.steps)
    return 0
