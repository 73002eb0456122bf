"""OLMoE (``OlmoeSparseMoeBlock``): softmax top-k (``norm_topk_prob`` False in OLMoE-1B-7B); SwiGLU experts.

The block has Qwen3-MoE's layout and routing; only its class name differs.
"""

from __future__ import annotations

from .adapter import Adapter, register_adapter
from .qwen3_moe import softmax_topk_config, to_hf, to_moekit

ADAPTER = register_adapter(Adapter("olmoe", "OlmoeSparseMoeBlock",
                                   lambda block: softmax_topk_config(block, "olmoe"), to_moekit, to_hf))
