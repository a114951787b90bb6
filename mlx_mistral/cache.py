"""The KV cache: one object per layer, batched from the start.

Rows are left-padded so that every row writes at the same index: a row that joined the batch
with a shorter history carries `left_padding` zeros that the attention mask hides. This keeps
the decode step one batched forward for all rows, whatever their lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx.utils import tree_map


class BatchKVCache:
    """A growing, left-padded KV cache for one layer, shape (B, kv_heads, capacity, head_dim).

    Capacity grows in steps of `step` tokens, so decoding does not reallocate per token.
    """

    step = 256
    bits: int | None = None  # float keys and values (see QuantizedKVCache)

    def __init__(self, left_padding: Sequence[int] = (0,)):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.left_padding = [int(p) for p in left_padding]
        self.length = 0  # the shared write index (padding included)

    # -- what attention reads and writes ---------------------------------------------------------
    @property
    def offset(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int:
        return len(self.left_padding)

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, n = self.length, keys.shape[2]
        if self.keys is None or start + n > self.keys.shape[2]:
            self._grow(keys, values, start + n)
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        self.length = start + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def trim(self, n: int) -> int:
        """Drop the last `n` positions of every row; returns how many were dropped."""
        n = max(0, min(n, self.length - max(self.left_padding, default=0)))
        self.length -= n
        return n

    def trim_rows(self, drop: Sequence[int]) -> None:
        """Drop the last `drop[i]` positions of row `i` (speculative decoding's rejected tokens).

        Rows share one write index, so dropping different counts leaves their ends misaligned.
        They are re-aligned by shifting each row right by how much more it dropped than the row
        that dropped least, and growing its left padding by as much: the padding is masked and
        RoPE positions count from it, so every row then sees exactly its kept tokens, at the
        positions it had. The shift is one gather over the cached length, done only when the
        counts differ (a step where all rows accept alike costs a plain `trim`).
        """
        least = min(drop)
        self.length -= least
        shifts = [d - least for d in drop]
        if not any(shifts) or self.keys is None:
            return
        # Row i's token at t moves to t + shift_i; positions that come from before 0 read 0,
        # which becomes (masked) padding. Only the rows that move are gathered and written.
        moved = [i for i, s in enumerate(shifts) if s]
        rows = mx.array(moved)
        source = mx.arange(self.length)[None, :] - mx.array([shifts[i] for i in moved])[:, None]
        index = mx.maximum(source, 0)[:, None, :, None]  # (moved, 1, T, 1)
        for buffer in self._buffers():
            buffer[rows, :, : self.length, :] = mx.take_along_axis(
                buffer[rows, :, : self.length, :], index, axis=2
            )
        self.left_padding = [p + s for p, s in zip(self.left_padding, shifts)]

    def _buffers(self) -> list[mx.array]:
        """Every array that holds cached positions on axis 2."""
        return [self.keys, self.values]

    # -- positions -------------------------------------------------------------------------------
    def positions(self) -> int | mx.array:
        """RoPE position of the next token: an int when rows are aligned, else an array [B]."""
        if not any(self.left_padding):
            return self.length
        return mx.array([self.length - p for p in self.left_padding])

    # -- batch surgery (the engine adds and removes rows between steps) --------------------------
    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, D = keys.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, D), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.length:
            new_k[..., : self.length, :] = self.keys[..., : self.length, :]
            new_v[..., : self.length, :] = self.values[..., : self.length, :]
        self.keys, self.values = new_k, new_v

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), dropping padding no row needs any more."""
        self.left_padding = [self.left_padding[r] for r in rows]
        if self.keys is not None:
            index = mx.array(list(rows))
            self.keys, self.values = self.keys[index], self.values[index]
        shift = min(self.left_padding, default=0)
        if shift:
            if self.keys is not None:
                self.keys = self.keys[..., shift:, :]
                self.values = self.values[..., shift:, :]
            self.length -= shift
            self.left_padding = [p - shift for p in self.left_padding]

    def extract(self, row: int) -> tuple[mx.array, mx.array]:
        """Row `row`'s keys and values without padding, shape (1, kv_heads, tokens, head_dim)."""
        pad = self.left_padding[row]
        return (
            self.keys[row : row + 1, :, pad : self.length, :],
            self.values[row : row + 1, :, pad : self.length, :],
        )

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array) -> BatchKVCache:
        """A one-row cache holding a stored prefix (e.g. from the prefix cache)."""
        cache = cls([0])
        cache.update_and_fetch(keys, values)
        return cache

    @classmethod
    def merge(cls, caches: Sequence[BatchKVCache]) -> BatchKVCache:
        """Stack caches row-wise, left-padding each so that all rows end at the same index."""
        if len(caches) == 1:  # the first request of an empty batch: nothing to align
            return caches[0]
        length = max(c.length for c in caches)
        merged = cls([p + length - c.length for c in caches for p in c.left_padding])
        parts = [c for c in caches if c.keys is not None]
        if not parts:
            return merged
        ref = parts[0].keys
        ks, vs = [], []
        for c in caches:
            B, pad = c.batch_size, length - c.length
            if c.keys is None:
                k = mx.zeros((B, ref.shape[1], length, ref.shape[3]), ref.dtype)
                ks.append(k)
                vs.append(mx.zeros((B, ref.shape[1], length, parts[0].values.shape[3]), ref.dtype))
                continue
            k, v = c.keys[..., : c.length, :], c.values[..., : c.length, :]
            if pad:
                k = mx.concatenate([mx.zeros((B, k.shape[1], pad, k.shape[3]), k.dtype), k], axis=2)
                v = mx.concatenate([mx.zeros((B, v.shape[1], pad, v.shape[3]), v.dtype), v], axis=2)
            ks.append(k)
            vs.append(v)
        merged.keys = mx.concatenate(ks, axis=0)
        merged.values = mx.concatenate(vs, axis=0)
        merged.length = length
        return merged

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


