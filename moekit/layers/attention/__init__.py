"""Attention-side parts: the attention registry, rotary positions and the MoE-attention variants.

Importing this package registers every attention variant's builder (``moekit.layers`` imports it); the dense
attention registers itself from :mod:`moekit.models.attention`.
"""

from .registry import (
    ATTENTION_BUILDERS,
    ATTENTION_PROBS_KEY,
    build_attention,
    check_attention_kind,
    parse_attention_options,
    register_attention,
)
from .rope import apply_rope, rope_tables

__all__ = ["ATTENTION_BUILDERS", "ATTENTION_PROBS_KEY", "apply_rope", "build_attention", "check_attention_kind",
           "parse_attention_options", "register_attention", "rope_tables"]

from . import mom, routing_attention, smha, switchhead  # noqa: F401  (registers the attention variants)
