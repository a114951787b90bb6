"""`Activity`: what the server generated lately, for the status endpoint (`server.status`).

Every response writer feeds it as its tokens arrive (`ResponseWriter._record`), so the
per-second counts follow the stream, not the end of each request as /metrics' counters do.
Only the event loop's thread writes and reads it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 180
"""Seconds of per-second token counts kept: the status page's chart spans three minutes."""


class Activity:
    """Generated tokens per second over the last `window` seconds, and running totals.

    Args:
        window: seconds of history kept.
        clock: the time in seconds (time.time; a test may pass its own).
    """

    def __init__(self, window: int = WINDOW_SECONDS, clock: Callable[[], float] = time.time):
        self.window = window
        self._clock = clock
        self._counts: deque[list[int]] = deque()  # [whole second, tokens], oldest first
        self.prompt_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.generated_tokens = 0

    def record(self, *, prompt: int = 0, cached: int = 0, generated: int = 0) -> None:
        """Count tokens that just arrived (each argument a non-negative increment)."""
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        if generated <= 0:
            return
        self.generated_tokens += generated
        second = int(self._clock())
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1][1] += generated
        else:
            self._counts.append([second, generated])
        while self._counts and self._counts[0][0] <= second - self.window:
            self._counts.popleft()

    def per_second(self) -> tuple[int, list[int]]:
        """(the last whole second, counts for the `window` seconds ending with it), oldest
        first, a zero for each second without tokens."""
        last = int(self._clock())
        counts = [0] * self.window
        for second, tokens in self._counts:
            age = last - second
            if 0 <= age < self.window:
                counts[self.window - 1 - age] = tokens
        return last, counts
