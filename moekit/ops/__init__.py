"""Differentiable ops with hand-written backward passes."""

from .blocked_moe import blocked_moe_ffn
from .sorted_moe import sorted_moe_ffn

__all__ = ["blocked_moe_ffn", "sorted_moe_ffn"]
