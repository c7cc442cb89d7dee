"""The einsum GPT, its attention variants and sampling; imports no DeepSpeed and reads no files."""
from .attention import KVCache
from .config import GPTConfig
from .gpt import GPT
from .sampling import generate

__all__ = ["GPT", "GPTConfig", "KVCache", "generate"]
