"""Text sources, the character tokenizer, zstd shards and the per-rank loader (knows no model)."""
