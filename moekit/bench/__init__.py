"""Benchmarks (ratios measured in one process run; see BENCHMARKS.md)."""

from .timing import alternate, saved_activation_bytes

__all__ = ["alternate", "saved_activation_bytes"]
