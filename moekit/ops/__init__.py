"""Differentiable ops with hand-written backward passes."""

from .expert_ffn import expert_ffn

__all__ = ["expert_ffn"]
