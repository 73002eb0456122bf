"""Causal self-attention with rotary positions, and the KV cache used for sampling.

Dim legend: B batch, S new positions, P cached positions (past + new), H heads, Dh head dim, D model dim.

Rotary positions (RoPE, Su et al., arXiv 2104.09864 eq. 34) live in :mod:`moekit.layers.attention.rope`, shared
with the attention variants. Attention itself is ``torch.nn.functional.scaled_dot_product_attention``.
The dense attention is registered as ``model.attention = "dense"`` in the attention registry
(:mod:`moekit.layers.attention.registry`), beside the MoE-attention variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError
from ..layers.attention import ATTENTION_PROBS_KEY, apply_rope, register_attention, rope_tables
from ..layers.variants.mor import shared_kv_attention

__all__ = ["Attention", "KVCache", "rope_tables", "apply_rope"]


class KVCache:
    """Keys and values of every layer for the positions seen so far (sampling only).

    Args:
        num_layers, batch, num_heads, context, head_dim: sizes of the preallocated buffers.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, context: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, num_heads, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled; advanced by the model after all layers have written
        # Left padding of each row (batched generation of prompts of different lengths): row b's first
        # pad_B[b] positions are padding, hidden from every other position, and its positions start after them.
        self.pad_B: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of ``layer``; return that layer's keys and values up to them."""
        end = self.length + k_BHSDh.shape[2]
        self.k[layer, :, :, self.length:end] = k_BHSDh
        self.v[layer, :, :, self.length:end] = v_BHSDh
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions (no biases)."""

    def __init__(self, dim: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.w_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.w_qkv.weight, std=dim**-0.5)
        # GPT-2 scaling: residual branches add up over 2 * num_layers sublayers.
        nn.init.normal_(self.w_out.weight, std=dim**-0.5 / (2 * num_layers) ** 0.5)

    supports_kv_cache = True
    publish_probs = False  # set by the block when its feed-forward reads the attention pattern

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, ctx=None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.w_qkv(x_BSD).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        shared = shared_kv_attention(ctx, layer, q, k, v) if cache is None else None  # MoR's KV sharing
        if shared is not None:
            y = shared
        elif self.publish_probs and ctx is not None:  # explicit softmax: the probabilities are read downstream
            if cache is not None and cache.pad_B is not None:
                raise ConfigError("a feed-forward that reads the attention pattern (e.g. GMoE's attention-aware "
                                  "mode) cannot run on a left-padded batch; generate its prompts one at a time")
            past = 0 if cache is None else cache.length
            if cache is not None:
                k, v = cache.write(layer, k, v)
            mask_SP = torch.arange(past + S, device=x_BSD.device)[None, :] <= (
                past + torch.arange(S, device=x_BSD.device))[:, None]
            scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
            probs_BHSP = scores.float().masked_fill(~mask_SP, float("-inf")).softmax(-1)
            ctx.state[ATTENTION_PROBS_KEY] = probs_BHSP
            y = probs_BHSP.to(v.dtype) @ v
        elif cache is None or (cache.length == 0 and cache.pad_B is None):
            if cache is not None:
                cache.write(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = cache.length
            k, v = cache.write(layer, k, v)
            # New position i (absolute past + i) sees every cached key j <= past + i.
            key_P = torch.arange(past + S, device=x_BSD.device)
            query_S = past + torch.arange(S, device=x_BSD.device)
            mask = key_P[None, :] <= query_S[:, None]
            if cache.pad_B is not None:  # padding keys are hidden; a padding query sees only itself (no NaN)
                real_BP = key_P[None, :] >= cache.pad_B[:, None]
                mask = mask & (real_BP[:, None, :] | (key_P[None, :] == query_S[:, None])[None])
                mask = mask[:, None]  # [B, 1, S, P]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.w_out(y.transpose(1, 2).reshape(B, S, D))


@register_attention("dense")
def build_dense_attention(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int,
                          layer_index: int, name: str) -> nn.Module:
    if options:
        raise ConfigError(f"model.attention='dense' takes no options, got attention_options={options!r}; "
                          f"remove them or choose an attention variant (model.attention)")
    return Attention(dim, num_heads, num_layers)
