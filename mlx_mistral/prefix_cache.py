"""Keep the KV state of recent sequences so a follow-up prompt prefills only its new tokens.

A chat's next turn repeats the whole conversation so far; two requests may share a long system
prompt. Entries are keyed by their token ids; a lookup returns the longest stored prefix of the
new prompt. Least-recently-used entries are evicted to stay under a byte budget.

With a `DiskPrefixCache` beneath it, a lookup that memory cannot serve as well as the disk goes
to the disk (and the entry found moves into memory), and prompts are also written there, so a
restarted server still has them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from .disk_cache import DiskPrefixCache

# Keys and values of one layer, (1, kv_heads, tokens, head_dim) each; a quantized cache holds
# each as its (packed, scales, biases) triple, all with the tokens on axis 2.
KV = mx.array | tuple[mx.array, ...]
LayerKV = tuple[KV, KV]


def kv_nbytes(part: KV) -> int:
    return sum(a.nbytes for a in part) if isinstance(part, tuple) else part.nbytes


def _kv_slice(part: KV, n: int) -> KV:
    if isinstance(part, tuple):
        return tuple(a[:, :, :n, :] for a in part)
    return part[:, :, :n, :]


def _kv_copy(part: KV) -> KV:
    if isinstance(part, tuple):
        return tuple(mx.contiguous(a) for a in part)
    return mx.contiguous(part)


def layers_prefix(layers: list[LayerKV], n: int) -> list[LayerKV]:
    """Every layer's keys and values for the first `n` tokens (views, not copies)."""
    return [(_kv_slice(k, n), _kv_slice(v, n)) for k, v in layers]


def layers_copy(layers: list[LayerKV]) -> list[LayerKV]:
    """Evaluated copies, so that a kept entry never pins the (much larger) batch cache it was
    sliced from; evaluated here, since the disk writer's thread cannot evaluate them."""
    copied = [(_kv_copy(k), _kv_copy(v)) for k, v in layers]
    mx.eval(copied)
    return copied


@dataclass
class PrefixHit:
    length: int  # how many leading prompt tokens the stored state covers
    layers: list[LayerKV]
    entry: int | None  # the id of the entry in memory it came from (see `PrefixCache.store`)


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int arrays (vectorized: entries can be long)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """An LRU of (token ids -> per-layer KV) under `budget_bytes` (keys counted too).

    A lookup compares the prompt with every entry (vectorized); `max_entries` bounds that scan,
    which runs on the engine thread between decode steps.

    Each entry in memory has an id, which `store` returns and `on_drop` is called with when the
    entry leaves: tensor-parallel serving mirrors the entries on every rank by id.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        min_tokens: int = 16,
        max_entries: int = 256,
        disk: DiskPrefixCache | None = None,
    ):
        self.budget_bytes = budget_bytes
        self.disk = disk
        self.min_tokens = min_tokens  # shorter prefixes are cheaper to recompute than to store
        self.max_entries = max_entries
        # key -> (its ids, its per-layer KV, its size in bytes, its id)
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[LayerKV], int, int]] = (
            OrderedDict()
        )
        self.nbytes = 0
        self._next_id = 0
        self.on_drop: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest stored prefix of `prompt` (in memory, else on disk), leaving at least
        one token to prefill."""
        ids = np.asarray(prompt, dtype=np.int64)
        best_key, best_len = None, 0
        for key, (stored, *_) in self._entries.items():
            n = common_prefix_length(stored, ids)
            if n > best_len:
                best_key, best_len = key, n
        best_len = min(best_len, len(prompt) - 1)
        if best_len < self.min_tokens:
            best_key, best_len = None, 0
        if self.disk is not None:
            found = self.disk.lookup(ids, longer_than=best_len)
            if found is not None:
                length, stored, layers = found
                entry = self._insert(tuple(stored.tolist()), stored, layers)  # for later turns
                return PrefixHit(length, layers_prefix(layers, length), entry)
        if best_key is None:
            return None
        self._entries.move_to_end(best_key)
        _, layers, _, entry = self._entries[best_key]
        return PrefixHit(best_len, layers_prefix(layers, best_len), entry)

    def store(
        self, tokens: Sequence[int], layers: list[LayerKV], *, persist: bool = False
    ) -> int | None:
        """Keep a copy of `layers` (KV for exactly `tokens`), evicting old entries as needed;
        with `persist`, write it to the disk cache too (a prompt: later turns start with it).
        Returns the new entry's id, or None when memory did not take it."""
        key = tuple(tokens)
        if len(key) < self.min_tokens:
            return None
        ids = np.asarray(key, dtype=np.int64)
        to_memory = key not in self._entries and self._entry_size(ids, layers) <= self.budget_bytes
        to_disk = (
            persist
            and self.disk is not None
            and len(ids) >= self.disk.settings.min_tokens
            and not self.disk.covers(ids)
        )
        if not (to_memory or to_disk):
            return None
        layers = layers_copy(layers)
        entry = self._insert(key, ids, layers) if to_memory else None
        if to_disk:
            self.disk.store(ids, layers)
        return entry

    @staticmethod
    def _entry_size(ids: np.ndarray, layers: list[LayerKV]) -> int:
        # The tuple key costs ~36 bytes a token in Python objects; counted, so RSS stays bounded.
        return sum(kv_nbytes(k) + kv_nbytes(v) for k, v in layers) + ids.nbytes + 36 * len(ids)

    def _insert(self, key: tuple[int, ...], ids: np.ndarray, layers: list[LayerKV]) -> int | None:
        size = self._entry_size(ids, layers)
        if key in self._entries or size > self.budget_bytes:
            return None
        # An entry that is a prefix of the new one is now redundant.
        for old, (stored, *_) in list(self._entries.items()):
            if len(stored) <= len(ids) and common_prefix_length(stored, ids) == len(stored):
                self._drop(old)
        while self._entries and (
            self.nbytes + size > self.budget_bytes or len(self._entries) >= self.max_entries
        ):
            self._drop(next(iter(self._entries)))
        entry, self._next_id = self._next_id, self._next_id + 1
        self._entries[key] = (ids, layers, size, entry)
        self.nbytes += size
        return entry

    def _drop(self, key: tuple[int, ...]) -> None:
        _, _, size, entry = self._entries.pop(key)
        self.nbytes -= size
        if self.on_drop is not None:
            self.on_drop(entry)

    def clear(self) -> None:
        """Forget the entries in memory (the disk keeps its files)."""
        for key in list(self._entries):
            self._drop(key)

    def close(self) -> None:
        """Finish the disk cache's queued writes."""
        if self.disk is not None:
            self.disk.close()
