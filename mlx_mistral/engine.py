"""The engine: one thread owns the model and all MLX work; callers submit and await events.

MLX streams are per thread (a lazy array made on one thread cannot be evaluated on another), so
the engine thread loads the model itself and hands out only plain Python values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .backlog import EventBacklog
from .batch import BatchGenerator, TokenConstraint, TokenEvent
from .disk_cache import DiskCacheSettings
from .errors import EngineDeadError, EngineOverloadedError, MistralError, StructuredOutputError
from .lifecycle import ModelSlot
from .memory import DEFAULT_PREFIX_CACHE_MAX as DEFAULT_PREFIX_CACHE_MAX  # re-exported
from .memory import available_memory_bytes as available_memory_bytes  # re-exported
from .model import Model
from .sampling.params import SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger("mlx_mistral.engine")

_DONE = object()

STRUCTURED_OUTPUT_FAILED = (
    "the structured-output engine failed mid-answer, so the answer cannot follow the requested "
    "format (response_format or tools); see the server's log. A simpler schema may avoid it."
)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine schedules work.

    Attributes:
        max_batch: most sequences decoded together.
        max_queue: most requests waiting: to start, or (streams the engine has finished) for
            their client to read the rest; more get EngineOverloadedError (503).
        prefill_chunk: prompt tokens per prefill step (bounds the stall of running streams).
        kv_budget_bytes: KV memory for running sequences; None derives it from free memory.
        prefix_cache_bytes: memory kept for earlier conversations' KV; None: a quarter of the
            KV budget, at most 2 GiB; 0 turns the prefix cache off.
        keep_alive: seconds without requests after which the weights, the KV and the prefix
            cache are freed (`lifecycle`; the next request loads them again); 0 frees them
            after each request, `math.inf` never.
        max_memory_bytes: a cap on weights + KV + prefix cache, from which the KV and
            prefix-cache budgets are derived once the weights' size is known (`memory`).
        prompt_cache: keep prompts' KV on disk too, so a restarted server reuses them; None
            turns the disk cache off.
        kv_bits: store the KV cache quantized to 8 or 4 bits; None keeps the compute dtype.
        speculation: "auto" verifies drafts (prompt lookup, predictions) when the measured
            forward cost says it pays; "always" whenever there is a draft (as if wide forwards
            cost what one does); "off" never looks for drafts. Exact either way: only the speed
            changes.
    """

    max_batch: int = 32
    max_queue: int = 64
    prefill_chunk: int = 512
    kv_budget_bytes: int | None = None
    prefix_cache_bytes: int | None = None
    keep_alive: float = math.inf
    max_memory_bytes: int | None = None
    prompt_cache: DiskCacheSettings | None = None
    kv_bits: int | None = None
    speculation: str = "auto"


