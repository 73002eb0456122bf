"""MoE layers and their variants (compositions of Router, Engine and ExpertBank)."""

from .moe import MoE, MoEConfig, routing_stats
from .registry import FFN_BUILDERS, build_ffn, register_ffn
from .attention import ATTENTION_BUILDERS, build_attention, register_attention
from . import variants  # noqa: F401,E402  (registers the variant builders)

__all__ = ["MoE", "MoEConfig", "routing_stats", "FFN_BUILDERS", "build_ffn", "register_ffn",
           "ATTENTION_BUILDERS", "build_attention", "register_attention"]
