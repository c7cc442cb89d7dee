"""The einsum GPT and its sampling; imports no DeepSpeed and reads no files."""
from .config import GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig"]
