"""DeepSeek-V3 (``DeepseekV3MoE``; arXiv 2412.19437 §2.1.2): sigmoid affinities, a selection-only correction
bias, group-limited top-k (the best ``topk_group`` of ``n_group`` groups, each scored by its two best
affinities), renormalised weights times ``routed_scaling_factor``, and shared experts every token uses.

transformers names: ``gate.weight [E, D]``, ``gate.e_score_correction_bias [E]`` (moekit ``router.expert_bias``
with ``use_selection_bias``), packed ``experts.*``, ``shared_experts.{gate,up,down}_proj.weight``. The first
``first_k_dense_replace`` layers hold a dense ``DeepseekV3MLP`` and stay untouched.
"""

from __future__ import annotations

from typing import Any

from ..layers import MoEConfig
from ..routing import RouterConfig
from .adapter import Adapter, register_adapter
from .layouts import gated_activation, mlp_to_hf, mlp_to_moekit, packed_experts_to_hf, packed_experts_to_moekit


def moe_config(block: Any) -> MoEConfig:  # a transformers block
    gate, experts = block.gate, block.experts
    F = experts.intermediate_dim
    shared = block.shared_experts.intermediate_size
    num_shared = max(1, shared // F)
    return MoEConfig(
        dim=gate.hidden_dim, hidden_dim=F, num_experts=gate.num_experts, top_k=gate.top_k,
        activation=gated_activation(experts.config.hidden_act, "deepseek_v3"),
        num_shared_experts=num_shared, shared_hidden_dim=None if num_shared * F == shared else shared,
        router=RouterConfig(score_func="sigmoid", norm_topk_prob=bool(gate.norm_topk_prob),
                            routed_scaling_factor=float(gate.routed_scaling_factor),
                            num_groups=gate.num_group, topk_groups=gate.topk_group, group_score="top2_sum",
                            use_selection_bias=True, aux_loss_coef=0.0))


def to_moekit(hf, cfg):
    return {"router.weight": hf["gate.weight"], "router.expert_bias": hf["gate.e_score_correction_bias"],
            **packed_experts_to_moekit(hf), **mlp_to_moekit(hf, "shared_experts.")}


def to_hf(mk, cfg):
    return {"gate.weight": mk["router.weight"], "gate.e_score_correction_bias": mk["router.expert_bias"],
            **packed_experts_to_hf(mk), **mlp_to_hf(mk, "shared_experts.")}


ADAPTER = register_adapter(Adapter("deepseek_v3", "DeepseekV3MoE", moe_config, to_moekit, to_hf))
