"""Checkpoint interop: Hugging Face / sentence-transformers and T5X formats."""
