"""MoE layers and their variants (compositions of Router, Engine and ExpertBank)."""

from .moe import MoE, MoEConfig, routing_stats

__all__ = ["MoE", "MoEConfig", "routing_stats"]
