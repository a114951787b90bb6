"""Continuous batching on one thread: requests join and leave a running batch between steps.

`BatchGenerator.step()` is one scheduling iteration: admit waiting requests that fit the KV
budget, prefill one chunk of the oldest admitted prompt, then decode one token for every running
sequence in a single batched forward. The engine thread and the Python API both drive it.

Decoding is pipelined, as in mlx-lm: a step schedules the forward pass and the draw of token
t+1 on the tokens of step t while those are still being computed (`mx.async_eval`), and only
then reads step t's tokens on the host, detokenizes and emits them. The device (the Metal GPU,
or MLX's CPU worker thread) works while Python does the bookkeeping. A sequence that turns out
to have finished at step t costs one discarded draw. Batches with a grammar-constrained row
step synchronously: the grammar needs token t before it can mask step t+1.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import mlx.core as mx

from .cache import (
    BatchKVCache,
    cache_from_state,
    filter_caches,
    kv_bytes_per_token,
    merge_caches,
    trim_cache_rows,
)
from .drafts import Speculator
from .errors import ContextLengthExceededError, InvalidRequestError
from .forward_cost import forward_cost_of
from .model import Model
from .prefix_cache import PrefixCache
from .sampling.params import SamplingParams
from .sampling.sampler import PendingSample, TokenLogprobs, sample_async
from .sampling.state import SamplerState
from .speculative import SpeculationSchedule, Verification, choose_tokens
from .stopping import StopMatcher
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .distributed_engine import Leader


class TokenConstraint(Protocol):
    """A grammar that decides which tokens a sequence may take next (structured output)."""

    def allowed_mask(self) -> mx.array: ...  # bool [vocab]

    def advance(self, token: int) -> None: ...

    def forced_finish_reason(self) -> str | None: ...  # e.g. "tool_calls" once a call is complete


@dataclass
class TokenEvent:
    """What one sequence produced in one step: plain Python values only (safe across threads)."""

    uid: int
    index: int  # choice index among the request's n
    text: str
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", or the constraint's reason
    logprobs: TokenLogprobs | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the text ("stop" only)
    accepted_prediction_tokens: int = 0  # drafted tokens the model agreed with, so far
    rejected_prediction_tokens: int = 0  # drafted tokens it did not


@dataclass
class _Sequence:
    uid: int
    index: int
    state: SamplerState
    detokenizer: object
    stop: StopMatcher
    constraint: TokenConstraint | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    finished: bool = False
    reserved: int = 0  # KV budget held for this row, in tokens (prompt included)
    speculator: Speculator | None = None  # its draft sources (speculative decoding)


@dataclass
class _Request:
    uid: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    reserve_new: int  # generated tokens the KV budget holds room for (grows, up to max_new)
    constraints: list[TokenConstraint | None]
    cache: list[BatchKVCache] | None = None
    prefilled: int = 0
    cached_tokens: int = 0
    continuation: bool = False  # the text continues a raw prompt: keep its first leading space
    prediction: list[int] | None = None  # Predicted Outputs: the draft the client sent

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.reserve_new


def _final_text(seq: _Sequence) -> str:
    """What a finishing sequence still holds back (incomplete UTF-8, a partial stop string)."""
    text, hit = seq.stop.feed(seq.detokenizer.finalize())
    return text if hit else text + seq.stop.flush()


class BatchGenerator:
    """Schedules requests over one model; not thread-safe (one thread drives it).

    Args:
        model, tokenizer: what `mlx_mistral.load` returns.
        prefill_chunk: prompt tokens per prefill step; bounds how long a new long prompt stalls
            the running streams.
        kv_budget_bytes: KV memory the running batch may use; a request waits until it fits,
            and is refused when it could never fit.
        prefix_cache: reuse KV state of earlier sequences sharing a prompt prefix.
        max_batch: most sequences decoded together.
        open_reserve: KV room, in generated tokens, held for a request without max_tokens, and
            added again each time it uses it up. Reserving the whole context instead (4 GiB a
            request for v0.2's 32k window in float16) would refuse such requests outright on a
            16 GB Mac, or run them one at a time. When the budget cannot grow a request's
            room, it finishes with "length".
        prompt_lookup: draft tokens from the sequence's own prompt and output (speculative
            decoding; see `mlx_mistral.drafts`). Exact: only the speed changes.
        kv_bits: store keys and values quantized to 8 or 4 bits (None: the compute dtype).
        forward_cost: a forward of T tokens in one-token forwards, which decides how wide to
            verify drafts (None: measured on the model at the first decision, once per model,
            see `mlx_mistral.forward_cost`).
        predictions: use requests' predictions as drafts (False: accepted and ignored).
        defer_measurement: time the forward when the engine is idle, not at the first drafts
            (the server: no answer stalls for it; see `SpeculationSchedule`).
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        prefill_chunk: int = 512,
        kv_budget_bytes: int | None = None,
        prefix_cache: PrefixCache | None = None,
        max_batch: int = 32,
        open_reserve: int = 1024,
        prompt_lookup: bool = True,
        kv_bits: int | None = None,
        forward_cost: Callable[[int], float] | None = None,
        predictions: bool = True,
        defer_measurement: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.args = model.args
        self.prefill_chunk = prefill_chunk
        self.max_batch = max_batch
        self.open_reserve = open_reserve
        self.prompt_lookup = prompt_lookup
        self.predictions = predictions  # False: a request's prediction is accepted, not used
        # The cache holds the compute dtype, which the norm weights carry.
        dtype_bytes = model.model.norm.weight.dtype.size
        self.kv_bytes_per_token = kv_bytes_per_token(self.args, dtype_bytes, kv_bits)
        self.kv_bits = kv_bits
        self.kv_budget_bytes = kv_budget_bytes
        self.prefix_cache = prefix_cache
        self.context_length = self.args.max_position_embeddings
        self._uids = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.prefilling: deque[_Request] = deque()
        self.running: list[_Sequence] = []
        self.cache: list[BatchKVCache] | None = None
        self._requests: dict[int, _Request] = {}
        self._cancelled: set[int] = set()
        # The draw scheduled by the last decode step for the first len(rows) running rows
        # (newcomers are appended after them), not yet read on the host.
        self._in_flight: PendingSample | None = None
        # Tensor-parallel serving (`distributed_engine.Leader`), a thin hook: every forward and
        # KV-cache change below is announced to the other ranks first, which replay it.
        self.replica: Leader | None = None
        self.speculation = SpeculationSchedule(
            forward_cost, self._measure_forward, defer=defer_measurement
        )

    # -- submission ----------------------------------------------------------------------------
    def check(
        self, prompt: Sequence[int], params: SamplingParams, *, prompt_field: str = "messages"
    ) -> int:
        """Validate a request against the model; returns how many tokens it may generate.

        `prompt_field` names the request field the prompt came from, for the error's `param`.

        Raises:
            ContextLengthExceededError: the prompt (plus max_tokens) exceeds the context window.
            InvalidRequestError: it could never fit the KV budget, or a bad token id.
        """
        return self._plan(prompt, params, prompt_field)[0]

    def _plan(
        self, prompt: Sequence[int], params: SamplingParams, prompt_field: str
    ) -> tuple[int, int]:
        """`check`, returning (tokens it may generate, tokens of KV room held at admission)."""
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param=prompt_field)
        if max(prompt) >= self.args.vocab_size or min(prompt) < 0:
            raise InvalidRequestError(
                "the prompt has token ids outside the vocabulary", param="prompt"
            )
        params.validate_for_vocab(self.args.vocab_size)
        room = self.context_length - len(prompt)
        if room < 0 or (params.max_tokens is not None and params.max_tokens > room):
            asked = len(prompt) + (params.max_tokens or 0)
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.context_length} tokens; the request "
                f"needs {asked} ({len(prompt)} in the prompt"
                + (f" + {params.max_tokens} max_tokens" if params.max_tokens else "")
                + f"), {asked - self.context_length} too many",
                param=prompt_field if room < 0 else "max_tokens",
                prompt_tokens=len(prompt) if room < 0 else None,
                context_length=self.context_length,
            )
        max_new = room if params.max_tokens is None else params.max_tokens
        reserve = self._initial_reserve(params, len(prompt), max_new)
        if self.kv_budget_bytes is not None:
            need = params.n * (len(prompt) + reserve) * self.kv_bytes_per_token
            if need > self.kv_budget_bytes:  # retrying cannot help: a 400, not a 503
                self._refuse_over_budget(params, len(prompt), need, prompt_field)
        return max_new, reserve

    def _refuse_over_budget(
        self, params: SamplingParams, prompt_len: int, need: int, prompt_field: str
    ) -> None:
        """Raise the 400 for a request whose KV `need` exceeds the whole budget, naming what
        to change: the prompt when it cannot fit even with one generated token, else max_tokens."""
        budget = f"more than this server's {_mib(self.kv_budget_bytes or 0)} (--max-memory)"
        rows = f" for n={params.n}" if params.n > 1 else ""
        prompt_need = params.n * (prompt_len + 1) * self.kv_bytes_per_token
        if params.max_tokens is None or prompt_need > (self.kv_budget_bytes or 0):
            raise InvalidRequestError(
                f"the prompt's {prompt_len} tokens need {_mib(prompt_need)} of KV cache{rows}, "
                f"{budget}; shorten the prompt" + (" or lower n" if params.n > 1 else ""),
                param=prompt_field,
                code="context_length_exceeded",  # too long for this server's memory
            )
        raise InvalidRequestError(
            f"the request needs {_mib(need)} of KV cache for its prompt plus max_tokens{rows}, "
            f"{budget}; lower max_tokens" + (" or n" if params.n > 1 else ""),
            param="max_tokens",
            code="context_length_exceeded",
        )

    def _initial_reserve(self, params: SamplingParams, prompt_len: int, max_new: int) -> int:
        """Generated tokens to hold KV room for at admission: all of max_tokens when given,
        else `open_reserve`, or what the budget has room for next to a long prompt."""
        if params.max_tokens is not None:
            return max_new
        reserve = min(max_new, self.open_reserve)
        if self.kv_budget_bytes is not None:
            fits = self.kv_budget_bytes // (params.n * self.kv_bytes_per_token) - prompt_len
            reserve = max(1, min(reserve, fits))
        return reserve

    def add(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        constraints: Sequence[TokenConstraint | None] | None = None,
        continuation: bool = False,
        prediction: str | Sequence[int] | None = None,
    ) -> int:
        """Queue a request; returns its uid. Raises what `check` raises.

        `continuation`: the prompt is raw text that the output continues, so the first word
        keeps its leading space; a chat answer starts without it. `prediction`: the expected
        output (text or token ids; OpenAI's Predicted Outputs), used as a draft to verify.
        """
        max_new, reserve = self._plan(prompt, params, "messages")
        uid = next(self._uids)
        request = _Request(
            uid,
            list(prompt),
            params,
            max_new,
            reserve,
            list(constraints or [None] * params.n),
            continuation=continuation,
            prediction=self._prediction_ids(prediction),
        )
        self._requests[uid] = request
        self.waiting.append(request)
        return uid

    def _prediction_ids(self, prediction: str | Sequence[int] | None) -> list[int] | None:
        if isinstance(prediction, str):
            return self.tokenizer.encode(prediction) or None
        if prediction is not None and any(not 0 <= t < self.args.vocab_size for t in prediction):
            raise InvalidRequestError(
                "the prediction has token ids outside the vocabulary", param="prediction"
            )
        return list(prediction) if prediction else None

    def cancel(self, uid: int) -> None:
        if uid in self._requests:
            self._cancelled.add(uid)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def num_sequences(self) -> int:
        return len(self.running)

    # -- the scheduling iteration ------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_cancelled(events)
        self._admit(events)
        if self.prefilling:
            events += self._prefill_chunk(self.prefilling[0])
        if self.running:
            events += self._decode()
        return events

    def _batch_bytes(self, extra_rows: int, extra_len: int) -> int:
        # Rows that finished earlier in this step no longer count: when several rows run out of
        # room together, the first to end leaves it to the others.
        live = [seq for seq in self.running if not seq.finished]
        rows = len(live) + sum(r.params.n for r in self.prefilling) + extra_rows
        longest = max(
            [seq.reserved for seq in live]
            + [r.reserved_tokens for r in self.prefilling]
            + [extra_len]
        )
        return rows * longest * self.kv_bytes_per_token  # rows are left-padded to the longest

    def _admit(self, events: list[TokenEvent]) -> None:
        while self.waiting:
            request = self.waiting[0]
            if request.max_new == 0:  # nothing to generate: answer without touching the model
                self.waiting.popleft()
                del self._requests[request.uid]
                for i in range(request.params.n):
                    events.append(
                        TokenEvent(
                            request.uid,
                            i,
                            "",
                            finish_reason="length",
                            prompt_tokens=len(request.prompt),
                        )
                    )
                continue
            rows = len(self.running) + sum(r.params.n for r in self.prefilling)
            if rows and rows + request.params.n > self.max_batch:
                return
            if self.kv_budget_bytes is not None and rows:
                if (
                    self._batch_bytes(request.params.n, request.reserved_tokens)
                    > self.kv_budget_bytes
                ):
                    return  # waits for running sequences to finish
            self.waiting.popleft()
            self.prefilling.append(request)

    def _start_prefill(self, request: _Request) -> None:
        """Take what the prefix cache has of the prompt. Done when the request's prefill begins,
        not when it is admitted: requests admitted together (a shared system prompt) then find
        what the ones prefilled before them stored."""
        hit = self.prefix_cache.lookup(request.prompt) if self.prefix_cache is not None else None
        if hit is not None:
            request.cache = [cache_from_state(k, v) for k, v in hit.layers]
            request.prefilled = request.cached_tokens = hit.length
            if self.replica is not None:
                self.replica.reuse(request.uid, hit.entry, hit.length)
        else:
            request.cache = self.model.make_cache(kv_bits=self.kv_bits)

    def _prefill_chunk(self, request: _Request) -> list[TokenEvent]:
        if request.cache is None:
            self._start_prefill(request)
        start = request.prefilled
        end = min(len(request.prompt), start + self.prefill_chunk)
        chunk = mx.array([request.prompt[start:end]])
        if self.replica is not None:
            chunk = self.replica.prefill(request.uid, chunk, last=end == len(request.prompt))
        h = self.model.hidden_states(chunk, request.cache)
        request.prefilled = end
        if end < len(request.prompt):
            mx.eval([c.state for c in request.cache])
            return []
        self.prefilling.popleft()
        logits = self.model.project(h[:, -1])  # (1, vocab)
        prompt_kv = [c.state for c in request.cache]
        n = request.params.n
        sequences = []
        for i, state in enumerate(
            SamplerState.for_choices(request.params, request.prompt, self.args.vocab_size)
        ):
            detok = self.tokenizer.detokenizer(continuation=request.continuation)
            sequences.append(
                _Sequence(
                    request.uid,
                    i,
                    state,
                    detok,
                    StopMatcher(request.params.stop),
                    request.constraints[i],
                    reserved=request.reserved_tokens,
                    speculator=self._speculator(request),
                )
            )
        self.cache = merge_caches(([self.cache] if self.cache else []) + [request.cache] * n)
        if self.replica is not None:
            self.replica.join(request.uid, n, logits)
        request.cache = None
        self.running.extend(sequences)
        self.speculation.newcomer()
        events = self._sample_and_emit(mx.repeat(logits, n, axis=0), sequences)
        if self.prefix_cache is not None:  # after the first token: off the TTFT path
            # Concurrent requests share it; a restarted server finds it on disk.
            entry = self.prefix_cache.store(request.prompt, prompt_kv, persist=True)
            if self.replica is not None and entry is not None:
                self.replica.store_prompt(entry, request.uid)
        return events

    def _speculator(self, request: _Request) -> Speculator | None:
        prediction = request.prediction if self.predictions else None
        if not (self.prompt_lookup or prediction):
            return None
        return Speculator(request.prompt, prediction, prompt_lookup=self.prompt_lookup)

    def _decode(self) -> list[TokenEvent]:
        # A row that may propose a draft needs its newest token on the host; so does a grammar.
        lag = 0 if self._in_flight is None else 1
        speculate = self.speculation.look() and any(
            seq.speculator and seq.speculator.may_propose(lag) for seq in self.running
        )
        if speculate or any(seq.constraint is not None for seq in self.running):
            events = self._settle()
            if not self.running:
                return events
            drafts = [self._draft(seq) for seq in self.running] if speculate else []
            if any(drafts):
                rates = [seq.speculator.rate if d else 0.0 for seq, d in zip(self.running, drafts)]
                width = self.speculation.width([len(d) for d in drafts], rates)
                if width:
                    return events + self._speculate([d[:width] for d in drafts])
                for seq, draft in zip(self.running, drafts):
                    if draft:  # not worth verifying in this batch: decode plainly a while
                        seq.speculator.decline()
            if speculate:
                self.speculation.found_nothing()
            tokens = mx.array([seq.tokens[-1] for seq in self.running])
            return events + self._sample_and_emit(self._next_logits(tokens), list(self.running))
        # Schedule step t+1 on step t's pending tokens, then read step t's.
        inputs = self._pending_tokens()
        previous = self._in_flight
        rows = list(self.running)
        self._in_flight = sample_async(self._next_logits(inputs), [seq.state for seq in rows])
        if previous is None:
            return []
        return self._emit_all(previous, rows[: previous.tokens.shape[0]])

    def _measure_forward(self) -> Callable[[int], float]:
        """The loaded model's forward cost, timed the first time a decision needs it."""
        return forward_cost_of(self.model, None if self.replica is None else self.replica.probe)

    def _next_logits(self, tokens: mx.array) -> mx.array:
        if self.replica is not None:
            tokens = self.replica.decode(tokens)
        h = self.model.hidden_states(tokens[:, None], self.cache)
        return self.model.project(h[:, -1])

    def _pending_tokens(self) -> mx.array:
        """Each running row's newest token: the in-flight draw's for the rows it covers, the
        host's for rows that joined after it."""
        if self._in_flight is None:
            return mx.array([seq.tokens[-1] for seq in self.running])
        covered = self._in_flight.tokens.shape[0]
        if covered == len(self.running):
            return self._in_flight.tokens
        joined = mx.array([seq.tokens[-1] for seq in self.running[covered:]])
        return mx.concatenate([self._in_flight.tokens.astype(joined.dtype), joined])

    def _settle(self) -> list[TokenEvent]:
        """Read and emit the in-flight draw, if any (before a synchronous step)."""
        previous, self._in_flight = self._in_flight, None
        if previous is None:
            return []
        return self._emit_all(previous, self.running[: previous.tokens.shape[0]])

    def _draft(self, seq: _Sequence) -> list[int]:
        if seq.speculator is None:
            return []
        # Room for the draft and the token after it within max_tokens and the context.
        request = self._requests[seq.uid]
        room = min(request.max_new, self.context_length - len(request.prompt)) - len(seq.tokens)
        return seq.speculator.propose(room - 1)

    def _speculate(self, drafts: list[list[int]]) -> list[TokenEvent]:
        """Verify every row's draft in one forward (rows without one just decode a token).

        Rows are padded to the longest draft (which :func:`verification_width` keeps short
        when rows without a draft would pay for it); each row then keeps the KV of the tokens
        it accepted, and `trim_cache_rows` re-aligns the rows that kept fewer (see its comment).
        """
        rows, width = list(self.running), max(len(d) for d in drafts)
        inputs = [[seq.tokens[-1], *d, *[0] * (width - len(d))] for seq, d in zip(rows, drafts)]
        tokens = mx.array(inputs)
        if self.replica is not None:
            tokens = self.replica.verify(tokens)
        logits = self.model.project(self.model.hidden_states(tokens, self.cache))
        if any(seq.constraint is not None for seq, d in zip(rows, drafts) if d):
            events = self._accept_in_order(logits, rows, drafts)
        else:
            events = self._accept_at_once(logits, rows, drafts)
        emitted, accepted = [0] * len(rows), [0] * len(rows)
        for i, event in events:
            emitted[i] += 1
            proposal = drafts[i][emitted[i] - 1] if emitted[i] <= len(drafts[i]) else None
            accepted[i] += event.token == proposal
        for seq, draft, n in zip(rows, drafts, accepted):
            if draft:
                seq.speculator.record(len(draft), n)
        for i, event in events:  # the step's counts, known once its verification is done
            if drafts[i]:
                event.accepted_prediction_tokens = rows[i].speculator.accepted
                event.rejected_prediction_tokens = rows[i].speculator.rejected
        # Row i fed its last token and its draft; the KV of the last `emitted` of them is kept.
        drop = [width + 1 - n for n in emitted]
        if self.replica is not None:
            self.replica.trim(drop)
        trim_cache_rows(self.cache, drop)
        self._retire_finished()
        return [event for _, event in events]

    def _accept_at_once(
        self, logits: mx.array, rows: list[_Sequence], drafts: list[list[int]]
    ) -> list[tuple[int, TokenEvent]]:
        """All positions drawn in one pass (:class:`Verification`), then each row emits its
        accepted tokens and the one after, up to where it finishes."""
        verified = Verification(
            logits, [s.state for s in rows], drafts, self._allowed(rows, logits.shape[-1])
        )
        events: list[tuple[int, TokenEvent]] = []
        for i, seq in enumerate(rows):
            for token, lp in zip(verified.tokens[i], verified.logprobs[i]):
                events.append((i, self._emit(seq, token, lp)))
                if seq.finished:
                    break
            verified.commit(i, sum(1 for r, _ in events if r == i))
        return events

    def _accept_in_order(
        self, logits: mx.array, rows: list[_Sequence], drafts: list[list[int]]
    ) -> list[tuple[int, TokenEvent]]:
        """Position by position: penalties and grammars of a position see the tokens before
        it, and a sampled row's randomness is drawn per position (see `speculative`)."""
        events: list[tuple[int, TokenEvent]] = []
        live = list(range(len(rows)))
        for j in range(logits.shape[1]):  # position j checks drafts[i][j]
            proposals = [drafts[i][j] if j < len(drafts[i]) else None for i in live]
            tokens, logprobs = choose_tokens(
                logits[mx.array(live), j],
                [rows[i].state for i in live],
                proposals,
                self._allowed([rows[i] for i in live], logits.shape[-1]),
            )
            for i, proposal, token, lp in zip(list(live), proposals, tokens, logprobs):
                events.append((i, self._emit(rows[i], token, lp)))
                if rows[i].finished or token != proposal:
                    live.remove(i)
            if not live:
                break
        return events

    def _allowed(self, sequences: list[_Sequence], vocab: int) -> mx.array | None:
        if all(seq.constraint is None for seq in sequences):
            return None
        full = mx.ones((vocab,), dtype=mx.bool_)
        return mx.stack(
            [full if s.constraint is None else s.constraint.allowed_mask() for s in sequences]
        )

    def _sample_and_emit(self, logits: mx.array, sequences: list[_Sequence]) -> list[TokenEvent]:
        allowed = self._allowed(sequences, logits.shape[-1])
        return self._emit_all(
            sample_async(logits, [seq.state for seq in sequences], allowed), sequences
        )

    def _emit_all(self, pending: PendingSample, sequences: list[_Sequence]) -> list[TokenEvent]:
        out = pending.resolve()
        events = [
            self._emit(seq, token, lp)
            for seq, token, lp in zip(sequences, out.tokens, out.logprobs)
        ]
        self._retire_finished()
        return events

    def _emit(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None) -> TokenEvent:
        request = self._requests[seq.uid]
        seq.tokens.append(token)
        if seq.speculator is not None:
            seq.speculator.observe(token)
        finish = None
        text = ""
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if token == self.tokenizer.eos_id:
            finish, text = "stop", _final_text(seq)
        else:
            text, hit = seq.stop.feed(seq.detokenizer.add_token(token))
            if hit:
                finish = "stop"
            elif seq.constraint is not None and seq.constraint.forced_finish_reason():
                finish = seq.constraint.forced_finish_reason()
                text += _final_text(seq)
            elif len(seq.tokens) >= request.max_new or not self._room_for_next(seq, request):
                finish = "length"
                text += _final_text(seq)
        seq.finished = finish is not None
        return TokenEvent(
            seq.uid,
            seq.index,
            text,
            token,
            finish,
            logprobs,
            prompt_tokens=len(request.prompt),
            completion_tokens=len(seq.tokens),
            cached_tokens=request.cached_tokens,
            stop_sequence=seq.stop.matched if finish == "stop" else None,
            accepted_prediction_tokens=seq.speculator.accepted if seq.speculator else 0,
            rejected_prediction_tokens=seq.speculator.rejected if seq.speculator else 0,
        )

    def _room_for_next(self, seq: _Sequence, request: _Request) -> bool:
        """Whether the KV budget has room for the sequence's next token, growing a request's
        reservation by `open_reserve` tokens when it has used it up and the budget allows."""
        if len(request.prompt) + len(seq.tokens) < seq.reserved:
            return True
        grown = min(seq.reserved + self.open_reserve, len(request.prompt) + request.max_new)
        # The row's own reservation is below `grown`, so the batch with it grown is this:
        if self.kv_budget_bytes is not None and self._batch_bytes(0, grown) > self.kv_budget_bytes:
            return False
        seq.reserved = grown
        return True

    # -- leaving the batch ---------------------------------------------------------------------
    def _retire_finished(self) -> None:
        if not any(seq.finished for seq in self.running):
            return
        for row, seq in enumerate(self.running):
            if seq.finished and self.prefix_cache is not None and seq.index == 0:
                request = self._requests[seq.uid]
                # The tokens whose KV the row holds: all but the last, or all of them when a
                # pipelined step already fed the last one.
                fed_count = self.cache[0].length - self.cache[0].left_padding[row]
                fed = (request.prompt + seq.tokens)[:fed_count]
                entry = self.prefix_cache.store(fed, [c.extract(row) for c in self.cache])
                if self.replica is not None and entry is not None:
                    self.replica.store_row(entry, row)
        self._forget_finished_requests()
        self._remove_finished_rows()

    def _remove_finished_rows(self) -> None:
        keep = [i for i, seq in enumerate(self.running) if not seq.finished]
        if self._in_flight is not None:
            covered = self._in_flight.tokens.shape[0]
            kept = [i for i in keep if i < covered]
            if not kept:
                self.close()
            elif len(kept) < covered:
                self._in_flight = self._in_flight.take(kept)
        self.running = [self.running[i] for i in keep]
        if self.replica is not None and self.cache is not None:
            self.replica.filter(keep)
        if keep:
            filter_caches(self.cache, keep)
        else:
            self.cache = None

    def _forget_finished_requests(self) -> None:
        live = {seq.uid for seq in self.running if not seq.finished}
        live |= {r.uid for r in self.waiting} | {r.uid for r in self.prefilling}
        for uid in [u for u in self._requests if u not in live]:
            del self._requests[uid]

    def _drop_cancelled(self, events: list[TokenEvent]) -> None:
        if not self._cancelled:
            return
        cancelled, self._cancelled = self._cancelled, set()
        for queue in (self.waiting, self.prefilling):
            for request in [r for r in queue if r.uid in cancelled]:
                queue.remove(request)
                if self.replica is not None and request.cache is not None:
                    self.replica.drop(request.uid)
                request.cache = None
        for seq in self.running:
            if seq.uid in cancelled:
                seq.finished = True
        for uid in cancelled:
            events.append(TokenEvent(uid, 0, "", finish_reason="cancelled"))
        self._remove_finished_rows()  # cancelled rows are not stored in the prefix cache
        for uid in cancelled:
            self._requests.pop(uid, None)

    def close(self) -> None:
        """Wait for, then drop, the draw still being computed. MLX must be idle before the
        process exits (a CPU worker thread still running at exit aborts it), so this runs when
        the batch empties, and whoever stops stepping early calls it."""
        if self._in_flight is not None:
            mx.eval(self._in_flight.tokens)
            self._in_flight = None

    @property
    def kv_bytes_in_use(self) -> int:
        return sum(c.nbytes for c in self.cache) if self.cache else 0


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
