"""Data preparation: corpora -> tokenizer -> packed token shards (format: distillery/shards.py)."""
