"""MoE layers and their variants (compositions of Router, Engine and ExpertBank)."""

from . import variants  # noqa: F401,E402  (registers the variant builders)
from .attention import ATTENTION_BUILDERS, build_attention, register_attention
from .moe import MoE, MoEConfig, routing_stats
from .registry import FFN_BUILDERS, build_ffn, register_ffn

__all__ = ["MoE", "MoEConfig", "routing_stats", "FFN_BUILDERS", "build_ffn", "register_ffn",
           "ATTENTION_BUILDERS", "build_attention", "register_attention"]
