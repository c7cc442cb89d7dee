"""Model hyper-parameters, checked once so a bad combination fails before any process starts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GPTConfig:
    """`model.*`: the defaults are the baby model (conf/model/baby.yaml changes nothing)."""

    vocab_size: int = 0
    """0: taken from the prepared data's manifest."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention (query) heads; d_model must be divisible by it."""
    n_kv_head: int | None = None
    """Key/value heads: null or n_head: multi-head; 1: multi-query; a divisor between: grouped-query."""
    d_model: int = 128
    """Width of the residual stream (head dim = d_model / n_head)."""
    block_size: int = 64
    """Context length in characters."""
    dropout: float = 0.0
    """Dropout on the embeddings, attention weights and residual branches while training."""
    bias: bool = False
    """Biases in the linear layers and layer norms."""
    pos_emb: str = "learned"
    """learned | rope."""
    attn: str = "sdpa"
    """sdpa (torch scaled_dot_product_attention, faster) | einsum (the readable reference; tested equal)."""
    qk_norm: bool = False
    """LayerNorm over each head's queries and keys before attention (QK-norm): steadier logits."""
    mlp: str = "gelu"
    """gelu | relu2 (ReLU squared): the MLP's activation."""
    tie_head: bool = True
    """The output head shares the token embedding's weights; false: a head of its own."""

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self, vocab_from_data: bool = False) -> None:
        """Raise ValueError naming the offending `model.*` key(s). vocab_from_data: vocab_size may still be
        0, to be set from the data's manifest."""
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
        if self.pos_emb not in ("learned", "rope"):
            raise ValueError(f"model.pos_emb={self.pos_emb!r}: choose learned or rope")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(
                f"model.pos_emb=rope needs an even head dim, but model.d_model={self.d_model} / "
                f"model.n_head={self.n_head} = {self.head_dim}"
            )
        if self.attn not in ("einsum", "sdpa"):
            raise ValueError(f"model.attn={self.attn!r}: choose einsum or sdpa")
        if self.mlp not in ("gelu", "relu2"):
            raise ValueError(f"model.mlp={self.mlp!r}: choose gelu or relu2")
        if self.vocab_size < 1 and not (vocab_from_data and self.vocab_size == 0):
            raise ValueError("model.vocab_size must be >= 1 (it is normally set from the data manifest)")

    def embedding_params(self) -> int:
        """Token embedding, an untied output head, and learned positions."""
        pos = self.block_size * self.d_model if self.pos_emb == "learned" else 0
        head = 0 if self.tie_head else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + head + pos

    def approx_params(self) -> int:
        """12·L·d² (attention 4d², MLP 8d² per layer, multi-head) plus the embeddings."""
        return 12 * self.n_layer * self.d_model ** 2 + self.embedding_params()

