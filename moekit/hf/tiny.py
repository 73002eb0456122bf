"""Small random transformers models of every supported architecture, built from their config classes.

For tests, demos (``moekit analyze --tiny mixtral``) and benchmarks: nothing is downloaded. Weights are drawn
from ``N(0, init_std)`` (norms keep their ones) so that routing is decisive rather than the near-uniform
routing of transformers' 0.02 initialisation, where float rounding could flip near-ties.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "tiny_model"]

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def _config(arch: str, *, dim: int, hidden_dim: int, num_experts: int, top_k: int, num_layers: int,
            vocab_size: int, num_heads: int):
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=dim, num_attention_heads=num_heads,
                  num_key_value_heads=max(1, num_heads // 2), num_hidden_layers=num_layers,
                  max_position_embeddings=256, router_aux_loss_coef=0.02, tie_word_embeddings=False)
    head_dim = dim // num_heads
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=hidden_dim, num_local_experts=num_experts,
                                num_experts_per_tok=top_k), tf.MixtralForCausalLM
    if arch == "qwen2_moe":  # layer 0 dense (mlp_only_layers), routed experts plus a gated shared expert
        return tf.Qwen2MoeConfig(**common, intermediate_size=2 * hidden_dim, moe_intermediate_size=hidden_dim,
                                 shared_expert_intermediate_size=hidden_dim + hidden_dim // 2,
                                 num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                                 mlp_only_layers=[0]), tf.Qwen2MoeForCausalLM
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=head_dim, intermediate_size=2 * hidden_dim,
                                 moe_intermediate_size=hidden_dim, num_experts=num_experts,
                                 num_experts_per_tok=top_k, norm_topk_prob=True), tf.Qwen3MoeForCausalLM
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=hidden_dim, num_experts=num_experts,
                              num_experts_per_tok=top_k, pad_token_id=0, eos_token_id=1,
                              bos_token_id=None), tf.OlmoeForCausalLM
    if arch == "deepseek_v3":  # first layer dense, 4 expert groups, MLA attention
        common.update(num_key_value_heads=num_heads, num_hidden_layers=num_layers + 1, rope_parameters=None)
        return tf.DeepseekV3Config(**common, intermediate_size=2 * hidden_dim, moe_intermediate_size=hidden_dim,
                                   n_routed_experts=num_experts, n_group=4, topk_group=2,
                                   num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1,
                                   routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None,
                                   qk_rope_head_dim=head_dim // 2, qk_nope_head_dim=head_dim // 2,
                                   v_head_dim=head_dim), tf.DeepseekV3ForCausalLM
    if arch == "gpt_oss":
        return tf.GptOssConfig(**common, head_dim=head_dim, intermediate_size=hidden_dim,
                               num_local_experts=num_experts, num_experts_per_tok=top_k,
                               sliding_window=16), tf.GptOssForCausalLM
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def tiny_model(arch: str, *, dim: int = 32, hidden_dim: int = 12, num_experts: int = 8, top_k: int = 2,
               num_layers: int = 2, vocab_size: int = 101, num_heads: int = 4, seed: int = 0,
               init_std: float = 0.3, experts_implementation: str | None = None) -> nn.Module:
    """A random ``*ForCausalLM`` of ``arch`` in eval mode, float32, eager attention.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        dim / hidden_dim / num_experts / top_k / num_layers: sizes (DeepSeek-V3 adds one dense first layer;
            Qwen2-MoE's first layer is dense). ``num_experts`` must be divisible by 4 for DeepSeek-V3's groups.
        init_std: standard deviation of every weight matrix (vectors use a third of it).
        experts_implementation: transformers' experts backend (``eager``, ``grouped_mm``, ``batched_mm``);
            None keeps transformers' default.
    """
    cfg, cls = _config(arch, dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
                       num_layers=num_layers, vocab_size=vocab_size, num_heads=num_heads)
    cfg._attn_implementation = "eager"
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, init_std if p.dim() > 1 else init_std / 3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model
