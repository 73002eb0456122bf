"""GPT-OSS (``GptOssMLP``): a router with a bias, top-k of the logits then a softmax over the k chosen (equal to
moekit's softmax-then-renormalise), and experts with biases and a clamped SwiGLU.

transformers names and layout (transposed and interleaved, unlike the other families):
``router.weight [E, D]``, ``router.bias [E]``; ``experts.gate_up_proj [E, D, 2F]`` with gate and up interleaved
along the last dim (gate = even columns); ``experts.gate_up_proj_bias [E, 2F]`` likewise;
``experts.down_proj [E, F, D]``; ``experts.down_proj_bias [E, D]``. moekit reads them through strided views
(``[..., ::2].transpose``), so nothing is copied; packing back interleaves, which is a copy.
The block returns ``(hidden, router_scores_TK)``; the patched block does too.
"""

from __future__ import annotations

from typing import Any

import torch

from ..experts.activations import CLAMP_ALPHA, CLAMP_LIMIT
from ..layers import MoEConfig
from ..routing import RouterConfig
from .adapter import Adapter, ConversionError, register_adapter


def moe_config(block: Any) -> MoEConfig:  # a transformers block
    router, experts = block.router, block.experts
    if (experts.alpha, experts.limit) != (CLAMP_ALPHA, CLAMP_LIMIT):
        raise ConversionError(f"gpt_oss: swiglu_alpha={experts.alpha}, swiglu_limit={experts.limit}; moekit's "
                              f"clamped_swiglu is defined with alpha={CLAMP_ALPHA}, limit={CLAMP_LIMIT}")
    return MoEConfig(
        dim=router.hidden_dim, hidden_dim=experts.intermediate_size, num_experts=router.num_experts,
        top_k=router.top_k, activation="clamped_swiglu", use_ffn_bias=True,
        router=RouterConfig(score_func="softmax", norm_topk_prob=True, use_logit_bias=True,
                            aux_loss_coef=float(getattr(experts.config, "router_aux_loss_coef", 0.0))))


def to_moekit(hf, cfg):
    gate_up_EDX, bias_EX = hf["experts.gate_up_proj"], hf["experts.gate_up_proj_bias"]
    return {"router.weight": hf["router.weight"], "router.bias": hf["router.bias"],
            "experts.w_gate": gate_up_EDX[..., 0::2].transpose(1, 2),
            "experts.w_up": gate_up_EDX[..., 1::2].transpose(1, 2),
            "experts.b_gate": bias_EX[:, 0::2], "experts.b_up": bias_EX[:, 1::2],
            "experts.w_down": hf["experts.down_proj"].transpose(1, 2),
            "experts.b_down": hf["experts.down_proj_bias"]}


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    return torch.stack([even, odd], dim=-1).flatten(-2)


def to_hf(mk, cfg):
    return {"router.weight": mk["router.weight"], "router.bias": mk["router.bias"],
            "experts.gate_up_proj": _interleave(mk["experts.w_gate"].transpose(1, 2),
                                                mk["experts.w_up"].transpose(1, 2)),
            "experts.gate_up_proj_bias": _interleave(mk["experts.b_gate"], mk["experts.b_up"]),
            "experts.down_proj": mk["experts.w_down"].transpose(1, 2),
            "experts.down_proj_bias": mk["experts.b_down"]}


ADAPTER = register_adapter(Adapter("gpt_oss", "GptOssMLP", moe_config, to_moekit, to_hf, returns_scores=True))
