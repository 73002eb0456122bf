"""Qwen3-MoE (``Qwen3MoeSparseMoeBlock``): softmax top-k, renormalised when ``norm_topk_prob``; SwiGLU experts.

transformers names: ``gate.weight [E, D]``, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``.
Layers listed in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) are dense and stay untouched.
"""

from __future__ import annotations

from typing import Any

from ..layers import MoEConfig
from ..routing import RouterConfig
from .adapter import Adapter, register_adapter
from .layouts import gated_activation, packed_experts_to_hf, packed_experts_to_moekit


def softmax_topk_config(block: Any, where: str) -> MoEConfig:  # a transformers block
    """Config of a block with a ``gate`` (softmax top-k, optional renormalisation) and packed experts."""
    gate, experts = block.gate, block.experts
    return MoEConfig(
        dim=gate.hidden_dim, hidden_dim=experts.intermediate_dim, num_experts=gate.num_experts, top_k=gate.top_k,
        activation=gated_activation(experts.config.hidden_act, where),
        router=RouterConfig(score_func="softmax", norm_topk_prob=bool(gate.norm_topk_prob),
                            aux_loss_coef=float(getattr(experts.config, "router_aux_loss_coef", 0.0))))


def to_moekit(hf, cfg):
    return {"router.weight": hf["gate.weight"], **packed_experts_to_moekit(hf)}


def to_hf(mk, cfg):
    return {"gate.weight": mk["router.weight"], **packed_experts_to_hf(mk)}


ADAPTER = register_adapter(Adapter("qwen3_moe", "Qwen3MoeSparseMoeBlock",
                                   lambda block: softmax_topk_config(block, "qwen3_moe"), to_moekit, to_hf))
