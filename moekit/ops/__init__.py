"""Differentiable ops with hand-written backward passes."""

from .sorted_moe import sorted_moe_ffn

__all__ = ["sorted_moe_ffn"]
