"""Model hyper-parameters, checked once so a bad combination fails before any process starts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GPTConfig:
    vocab_size: int = 0          # 0: taken from the prepared data's manifest
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None or n_head: multi-head; 1: multi-query; between: grouped-query
    d_model: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    pos_emb: str = "learned"     # learned (rope: see issue tracker)
    attn: str = "einsum"         # einsum reference path

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the offending `model.*` key(s)."""
        for key in ("n_layer", "n_head", "d_model", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if not 1 <= self.kv_heads <= self.n_head or self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head} "
                "(n_kv_head must be a divisor of n_head between 1 and n_head)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb != "learned":
            raise ValueError(f"model.pos_emb={self.pos_emb!r}: only 'learned' is implemented so far")
        if self.attn != "einsum":
            raise ValueError(f"model.attn={self.attn!r}: only 'einsum' is implemented so far")
        if self.vocab_size < 1:
            raise ValueError("model.vocab_size must be >= 1 (it is normally set from the data manifest)")

