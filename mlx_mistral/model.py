"""Mistral in MLX: the transformer only (no serving logic).

Shapes: B batch, L new tokens, D hidden size, H query heads, K key/value heads, d head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import BatchKVCache, make_cache
from .config import ModelArgs
from .padded_linear import Linear


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.rope_theta = args.rope_theta
        dim = args.hidden_size
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=False)

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
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

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


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


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
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Sequence[BatchKVCache] | None = None) -> mx.array:
        return self.project(self.hidden_states(tokens, cache))

    def hidden_states(
        self, tokens: mx.array, cache: Sequence[BatchKVCache] | None = None
    ) -> mx.array:
        """The final normed hidden states (B, T, D); the engine projects only the rows it needs."""
        L = tokens.shape[1]
        h = self.model.embed_tokens(tokens)  # (B, L, D)
        window = self.args.sliding_window
        if cache is None:
            positions: int | mx.array = 0
            mask = BatchKVCache([0] * tokens.shape[0]).make_mask(L, window) if L > 1 else None
            layer_caches: Sequence[BatchKVCache | None] = [None] * len(self.model.layers)
        else:
            positions = cache[0].positions()
            mask = cache[0].make_mask(L, window)
            layer_caches = cache
        for layer, layer_cache in zip(self.model.layers, layer_caches):
            h = layer(h, mask, positions, layer_cache)
        return self.model.norm(h)

    def project(self, h: mx.array) -> mx.array:
        """Hidden states -> logits."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self, batch_size: int = 1) -> list[BatchKVCache]:
        return make_cache(self.args.num_hidden_layers, batch_size)

    @property
    def layers(self):
        return self.model.layers
