"""Causal self-attention: an einsum reference path and an SDPA fast path, RoPE, grouped KV heads, KV cache.

Query heads are laid out as (g r): g key/value groups of r query heads each, so n_kv_head = n_head is
multi-head attention, n_kv_head = 1 is multi-query, and anything between is grouped-query.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import GPTConfig
from .norm import LayerNorm


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs (x_i, x_{i+d/2}) by angle pos / base^(2i/d).

    cos and sin are computed in fp32 once per device for max_len positions (more if asked), and
    sliced after (no buffers, so a model cast to bf16 keeps exact positions and checkpoints hold no
    angles).
    """

    def __init__(self, head_dim: int, max_len: int = 0, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (length', head_dim / 2) with length' >= length, on the device."""
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            d, length = self.head_dim, max(length, self.max_len)
            with torch.inference_mode(False):  # tables made during inference must serve training too
                inv_freq = self.base ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
                angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
                cached = self._tables[device] = (angles.cos(), angles.sin())
        return cached

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (..., t, d), the tokens at positions start .. start + t - 1."""
        t = x.shape[-2]
        cos, sin = self.tables(start + t, x.device)
        cos, sin = cos[start:start + t], sin[start:start + t]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer for up to block_size positions, filled by prefill then one token at a time."""

    def __init__(self, cfg: GPTConfig, batch: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled in every layer

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        return self.nbytes // self.k.shape[3] // self.k.shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b g t d) after the filled positions; return all keys and values so far."""
        start, t = self.length, k.shape[2]
        self.k[layer, :, :, start:start + t] = k
        self.v[layer, :, :, start:start + t] = v
        return self.k[layer, :, :, :start + t], self.v[layer, :, :, :start + t]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.impl, self.dropout = layer, cfg.attn, cfg.dropout
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * self.hd, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * self.n_kv * self.hd, bias=cfg.bias)
        self.out = nn.Linear(cfg.n_head * self.hd, cfg.d_model, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(self.hd, cfg.block_size) if cfg.pos_emb == "rope" else None
        self.q_norm = LayerNorm(self.hd, cfg.bias) if cfg.qk_norm else None
        self.k_norm = LayerNorm(self.hd, cfg.bias) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        q = rearrange(self.q(x), "b t (g r d) -> b g r t d", g=self.n_kv, d=self.hd)
        k, v = rearrange(self.kv(x), "b t (two g d) -> two b g t d", two=2, g=self.n_kv, d=self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        attend = self._einsum if self.impl == "einsum" else self._sdpa
        y = attend(q, k, v, start)
        return self.resid_drop(self.out(rearrange(y, "b g r t d -> b t (g r d)")))

    @staticmethod
    def _mask(t: int, length: int, start: int, device) -> torch.Tensor:
        """True where query i (at position start + i) may see key j: j <= start + i."""
        return torch.arange(length, device=device)[None, :] <= start + torch.arange(t, device=device)[:, None]

    def _einsum(self, q, k, v, start: int):
        scores = torch.einsum("bgrqd,bgkd->bgrqk", q, k) / math.sqrt(self.hd)
        scores = scores.masked_fill(~self._mask(q.shape[3], k.shape[2], start, q.device), float("-inf"))
        weights = self.attn_drop(scores.softmax(dim=-1))
        return torch.einsum("bgrqk,bgkd->bgrqd", weights, v)

    def _sdpa(self, q, k, v, start: int):
        t, length = q.shape[3], k.shape[2]
        q = rearrange(q, "b g r t d -> b (g r) t d")
        mask, causal = None, False
        if start == 0 and t == length:
            causal = True
        elif t > 1:  # a chunk after a filled cache: an explicit mask
            mask = self._mask(t, length, start, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv != self.n_head)
        return rearrange(y, "b (g r) t d -> b g r t d", g=self.n_kv)
