"""Keep the KV state of recent sequences so a follow-up prompt prefills only its new tokens.

A chat's next turn repeats the whole conversation so far; two requests may share a long system
prompt. Entries are keyed by their token ids; a lookup returns the longest stored prefix of the
new prompt. Least-recently-used entries are evicted to stay under a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

LayerKV = tuple[mx.array, mx.array]  # (1, kv_heads, tokens, head_dim) each


@dataclass
class PrefixHit:
    length: int  # how many leading prompt tokens the stored state covers
    layers: list[LayerKV]


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int arrays (vectorized: entries can be long)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """An LRU of (token ids -> per-layer KV) under `budget_bytes` (keys counted too).

    A lookup compares the prompt with every entry (vectorized); `max_entries` bounds that scan,
    which runs on the engine thread between decode steps.
    """

    def __init__(self, budget_bytes: int, *, min_tokens: int = 16, max_entries: int = 256):
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens  # shorter prefixes are cheaper to recompute than to store
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[LayerKV], int]] = (
            OrderedDict()
        )
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest stored prefix of `prompt`, leaving at least one token to prefill."""
        ids = np.asarray(prompt, dtype=np.int64)
        best_key, best_len = None, 0
        for key, (stored, _, _) in self._entries.items():
            n = common_prefix_length(stored, ids)
            if n > best_len:
                best_key, best_len = key, n
        best_len = min(best_len, len(prompt) - 1)
        if best_key is None or best_len < self.min_tokens:
            return None
        self._entries.move_to_end(best_key)
        layers = self._entries[best_key][1]
        return PrefixHit(
            best_len, [(k[:, :, :best_len, :], v[:, :, :best_len, :]) for k, v in layers]
        )

    def store(self, tokens: Sequence[int], layers: list[LayerKV]) -> None:
        """Keep a copy of `layers` (KV for exactly `tokens`), evicting old entries as needed."""
        key = tuple(tokens)
        if len(key) < self.min_tokens or key in self._entries:
            return
        ids = np.asarray(key, dtype=np.int64)
        # The tuple key costs ~36 bytes a token in Python objects; counted, so RSS stays bounded.
        size = sum(k.nbytes + v.nbytes for k, v in layers) + ids.nbytes + 36 * len(key)
        if size > self.budget_bytes:
            return
        # Copies, so an entry never pins the (much larger) batch cache it was sliced from.
        layers = [(mx.contiguous(k), mx.contiguous(v)) for k, v in layers]
        mx.eval(layers)
        # An entry that is a prefix of the new one is now redundant.
        for old, (stored, _, _) in list(self._entries.items()):
            if len(stored) <= len(ids) and common_prefix_length(stored, ids) == len(stored):
                self._drop(old)
        while self._entries and (
            self.nbytes + size > self.budget_bytes or len(self._entries) >= self.max_entries
        ):
            self._drop(next(iter(self._entries)))
        self._entries[key] = (ids, layers, size)
        self.nbytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self._entries.pop(key)[2]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
