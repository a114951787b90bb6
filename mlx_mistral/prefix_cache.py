"""Keep the KV state of recent sequences so a follow-up prompt prefills only its new tokens.

A chat's next turn repeats the whole conversation so far; two requests may share a long system
prompt. Entries are keyed by their token ids; a lookup returns the longest stored prefix of the
new prompt. Least-recently-used entries are evicted to stay under a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

LayerKV = tuple[mx.array, mx.array]  # (1, kv_heads, tokens, head_dim) each


@dataclass
class PrefixHit:
    length: int  # how many leading prompt tokens the stored state covers
    layers: list[LayerKV]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """An LRU of (token ids -> per-layer KV) under `budget_bytes`."""

    def __init__(self, budget_bytes: int, *, min_tokens: int = 16):
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens  # shorter prefixes are cheaper to recompute than to store
        self._entries: OrderedDict[tuple[int, ...], list[LayerKV]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest stored prefix of `prompt`, leaving at least one token to prefill."""
        best_key, best_len = None, 0
        for key in self._entries:
            n = common_prefix_length(key, prompt)
            if n > best_len:
                best_key, best_len = key, n
        best_len = min(best_len, len(prompt) - 1)
        if best_key is None or best_len < self.min_tokens:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best_key)
        layers = self._entries[best_key]
        return PrefixHit(best_len, [(k[:, :, :best_len, :], v[:, :, :best_len, :]) for k, v in layers])

    def store(self, tokens: Sequence[int], layers: list[LayerKV]) -> None:
        """Keep a copy of `layers` (KV for exactly `tokens`), evicting old entries as needed."""
        key = tuple(tokens)
        if len(key) < self.min_tokens or key in self._entries:
            return
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.budget_bytes:
            return
        # Copies, so an entry never pins the (much larger) batch cache it was sliced from.
        layers = [(mx.contiguous(k), mx.contiguous(v)) for k, v in layers]
        mx.eval(layers)
        # An entry that is a prefix of the new one is now redundant.
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)
        while self.nbytes + size > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        self._entries[key] = layers
        self.nbytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        layers = self._entries.pop(key)
        self.nbytes -= sum(k.nbytes + v.nbytes for k, v in layers)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