QuantizedKV = tuple[mx.array, mx.array, mx.array]  # mx.quantize's (packed, scales, biases)


class QuantizedKVCache(BatchKVCache):
    """The same left-padded batch cache with keys and values stored as `mx.quantize` triples
    (group size 64): 8 bits take ~0.53x the bytes of float16 (the scales and biases cost 4
    bytes per 64 values), 4 bits ~0.28x. Attention reads them through `mx.quantized_matmul`
    (see `model.quantized_attention`), never dequantizing the whole cache.

    `keys` and `values` are triples; each array has the tokens on axis 2.
    """

    group_size = 64

    def __init__(self, left_padding: Sequence[int] = (0,), *, bits: int = 8):
        super().__init__(left_padding)
        self.bits = bits

    @staticmethod
    def bytes_per_token(
        num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, bits: int
    ) -> int:
        groups = head_dim // QuantizedKVCache.group_size
        return 2 * num_layers * kv_heads * (head_dim * bits // 8 + 2 * groups * dtype_bytes)

    def _buffers(self) -> list[mx.array]:
        return [*self.keys, *self.values]  # data, scales and biases all hold positions on axis 2

    def _quantize(self, x: mx.array) -> QuantizedKV:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @property
    def state(self) -> tuple[QuantizedKV | None, QuantizedKV | None]:
        if self.keys is None:
            return None, None
        return tree_map(lambda a: a[..., : self.length, :], (self.keys, self.values))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[QuantizedKV, QuantizedKV]:
        keys, values = self._quantize(keys), self._quantize(values)
        start, n = self.length, keys[0].shape[2]
        if self.keys is None or start + n > self.keys[0].shape[2]:
            self._grow(keys, values, start + n)
        for buffer, new in zip(self.keys + self.values, keys + values):
            buffer[..., start : start + n, :] = new
        self.length = start + n
        return self.state

    def _grow(self, keys: QuantizedKV, values: QuantizedKV, needed: int) -> None:
        capacity = ((needed + self.step - 1) // self.step) * self.step

        def grown(new: mx.array, old: mx.array | None) -> mx.array:
            B, H, _, D = new.shape
            buffer = mx.zeros((B, H, capacity, D), new.dtype)
            if old is not None and self.length:
                buffer[..., : self.length, :] = old[..., : self.length, :]
            return buffer

        old_k = self.keys or (None,) * 3
        old_v = self.values or (None,) * 3
        self.keys = tuple(grown(n, o) for n, o in zip(keys, old_k))
        self.values = tuple(grown(n, o) for n, o in zip(values, old_v))

    def filter(self, rows: Sequence[int]) -> None:
        self.left_padding = [self.left_padding[r] for r in rows]
        shift = min(self.left_padding, default=0)
        if self.keys is not None:
            index = mx.array(list(rows))
            self.keys, self.values = tree_map(
                lambda a: a[index][..., shift:, :], (self.keys, self.values)
            )
        self.length -= shift
        self.left_padding = [p - shift for p in self.left_padding]

    def extract(self, row: int) -> tuple[QuantizedKV, QuantizedKV]:
        pad = self.left_padding[row]
        return tree_map(
            lambda a: a[row : row + 1, :, pad : self.length, :], (self.keys, self.values)
        )

    @classmethod
    def from_state(cls, keys: QuantizedKV, values: QuantizedKV) -> QuantizedKVCache:
        """A one-row cache holding a stored (already quantized) prefix."""
        packed, scales = keys[0], keys[1]
        head_dim = scales.shape[-1] * cls.group_size
        cache = cls([0], bits=packed.shape[-1] * 32 // head_dim)
        cache.keys, cache.values = tree_map(mx.contiguous, (tuple(keys), tuple(values)))
        cache.length = packed.shape[2]
        return cache

    @classmethod
    def merge(cls, caches: Sequence[QuantizedKVCache]) -> QuantizedKVCache:
        """Stack caches row-wise, left-padding each so that all rows end at the same index."""
        if len(caches) == 1:
            return caches[0]
        length = max(c.length for c in caches)
        merged = cls(
            [p + length - c.length for c in caches for p in c.left_padding], bits=caches[0].bits
        )
        ref = next((c for c in caches if c.keys is not None), None)
        if ref is None:
            return merged

        def rows(c: QuantizedKVCache, like: mx.array, part: mx.array | None) -> mx.array:
            B, pad = c.batch_size, length - c.length
            if part is None:
                return mx.zeros((B, like.shape[1], length, like.shape[3]), like.dtype)
            part = part[..., : c.length, :]
            if not pad:
                return part
            zeros = mx.zeros((B, part.shape[1], pad, part.shape[3]), part.dtype)
            return mx.concatenate([zeros, part], axis=2)

        def stacked(which: str) -> tuple[mx.array, ...]:
            parts = []
            for i, like in enumerate(getattr(ref, which)):
                own = [None if c.keys is None else getattr(c, which)[i] for c in caches]
                parts.append(mx.concatenate([rows(c, like, p) for c, p in zip(caches, own)]))
            return tuple(parts)

        merged.keys, merged.values = stacked("keys"), stacked("values")
        merged.length = length
        return merged

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys + self.values)


KV_BITS = (4, 8)


def kv_bytes_per_token(args, dtype_bytes: int, kv_bits: int | None = None) -> int:
    """KV bytes one token costs in every layer (`args` a ModelArgs), float or quantized.

    Raises:
        InvalidRequestError: `kv_bits` not one of KV_BITS, or a head_dim that is not a multiple
            of the quantization group (64); `param` is "kv_bits".
    """
    if kv_bits is None:
        return args.kv_bytes_per_token(dtype_bytes)
    from .errors import InvalidRequestError

    if kv_bits not in KV_BITS:
        raise InvalidRequestError(
            f"kv_bits must be one of {KV_BITS}, got {kv_bits}", param="kv_bits"
        )
    if args.head_dim % QuantizedKVCache.group_size:
        raise InvalidRequestError(
            f"kv_bits needs a head_dim that is a multiple of {QuantizedKVCache.group_size}; this "
            f"model's is {args.head_dim}",
            param="kv_bits",
        )
    return QuantizedKVCache.bytes_per_token(
        args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype_bytes, kv_bits
    )


def make_cache(
    num_layers: int, batch_size: int = 1, *, kv_bits: int | None = None
) -> list[BatchKVCache]:
    """Empty caches, one per layer; quantized to `kv_bits` when given."""
    if kv_bits is not None:
        return [QuantizedKVCache([0] * batch_size, bits=kv_bits) for _ in range(num_layers)]
    return [BatchKVCache([0] * batch_size) for _ in range(num_layers)]


def cache_from_state(keys, values) -> BatchKVCache:
    """A one-row cache holding a stored prefix: quantized when the prefix is."""
    if isinstance(keys, tuple):
        return QuantizedKVCache.from_state(keys, values)
    return BatchKVCache.from_state(keys, values)


def merge_caches(per_group: Sequence[Sequence[BatchKVCache]]) -> list[BatchKVCache]:
    """Merge several per-layer cache lists (each a group of rows) into one batch."""
    return [type(layer[0]).merge(layer) for layer in zip(*per_group)]


def trim_cache_rows(caches: Sequence[BatchKVCache], drop: Sequence[int]) -> None:
    for c in caches:
        c.trim_rows(drop)


def filter_caches(caches: Sequence[BatchKVCache], rows: Sequence[int]) -> None:
    for c in caches:
        c.filter(rows)
