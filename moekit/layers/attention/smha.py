"""SMHA: Union-of-Experts' selective multi-head attention, heads as experts chosen per token (Yang et al. 2025,
github YujiaoYang-work/UoE, model/attention/SMHA_v3.py; architectures.md §5).

Dim legend: B batch, S sequence, D model dim, H heads, K heads per token, Dh head dim, R rotary frequencies.

The dense attention is decomposed exactly: head ``h`` (its Q/K/V column slices and its ``Wo`` row slice) is an
expert, and multi-head attention is the sum of the heads' outputs. Each token takes the top-``K`` heads of a
per-token softmax gate (``K = H / 2`` by default); head ``h`` gathers only the tokens that chose it, in position
order, runs causal attention among them, projects through its ``Wo`` slice and adds back::

    g_t = softmax(W_g x_t) over H;  C_t = TopK(g_t, K)
    y_t = sum_{h in C_t} (softmax over {s <= t : h in C_s} of q_t^h k_s^h / sqrt(Dh)) v^h  Wo_h

Choices: the code mainly uses the gates as a mask (the spec says to verify whether values scale outputs), so the
forward uses the mask only and the gate enters as ``g / stopgrad(g)`` (exactly 1 in the forward pass) so that
the gate still learns; selected tokens keep their original rotary positions; the Switch balance loss over heads
(``aux_loss_coef``, off by default: the spec names none). With every head chosen by every token this is the dense
attention exactly. No KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...routing.losses import load_balancing_loss
from ...types import Routing, RoutingContext
from ..variants._common import record_stats
from .registry import parse_attention_options, register_attention
from .rope import apply_rope

__all__ = ["SMHAConfig", "SelectiveMultiHeadAttention"]

P = "attention_options"


@dataclass(frozen=True, kw_only=True, slots=True)
class SMHAConfig:
    """Attributes:
        heads_per_token: heads each token uses (``None``: half of the model's heads, the code's default).
        aux_loss_coef: weight of the Switch balance loss over heads (0: off).
    """

    heads_per_token: int | None = None
    aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        check(self.heads_per_token is None or (isinstance(self.heads_per_token, int) and self.heads_per_token >= 1),
              f"{P}.heads_per_token={self.heads_per_token!r} must be a positive integer or left out (half)")
        check(self.aux_loss_coef >= 0, f"{P}.aux_loss_coef={self.aux_loss_coef} must be >= 0 (0: off)")


class SelectiveMultiHeadAttention(nn.Module):
    """Heads chosen per token: ``forward(x_BSD, cos_SR, sin_SR, cache=None, layer=0, ctx=None) -> [B, S, D]``."""

    supports_kv_cache = False

    def __init__(self, dim: int, num_heads: int, num_layers: int, config: SMHAConfig | None = None,
                 name: str = "smha") -> None:
        super().__init__()
        self.config, self.name = config or SMHAConfig(), name
        k = self.config.heads_per_token or max(1, num_heads // 2)
        check(k <= num_heads, f"{P}.heads_per_token={k} exceeds model.num_heads={num_heads}; lower it")
        self.num_heads, self.head_dim, self.top_k = num_heads, dim // num_heads, k
        self.w_gate = nn.Linear(dim, num_heads, bias=False)
        self.w_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.w_gate.weight, std=dim**-0.5)
        nn.init.normal_(self.w_qkv.weight, std=dim**-0.5)
        nn.init.normal_(self.w_out.weight, std=dim**-0.5 / (2 * num_layers) ** 0.5)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, cache=None, layer: int = 0,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("SMHA attention has no KV cache; generate without one (moekit sample --no-cache)")
        B, S, D = x_BSD.shape
        H, Dh, K = self.num_heads, self.head_dim, self.top_k
        logits_BSH = self.w_gate(x_BSD).float()
        probs_BSH = logits_BSH.softmax(-1)
        ids_BSK = probs_BSH.topk(K, dim=-1).indices
        chosen_BSH = torch.zeros_like(probs_BSH).scatter(-1, ids_BSK, 1.0)
        scale_BSH = chosen_BSH * probs_BSH / probs_BSH.detach()  # 1 on chosen heads, with the gate's gradient
        q, k, v = self.w_qkv(x_BSD).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        chosen_BHS = chosen_BSH.transpose(1, 2).bool()
        pos = torch.arange(S, device=x_BSD.device)
        causal_SS = pos[None, :] <= pos[:, None]
        # key s is visible to query t in head h when both chose h; unchosen queries see themselves (output masked)
        allowed = causal_SS & chosen_BHS[:, :, None, :] & chosen_BHS[:, :, :, None]
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=x_BSD.device)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y_BHSd = y_BHSd * scale_BSH.transpose(1, 2)[..., None].to(y_BHSd.dtype)
        out_BSD = self.w_out(y_BHSd.transpose(1, 2).reshape(B, S, D))
        if ctx is not None:
            T = B * S
            routing = Routing(expert_ids_TK=ids_BSK.reshape(T, K), weights_TK=torch.ones(T, K, device=x_BSD.device),
                              scores_TE=probs_BSH.reshape(T, H), logits_TE=logits_BSH.reshape(T, H))
            if self.config.aux_loss_coef > 0:
                ctx.add_loss("smha_aux_loss", self.config.aux_loss_coef * load_balancing_loss(
                    routing.scores_TE, routing.expert_ids_TK), layer=self.name)
            record_stats(ctx, self.name, routing)
        return out_BSD


@register_attention("smha")
def build_smha(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int, layer_index: int,
               name: str) -> nn.Module:
    return SelectiveMultiHeadAttention(dim, num_heads, num_layers, parse_attention_options(SMHAConfig, options),
                                       name=name)
