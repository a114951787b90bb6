"""The responses kept for retrieval, `input_items` and `previous_response_id`: bounded in count
and in bytes, least recently used forgotten first.

A response's size is the JSON length of what is kept (the response object, its conversation,
its input items). A chain shares its history's messages with the responses it continues, so
counting each response's whole conversation overstates the memory held: the bound is an upper
bound. Its figures are in `/health` (`responses_store`) and `/metrics`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.errors import MistralError

MAX_STORED = 256
"""Responses kept at most, whatever their size."""
DEFAULT_STORE_BYTES = 64 * 2**20
"""`--responses-store-size`'s default: 256 responses of ~16 KB of conversation each, or fewer
long ones (a full 32K-token context is ~130 KB of text)."""


class ResponseNotFoundError(MistralError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object, as returned
    conversation: tuple[dict[str, Any], ...]  # chat messages without the system prompt
    input_items: tuple[dict[str, Any], ...] = ()  # the request's `input`, as items with ids
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        size = len(json.dumps([self.body, self.conversation, self.input_items]))
        object.__setattr__(self, "nbytes", size)


class ResponseStore:
    """The most recent responses by id, at most `capacity` of them and `max_bytes` in all."""

    def __init__(self, max_bytes: int = DEFAULT_STORE_BYTES, capacity: int = MAX_STORED):
        self.max_bytes = max_bytes
        self.capacity = capacity
        self.nbytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: StoredResponse) -> None:
        """Keep `stored`, forgetting the least recently used until both bounds hold (a response
        larger than the whole store is not kept)."""
        self._forget(stored.body["id"])
        if stored.nbytes > self.max_bytes:
            return
        self._items[stored.body["id"]] = stored
        self.nbytes += stored.nbytes
        while len(self._items) > self.capacity or self.nbytes > self.max_bytes:
            self._forget(next(iter(self._items)))

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """Raises ResponseNotFoundError (404) for an id never kept or already forgotten."""
        stored = self._items.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(
                f"no response with id {response_id[:100]!r} is stored on this server: it was "
                f"created with store: false, deleted, or forgotten (only the most recent "
                f"{self.capacity}, up to {self.max_bytes / 2**20:.0f} MiB, are kept in memory "
                "until the server restarts)",
                param=param,
            )
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._forget(response_id)

    def usage(self) -> dict[str, int]:
        """What `/health` shows: responses kept, their bytes, the bound."""
        return {"responses": len(self._items), "bytes": self.nbytes, "limit_bytes": self.max_bytes}

    def _forget(self, response_id: str) -> None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self.nbytes -= stored.nbytes
