"""What one request's reader has not read yet: the engine's events, bounded by merging.

The engine never waits for a reader (a slow client must not slow the batch), so a reader that
falls behind leaves events behind it. Past `limit` unread events, a plain text event (no
logprobs, not the last of its choice) is folded into the choice's previous one: its text is
appended and its counts taken over. A reader that catches up gets one event carrying several
tokens, as a chunk carries several tokens when the model outruns a busy server. What stays
unread is then at most `limit` events plus one per choice, whatever the answer's length, instead
of one event object per token (the text itself is kept: it is the answer). Events with logprobs
are kept one per token: each token's logprobs are part of the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from .batch import TokenEvent

DEFAULT_LIMIT = 256  # unread events before merging starts: a reader this far behind is slow


def _mergeable(item: Any) -> bool:
    return isinstance(item, TokenEvent) and item.finish_reason is None and item.logprobs is None


class EventBacklog:
    """The unread items of one request, on its event loop (not thread-safe: the engine hands
    items over with `call_soon_threadsafe`).

    Args:
        limit: unread items kept as they came before text events are merged.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._items: list[Any] = []
        # choice -> (position in _items of its newest event, text parts merged into it); a
        # choice's texts are joined once, when read, so merging N tokens costs O(N), not O(N^2).
        self._merged: dict[int, tuple[int, list[str]]] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: list[Any]) -> None:
        """Append what the engine made for this request in one step."""
        for item in items:
            # _merged holds a choice's newest event only while that event is mergeable, so
            # merging into it never reorders the choice's text.
            merged = self._merged.get(getattr(item, "index", -1))
            if merged is not None and len(self._items) >= self.limit and _mergeable(item):
                position, parts = merged
                parts.append(item.text)
                self._items[position] = item  # newest token and counts; text joined on read
                continue
            if _mergeable(item):
                self._merged[item.index] = (len(self._items), [item.text])
            elif isinstance(item, TokenEvent):
                self._merged.pop(item.index, None)
            else:  # the end, or an error: nothing is merged across it
                self._merged.clear()
            self._items.append(item)
        self._ready.set()

    async def take(self) -> list[Any]:
        """Everything unread, oldest first (waits until there is something)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        items, merged = self._items, self._merged
        self._items, self._merged = [], {}
        for position, parts in merged.values():
            if len(parts) > 1:
                items[position] = dataclasses.replace(items[position], text="".join(parts))
        return items
