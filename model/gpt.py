"""A GPT written with einsum: every contraction names its axes, every boundary checks its shapes."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import Attention, KVCache
from .config import GPTConfig
from .norm import LayerNorm


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = F.gelu if cfg.mlp == "gelu" else relu2

    def forward(self, x):
        return self.drop(self.down(self.act(self.up(x))))


def relu2(x):
    return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1, self.attn = LayerNorm(cfg.d_model, cfg.bias), Attention(cfg, layer)
        self.ln2, self.mlp = LayerNorm(cfg.d_model, cfg.bias), MLP(cfg)

    def forward(self, x, cache: KVCache | None = None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.head.weight = self.tok_emb.weight
        # Recompute each block's activations in the backward pass instead of keeping them: less
        # memory for a third more compute. A training choice, so not part of GPTConfig.
        self.activation_checkpointing = False
        self.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (a tied output head shares the token embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.cfg.embedding_params() if non_embedding else n

    def new_cache(self, batch: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg, batch, p.device, p.dtype)

    def check_input(self, idx: torch.Tensor, start: int) -> None:
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT expects int64 or int32 token ids, got dtype {idx.dtype}")
        if start + idx.shape[1] > self.cfg.block_size:
            raise ValueError(
                f"sequence length {start + idx.shape[1]} exceeds model.block_size={self.cfg.block_size}"
            )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (batch, time, vocab), and the mean cross-entropy when targets are given.

        With a cache, idx continues the cached sequence (positions cache.length onwards).
        """
        start = cache.length if cache is not None else 0
        self.check_input(idx, start)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from input shape {tuple(idx.shape)}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + idx.shape[1], device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        if cache is not None:
            cache.length += idx.shape[1]
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss
