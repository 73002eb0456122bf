"""Serving: text generation with a KV cache."""

from .sampling import generate, sample_next

__all__ = ["generate", "sample_next"]
