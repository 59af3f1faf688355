"""Leaf modules both sides share: exit codes, logging setup, run-directory files, the model cache (GGUF
conversions) and where a recipe's model and tokenizer load from. Torch-free at module level."""
