"""Mixtral (``MixtralSparseMoeBlock``): softmax over E experts, top-k, renormalised; SwiGLU experts.

transformers names: ``gate.weight [E, D]``, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``.
``router_jitter_noise`` (training only) multiplies the block's input, for the router and the experts alike;
moekit's ``jitter_eps`` jitters the router's input only (Switch), so a non-zero value is flagged at patch time.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..layers import MoEConfig
from ..routing import RouterConfig
from .adapter import Adapter, register_adapter
from .layouts import gated_activation, packed_experts_to_hf, packed_experts_to_moekit


def moe_config(block: Any) -> MoEConfig:  # a transformers block
    gate, experts = block.gate, block.experts
    if block.jitter_noise > 0:
        warnings.warn("Mixtral router_jitter_noise > 0: moekit jitters the router input only, transformers "
                      "also the experts' input; training-time outputs will differ", stacklevel=3)
    return MoEConfig(
        dim=gate.hidden_dim, hidden_dim=experts.intermediate_dim, num_experts=gate.num_experts, top_k=gate.top_k,
        activation=gated_activation(experts.config.hidden_act, "mixtral"),
        router=RouterConfig(score_func="softmax", norm_topk_prob=True, jitter_eps=block.jitter_noise,
                            aux_loss_coef=float(getattr(experts.config, "router_aux_loss_coef", 0.0))))


def to_moekit(hf, cfg):
    return {"router.weight": hf["gate.weight"], **packed_experts_to_moekit(hf)}


def to_hf(mk, cfg):
    return {"gate.weight": mk["router.weight"], **packed_experts_to_hf(mk)}


ADAPTER = register_adapter(Adapter("mixtral", "MixtralSparseMoeBlock", moe_config, to_moekit, to_hf))