async def each_event(batches: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    """The events of `batches` (lists of events, as `RequestHandle.batches` yields them) one by
    one; closing this closes `batches`."""
    try:
        async for batch in batches:
            for event in batch:
                yield event
    finally:
        await batches.aclose()  # type: ignore[attr-defined]


def _put_all(posts: list[tuple[RequestHandle, list]]) -> None:
    """On the event loop: queue each request's share of one engine step."""
    for handle, outbox in posts:
        handle._backlog.put(outbox)


class RequestHandle:
    """A submitted request: iterate its `TokenEvent`s (async or sync); `cancel()` to stop it.

    Leaving the loop before the last event (a `break`, an exception) cancels the request, as
    breaking out of `stream_generate` does: nobody is left to read the rest.

    `batches()` gives, asynchronously, everything that arrived since the last read as one list:
    a server that falls behind a fast model writes several tokens per chunk instead of queueing
    one write per token. What is unread is bounded (`EventBacklog`): a reader far behind gets
    text events merged.
    """

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        params: SamplingParams,
        constraints: Sequence[TokenConstraint | None] | None,
        loop: asyncio.AbstractEventLoop | None,
        continuation: bool = False,
        prediction: str | None = None,
    ):
        self.engine = engine
        self.prediction = prediction  # see Engine.submit
        self.prompt = prompt
        self.params = params
        self.constraints = constraints
        self._loop = loop
        self._backlog: EventBacklog | None = EventBacklog() if loop else None
        self._sync_queue: queue.Queue | None = None if loop else queue.Queue()
        self.uid: int | None = None
        self.continuation = continuation  # see Engine.submit
        self._open_choices = params.n
        self.cancelled = False
        self._ended = False  # a reader has seen the last event (or the engine's error)
        self._closed = False  # the reader is done with this request (see _cancel_unless_ended)

    # Called on the engine thread. Queue entries are lists of items.
    def _deliver(self, item: TokenEvent | MistralError | object) -> None:
        self._post([item])

    def _post(self, items: list) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._backlog.put, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self.cancel()
        else:
            self._sync_queue.put(items)

    def _add_event(self, event: TokenEvent, outbox: list) -> bool:
        """Put one event (and the end marker after its last) in `outbox`; True when complete."""
        outbox.append(event)
        if event.finish_reason == "cancelled":
            self._open_choices = 0
        elif event.finish_reason is not None:
            self._open_choices -= 1
        if self._open_choices <= 0:
            outbox.append(_DONE)
            return True
        return False

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); frees the request's cache slot."""
        if not self.cancelled:
            self.cancelled = True
            self.engine._commands.put(("cancel", self))

    def __aiter__(self):
        return each_event(self.batches())

    async def batches(self):
        """Lists of the events that arrived since the previous list (never empty)."""
        try:
            while True:
                items = await self._backlog.take()
                events = []
                for item in items:
                    if item is _DONE or isinstance(item, MistralError):
                        self._ended = True
                        if events:
                            yield events
                        if item is _DONE:
                            return
                        raise item
                    events.append(item)
                yield events
        finally:
            self._cancel_unless_ended()

    def __iter__(self):
        try:
            while True:
                for item in self._sync_queue.get():
                    if item is _DONE or isinstance(item, MistralError):
                        self._ended = True
                        if item is _DONE:
                            return
                        raise item
                    yield item
        finally:
            self._cancel_unless_ended()

    def _cancel_unless_ended(self) -> None:
        # Read to the end, or abandoned: no longer held. The flag first: the engine thread may
        # be adding this handle to _unread right now, and checks the flag after adding.
        self._closed = True
        self.engine._unread.discard(self)
        if not self._ended:
            self.cancel()


