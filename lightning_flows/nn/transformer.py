"""A small causal (decoder-only) transformer over token sequences, with a key/value cache.

``CausalTransformer(h)`` maps embedded tokens ``h: (B, L, width)`` to ``(B, L, width)`` such that output
``i`` depends on inputs ``0..i`` only (causal self-attention, pre-LayerNorm residual layers). Called with a
:class:`KVCache`, it processes the *next* tokens of a sequence whose earlier keys and values the cache
holds: decoding a sequence one token at a time then costs one incremental pass per token (each new query
attends to the cached keys) instead of re-running the whole prefix, and gives the same outputs as the
parallel pass up to float rounding. TarFlow's sequential inversion (:mod:`lightning_flows.models.tarflow`)
is that decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerCache:
    """Keys and values of one attention layer for ``length`` positions, preallocated for ``capacity``:
    ``(B, heads, capacity, head_dim)`` each."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, device, dtype):
        self.keys = torch.empty(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``(B, heads, L, head_dim)`` new keys/values; return every stored one (views)."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"the key/value cache holds {self.keys.shape[2]} positions; {end} were requested.")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One :class:`LayerCache` per layer of a :class:`CausalTransformer`; ``length``: positions seen so far."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``i`` attends to positions ``<= i``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"the transformer width ({width}) must be divisible by its heads ({heads}).")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor, cache: LayerCache | None = None) -> Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = cache.length
            k, v = cache.append(k, v)
            # New query j (absolute position past + j) sees keys 0..past + j. One new token sees all of them.
            mask = None
            if length > 1:
                mask = torch.ones(length, past + length, dtype=torch.bool, device=h.device).tril(diagonal=past)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm residual layer: causal attention, then a GELU MLP of ``mlp_ratio * width``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor, cache: LayerCache | None = None) -> Tensor:
        h = h + self.attention(self.attention_norm(h), cache)
        return h + self.mlp(self.mlp_norm(h))


class CausalTransformer(nn.Module):
    """``depth`` causal layers and a final LayerNorm: ``h: (B, L, width)`` -> ``(B, L, width)``.

    Positions are the caller's business (add a position embedding to ``h``); with a ``cache`` the ``L``
    tokens are the sequence's positions ``cache.length .. cache.length + L - 1``.

    Example:
        >>> net = CausalTransformer(width=8, depth=2, heads=2)
        >>> h = torch.randn(3, 5, 8)
        >>> cache = net.new_cache(batch=3, capacity=5, like=h)
        >>> stepwise = torch.cat([net(h[:, i:i + 1], cache) for i in range(5)], dim=1)
        >>> torch.allclose(stepwise, net(h), atol=1e-5)
        True
    """

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a transformer needs depth >= 1 layers, got {depth}.")
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def new_cache(self, batch: int, capacity: int, like: Tensor) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens, on ``like``'s device and dtype."""
        attention = self.layers[0].attention
        return KVCache([LayerCache(batch, attention.heads, capacity, attention.head_dim, like.device, like.dtype)
                        for _ in self.layers])

    def forward(self, h: Tensor, cache: KVCache | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache.layers[i])
        return self.norm(h)


__all__ = ["CausalSelfAttention", "CausalTransformer", "KVCache", "LayerCache", "TransformerLayer"]
