"""Mistral in MLX: the transformer only (no serving logic).

Shapes: B batch, L new tokens, D hidden size, H query heads, K key/value heads, d head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import BatchKVCache, make_cache
from .config import ModelArgs
from .padded_linear import PaddedLinear


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.rope_theta = args.rope_theta
        dim = args.hidden_size
        self.q_proj = PaddedLinear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = PaddedLinear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = PaddedLinear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = PaddedLinear(self.n_heads * self.head_dim, dim, bias=False)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None,
        positions: int | mx.array,
        cache: BatchKVCache | None,
    ) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, d)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, K, L, d)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # HF's rotate_half layout is MLX's non-traditional RoPE.
        q = mx.fast.rope(
            q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=positions
        )
        k = mx.fast.rope(
            k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=positions
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, K, T, d), T = cached + L
        if cache is not None and cache.bits is not None:  # k and v are quantized triples
            out = quantized_attention(q, k, v, self.scale, mask, cache.group_size, cache.bits)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def quantized_attention(
    q: mx.array,
    k: tuple[mx.array, ...],
    v: tuple[mx.array, ...],
    scale: float,
    mask: mx.array | str | None,
    group_size: int,
    bits: int,
) -> mx.array:
    """Attention over a quantized cache: both products read the packed keys and values
    through `mx.quantized_matmul`, so the cache is never dequantized as a whole.

    q (B, H, L, d); k and v `mx.quantize` triples of (B, K, T, ...) -> (B, H, L, d).
    """
    B, H, L, d = q.shape
    K, T = k[0].shape[1], k[0].shape[2]
    q = (q * scale).reshape(B, K, H // K, L, d)  # each key head serves H // K query heads
    k = tuple(a[:, :, None] for a in k)  # (B, K, 1, T, ...)
    v = tuple(a[:, :, None] for a in v)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    if isinstance(mask, str):  # "causal": the L new queries are the last L positions
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    if mask is not None:
        if mask.ndim == 4:  # (B, 1, L, T) -> (B, 1, 1, L, T)
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)  # (B, K, H // K, L, T)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, L, d)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = PaddedLinear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = PaddedLinear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = PaddedLinear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, positions, cache):
        h = x + self.self_attn(self.input_layernorm(x), mask, positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(
    n: int, offset: int = 0, left_padding: Sequence[int] = (), window: int | None = None
) -> mx.array | str | None:
    """The mask for `n` new queries after `offset` cached positions: causal, hiding each row's
    left padding, and limited to the last `window` keys.

    Returns None (one query sees everything) or "causal" when no position needs hiding beyond
    causality: the fused attention kernel then builds the mask itself.
    """
    total = offset + n
    padded = any(left_padding)
    windowed = window is not None and total > window
    if not padded and not windowed:
        return None if n == 1 else "causal"
    q_idx = mx.arange(offset, total)[:, None]
    k_idx = mx.arange(total)[None]
    mask = q_idx >= k_idx
    if windowed:
        mask = mask & (q_idx - k_idx < window)
    if padded:
        pad = mx.array(left_padding)[:, None, None, None]
        mask = mask[None, None] & (k_idx[None, None] >= pad)  # (B, 1, n, total)
    return mask


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.sliding_window = args.sliding_window
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Sequence[BatchKVCache] | None = None) -> mx.array:
        """Token ids (B, L) -> the final normed hidden states (B, L, D)."""
        h = self.embed_tokens(tokens)  # (B, L, D)
        if cache is None:
            positions: int | mx.array = 0
            mask = attention_mask(tokens.shape[1], window=self.sliding_window)
            caches: Sequence[BatchKVCache | None] = [None] * len(self.layers)
        else:
            positions = cache[0].positions()
            mask = attention_mask(
                tokens.shape[1], cache[0].length, cache[0].left_padding, self.sliding_window
            )
            caches = cache
        for layer, layer_cache in zip(self.layers, caches):
            h = layer(h, mask, positions, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """Mistral for causal LM: `model(tokens[B, T], cache) -> logits[B, T, vocab]`.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_mistral.config import ModelArgs
        >>> args = ModelArgs(hidden_size=32, num_hidden_layers=1, intermediate_size=64,
        ...                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        >>> model = Model(args)
        >>> model(mx.array([[1, 2, 3]])).shape
        (1, 3, 100)
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = PaddedLinear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Sequence[BatchKVCache] | None = None) -> mx.array:
        return self.project(self.hidden_states(tokens, cache))

    def hidden_states(
        self, tokens: mx.array, cache: Sequence[BatchKVCache] | None = None
    ) -> mx.array:
        """The final normed hidden states (B, T, D); the engine projects only the rows it needs."""
        return self.model(tokens, cache)

    def project(self, h: mx.array) -> mx.array:
        """Hidden states -> logits."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self, batch_size: int = 1, *, kv_bits: int | None = None) -> list[BatchKVCache]:
        return make_cache(self.args.num_hidden_layers, batch_size, kv_bits=kv_bits)

    @property
    def layers(self):
        return self.model.layers
