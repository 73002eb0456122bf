"""Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): softmax top-k routed experts plus one shared SwiGLU expert whose
output is scaled per token by ``sigmoid(shared_expert_gate(x))``.

transformers names: ``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj`` (packed layout),
``shared_expert.{gate,up,down}_proj.weight`` (its own ``shared_expert_intermediate_size``) and
``shared_expert_gate.weight [1, D]``. moekit: ``shared_hidden_dim`` and ``use_shared_gate``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..layers import MoEConfig
from .adapter import Adapter, register_adapter
from .layouts import mlp_to_hf, mlp_to_moekit, packed_experts_to_hf, packed_experts_to_moekit
from .qwen3_moe import softmax_topk_config


def moe_config(block: Any) -> MoEConfig:  # a transformers block
    base = softmax_topk_config(block, "qwen2_moe")
    return replace(base, num_shared_experts=1, shared_hidden_dim=block.shared_expert.intermediate_size,
                   use_shared_gate=True)


def to_moekit(hf, cfg):
    return {"router.weight": hf["gate.weight"], **packed_experts_to_moekit(hf),
            **mlp_to_moekit(hf, "shared_expert."), "w_shared_gate": hf["shared_expert_gate.weight"]}


def to_hf(mk, cfg):
    return {"gate.weight": mk["router.weight"], **packed_experts_to_hf(mk),
            **mlp_to_hf(mk, "shared_expert."), "shared_expert_gate.weight": mk["w_shared_gate"]}


ADAPTER = register_adapter(Adapter("qwen2_moe", "Qwen2MoeSparseMoeBlock", moe_config, to_moekit, to_hf))