class Engine:
    """Owns the model on its own thread and schedules requests with continuous batching.

    Args:
        load: called on the engine thread; returns (model, tokenizer).
        config: scheduling limits.

    Example:
        >>> import mlx_mistral
        >>> engine = Engine(lambda: mlx_mistral.load(mlx_mistral.demo_model_path())).start()
        >>> ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello!"}])
        >>> events = list(engine.submit(ids, SamplingParams(temperature=0, max_tokens=4)))
        >>> events[-1].finish_reason in ("stop", "length")
        True
        >>> engine.shutdown()
    """

    def __init__(
        self, load: Callable[[], tuple[Model, Tokenizer]], config: EngineConfig | None = None
    ):
        self.config = config or EngineConfig()
        self.slot = ModelSlot(load, self.config)
        self._commands: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlx-mistral-engine", daemon=True)
        self._ready = threading.Event()
        self._stopping = False
        self._accepting = True
        self._drain_deadline = math.inf  # monotonic time when a drain ends what still runs
        self._drained = True  # every stop so far was a drain (else in-flight requests end now)
        self.error: BaseException | None = None
        self._handles: dict[int, RequestHandle] = {}
        self._queued = 0
        # Async requests the engine has finished whose reader has not read the end: their
        # events are held in memory, so they count against max_queue like waiting requests.
        self._unread: set[RequestHandle] = set()
        self.steps = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache
        # Run on the engine thread as it ends, with its error or None (distributed serving
        # tells the other ranks to stop from here: the collectives belong to this thread).
        self.on_exit: Callable[[BaseException | None], None] | None = None
        self.draft_tokens_proposed = 0  # speculative decoding, over finished sequences
        self.draft_tokens_accepted = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> Engine:
        """Start the thread and wait until the model is loaded; re-raises a load error."""
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and self._ready.is_set()

    def drain(self, timeout: float | None = None) -> None:
        """Begin stopping: refuse new requests and those not yet admitted to the batch
        (EngineOverloadedError, 503 + Retry-After: another server may take them), let the
        running ones finish, and after `timeout` seconds end what still runs with the same
        error. The thread exits once nothing runs. Returns at once (any thread)."""
        self._accepting = False
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._commands.put(("stop", (deadline, True)))

    def shutdown(self, *, drain: bool = False, timeout: float | None = 30.0) -> None:
        """Stop the engine and wait for its thread: with `drain`, in-flight requests get up to
        `timeout` seconds to finish (see `drain`); without, they end now."""
        if drain:
            self.drain(timeout)
        else:
            self._accepting = False
            self._commands.put(("stop", (0.0, False)))
        if self._thread.is_alive():
            self._thread.join(None if timeout is None else timeout + 1.0)

    # -- the model (see `lifecycle`) -------------------------------------------------------------
    @property
    def model(self) -> Model | None:
        """The loaded model; None before the first load and after an idle unload."""
        return self.slot.model

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.slot.tokenizer  # kept across unloads: prompts are encoded meanwhile

    @property
    def generator(self) -> BatchGenerator | None:
        return self.slot.generator

    @property
    def loaded(self) -> bool:
        return self.slot.model is not None

    @property
    def num_waiting(self) -> int:
        """Requests not started yet (handed over, or held for KV memory or batch room), and
        finished answers whose reader has not reached the end (they still hold their events)."""
        generator = self.slot.generator
        held = 0 if generator is None else len(generator.waiting)
        return self._queued + held + len(self._unread)

    def keep_alive(self, seconds: float | None, *, load: bool = False) -> None:
        """Keep the model loaded `seconds` after the last request (None: the configured
        default), as Ollama's `keep_alive`; `load` loads it now if it was unloaded."""
        seconds = self.config.keep_alive if seconds is None else seconds
        self._commands.put(("keep_alive", (seconds, load)))

    @property
    def context_length(self) -> int | None:
        """The model's context window in tokens; None until the model is loaded."""
        return None if self.generator is None else self.generator.context_length

    @property
    def num_active(self) -> int:
        return len(self._handles) + self._queued

    # -- submission (any thread) ------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        constraints: Sequence[TokenConstraint | None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        prompt_field: str = "messages",
        continuation: bool = False,
        prediction: str | Sequence[int] | None = None,
        keep_alive: float | None = None,
    ) -> RequestHandle:
        """Queue a request. Pass the running event loop to iterate its events with `async for`.

        `prompt_field` is the request field errors about the prompt name ("prompt" for
        completions). `continuation`: the output continues a raw-text prompt (completions), so
        its first word keeps its leading space. `prediction`: the expected output (OpenAI's
        Predicted Outputs), a draft the engine verifies: it speeds up, never changes, the answer.
        its first word keeps its leading space. `keep_alive`: see `keep_alive()`; each request
        sets it, to its own or the default, as in Ollama.

        Raises:
            ContextLengthExceededError, InvalidRequestError: the request cannot run on this model.
            EngineOverloadedError: the queue is full (retry after a moment).
            EngineDeadError: the engine thread has stopped.
        """
        if self.error is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine has stopped; restart the server")
        if not self._accepting:
            raise EngineOverloadedError("the server is shutting down", retry_after=5)
        # check() reads only immutable settings: safe from any thread.
        self.generator.check(prompt, params, prompt_field=prompt_field)
        waiting = self.num_waiting  # len() of a deque or a set is atomic in CPython
        if waiting >= self.config.max_queue:
            raise EngineOverloadedError(
                f"{waiting} requests are already waiting; retry shortly", retry_after=1
            )
        handle = RequestHandle(
            self, list(prompt), params, constraints, loop, continuation, prediction
        )
        self._queued += 1
        self.keep_alive(keep_alive)
        self._commands.put(("add", handle))
        if self.error is not None or not self._thread.is_alive():
            self._fail_pending()  # the engine died after the check above: answer, never hang
        return handle

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.slot.load()
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            # A load can fail after making arrays (a memory cap below the weights): this
            # thread's streams must go here, as at the end of `_run`, or the exit can abort.
            with contextlib.suppress(Exception):
                mx.synchronize()
                mx.clear_streams()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:
            self.error = exc
            log.exception("engine thread failed")
            failure = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
            for handle in list(self._handles.values()):
                handle._deliver(failure)
            self._handles.clear()
        finally:
            self._fail_pending()
            if self.on_exit is not None:
                # The engine's own cleanup below must run whatever the hook does.
                with contextlib.suppress(Exception):
                    self.on_exit(self.error)
            # Wait for the last scheduled step and destroy this thread's MLX streams here:
            # left to the thread's exit, their teardown can race the process's and abort it.
            with contextlib.suppress(Exception):  # a dead device has nothing left to wait for
                if self.generator is not None:
                    self.generator.close()
                    if self.generator.prefix_cache is not None:
                        self.generator.prefix_cache.close()  # queued disk writes finish
                mx.synchronize()
                mx.clear_streams()

    def _fail_pending(self) -> None:
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                payload._deliver(EngineDeadError("the engine has stopped"))

    def _loop(self) -> None:
        generator = self.generator
        while True:
            block = not generator.has_work
            while True:
                try:
                    command, payload = self._commands.get(
                        block=block, timeout=self.slot.idle_wait() if block else None
                    )
                except queue.Empty:
                    break
                block = False
                if command == "add":
                    self._add(payload)
                    self._queued -= 1  # after _add: a concurrent count errs high, never low
                elif command == "cancel" and payload.uid is not None:
                    generator.cancel(payload.uid)
                elif command == "keep_alive":
                    self.slot.set_keep_alive(payload[0], load=payload[1])
                elif command == "stop":
                    self._stopping = True
                    deadline, drained = payload
                    self._drain_deadline = min(self._drain_deadline, deadline)
                    self._drained &= drained
            if self._stopping:
                self._refuse_waiting()
                if not generator.has_work or time.monotonic() >= self._drain_deadline:
                    for handle in list(self._handles.values()):
                        handle._deliver(self._stop_error())
                    return
            if not generator.has_work:
                self.slot.idle()  # unloads once the keep-alive has run out
                continue
            self._dispatch(generator.step())
            self.slot.busy()
            self.steps += 1

    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Hand a step's events to their requests: one wake-up per event loop per step, not
        one per token (the hand-over costs a syscall and an event-loop iteration)."""
        outboxes: dict[int, tuple[RequestHandle, list]] = {}
        for event in events:
            handle = self._handles.get(event.uid)
            if handle is None:
                continue
            outbox = outboxes.setdefault(event.uid, (handle, []))[1]
            if event.finish_reason == "error":
                # A choice's grammar engine failed (the constraint logged why): the request
                # ends with an error, never an answer that only looks finished; its other
                # choices are dropped.
                outbox.append(StructuredOutputError(STRUCTURED_OUTPUT_FAILED))
                del self._handles[event.uid]
                self.generator.cancel(event.uid)
                continue
            if event.finish_reason is not None:  # a sequence's final event carries its totals
                self.draft_tokens_accepted += event.accepted_prediction_tokens
                self.draft_tokens_proposed += (
                    event.accepted_prediction_tokens + event.rejected_prediction_tokens
                )
            if handle._add_event(event, outbox):
                del self._handles[event.uid]
                self.prefix_hit_tokens += event.cached_tokens
                if handle._loop is not None:
                    self._unread.add(handle)  # until its reader reaches the end
                    if handle._closed:
                        self._unread.discard(handle)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, list]]] = {}
        for handle, outbox in outboxes.values():
            if handle._loop is None:
                handle._post(outbox)
            else:
                by_loop.setdefault(handle._loop, []).append((handle, outbox))
        for loop, posts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, posts)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for handle, _ in posts:
                    handle.cancel()

    def _stop_error(self) -> MistralError:
        if not self._drained:  # stopped outright: this engine is gone
            return EngineDeadError("the server is shutting down")
        # A drain that ran out of time: the server is going away, another may take the retry.
        return EngineOverloadedError(
            "the server is shutting down and its drain time ran out before this request finished",
            retry_after=5,
        )

    def _refuse_waiting(self) -> None:
        """While stopping: answer the requests not yet admitted to the batch at once."""
        generator = self.generator
        if generator is None:  # unloaded: every request is still in the hand-over queue
            return
        for request in list(generator.waiting):
            generator.cancel(request.uid)  # its "cancelled" event will find no handle
            handle = self._handles.pop(request.uid, None)
            if handle is not None:
                handle._deliver(
                    EngineOverloadedError(
                        "the server is shutting down; this request had not started",
                        retry_after=5,
                    )
                )

    def _add(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            handle._deliver(_DONE)
            return
        failure = self.slot.ensure_loaded()  # after an idle unload; counted in its TTFT
        if failure is not None:
            handle._deliver(failure)
            return
        try:
            handle.uid = self.generator.add(
                handle.prompt,
                handle.params,
                constraints=handle.constraints,
                continuation=handle.continuation,
                prediction=handle.prediction,
            )
        except MistralError as exc:
            handle._deliver(exc)
            return
        self._handles[handle.uid] = handle
