"""SwitchHead: MoE attention over value and output projections (Csordás et al. 2024, arXiv 2312.07987,
github RobertCsordas/moe_attention, layers/transformer/full_moe_relative_attention.py).

Dim legend: B batch, S sequence, D model dim, H heads, E experts per head, K selected experts, Dh head dim,
R rotary frequencies.

Per head ``h`` (the paper's best variant, "V and O experts"; architectures.md §4)::

    q_i = x_i Wq_h,  k_j = x_j Wk_h                                          dense
    s^V_j = TopK_k(x_j Ws^V_h)   gate g^V_je = sigmoid(x_j Ws^V_h)_e for e in s^V_j, else 0    source side
    v_j   = sum_e g^V_je x_j Wv_{h,e}
    A_h   = softmax(q k^T / sqrt(Dh)), causal (rotary positions on q and k)
    s^O_i = TopK_k(x_i Ws^O_h), gate g^O_ie likewise                             destination side
    out_i = sum_h sum_e g^O_ie (A_h v)_i Wo_{h,e}

so only ``H`` attention matrices are computed, whatever ``E``. Gating is non-competitive (a sigmoid of the
selected logits; the gates do not sum to 1); top-k is taken on the raw logits. The selection weights' rows are
renormalised to one norm at init. Options: expert dropout (selection logits masked to ``-inf`` before top-k,
training only) and the entropy regulariser on the batch-mean selection distribution, off (0) in the main runs.

Choices (the spec leaves them open): rotary positions instead of the paper's XL-relative encoding (moekit's LM
uses RoPE everywhere), from the model's tables whatever the head width (:func:`.rope.apply_rope_any_width`:
partial rotary for wider heads); the entropy regulariser is ``coef * (log E - H(mean_t softmax(logits_t)))``
averaged over heads and over the V and O selections (0 at a uniform mean selection); the expert projections are computed
densely for every expert and then gated (the result is the sparse one; the FLOP saving is the paper's claim,
not this implementation's speed). No KV cache (its own head layout differs from the model's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...types import Routing, RoutingContext
from ..variants._common import record_stats
from .registry import parse_attention_options, register_attention
from .rope import apply_rope_any_width

__all__ = ["SwitchHead", "SwitchHeadConfig", "selection_entropy_loss", "sparse_sigmoid_gates"]

P = "attention_options"


@dataclass(frozen=True, kw_only=True, slots=True)
class SwitchHeadConfig:
    """Attributes:
        num_heads: attention heads H (paper: 2 or 4 where the dense baseline has 16); ``None``: the model's.
        head_dim: Dh; ``None``: ``dim // num_heads``. Must be even (rotary positions).
        num_experts: E value and output experts per head (paper: 4 at 262M, 5 at 47M).
        top_k: experts per token and head on each side (paper: 2 at 262M, 3 at 47M).
        gate: ``sigmoid`` (the paper) or ``ones`` (selected experts weigh 1: the identity check with E = k = 1).
        expert_dropout: probability of masking an expert's selection logit in training (0: off).
        entropy_coef: weight of the selection-entropy regulariser (0 in the paper's main runs).
    """

    num_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 4
    top_k: int = 2
    gate: Literal["sigmoid", "ones"] = "sigmoid"
    expert_dropout: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1),
                  f"{P}.{name}={value!r} must be a positive integer or left out (the model's)")
        check(isinstance(self.num_experts, int) and self.num_experts >= 1,
              f"{P}.num_experts={self.num_experts!r} must be a positive integer")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
              f"{P}.top_k={self.top_k!r} must be in 1..num_experts={self.num_experts}; lower top_k or raise "
              f"num_experts")
        check_choice(P, "gate", self.gate, ("sigmoid", "ones"))
        check(0.0 <= self.expert_dropout < 1.0, f"{P}.expert_dropout={self.expert_dropout} must be in [0, 1)")
        check(self.entropy_coef >= 0.0, f"{P}.entropy_coef={self.entropy_coef} must be >= 0 (0: off)")

    def resolve(self, dim: int, model_heads: int) -> tuple[int, int]:
        """``(num_heads, head_dim)`` for a model of width ``dim``, with the fix when sizes do not divide."""
        heads = self.num_heads or model_heads
        if self.head_dim is None:
            check(dim % heads == 0, f"{P}.num_heads={heads} does not divide model.dim={dim}; choose num_heads "
                                    f"among the divisors of {dim} or set {P}.head_dim")
        head_dim = self.head_dim or dim // heads
        check(head_dim % 2 == 0, f"{P}.head_dim={head_dim} must be even for rotary positions; change "
                                 f"{P}.head_dim or {P}.num_heads")
        return heads, head_dim


def sparse_sigmoid_gates(logits_BSHE: torch.Tensor, top_k: int, gate: str = "sigmoid",
                         dropout: float = 0.0, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-competitive top-k gates: ``(gates_BSHE, ids_BSHK)``; gates are 0 outside the top-k of the logits.

    With expert dropout, logits are masked to ``-inf`` before the top-k (training only); a token keeps at least
    its unmasked experts (masked experts selected only for lack of others get gate 0).
    """
    scores = logits_BSHE.float()
    if training and dropout > 0:
        scores = scores.masked_fill(torch.rand_like(scores) < dropout, float("-inf"))
    top_BSHK, ids_BSHK = scores.topk(top_k, dim=-1)
    values = torch.sigmoid(logits_BSHE.float()) if gate == "sigmoid" else torch.ones_like(scores)
    keep = torch.zeros_like(scores).scatter(-1, ids_BSHK, torch.isfinite(top_BSHK).to(scores.dtype))
    return values * keep, ids_BSHK


def selection_entropy_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """``log E - H(mean_t softmax(logits_t))``: 0 when the batch-mean selection is uniform (unweighted)."""
    mean_E = logits_TE.float().softmax(-1).mean(0)
    entropy = -(mean_E * mean_E.clamp_min(1e-30).log()).sum()
    return math.log(logits_TE.shape[-1]) - entropy


class SwitchHead(nn.Module):
    """SwitchHead attention: ``forward(x_BSD, cos_SR, sin_SR, cache=None, layer=0, ctx=None) -> [B, S, D]``."""

    supports_kv_cache = False

    def __init__(self, dim: int, model_heads: int, num_layers: int, config: SwitchHeadConfig | None = None,
                 name: str = "switchhead") -> None:
        super().__init__()
        self.config, self.name = config or SwitchHeadConfig(), name
        H, Dh = self.config.resolve(dim, model_heads)
        E = self.config.num_experts
        self.dim, self.num_heads, self.head_dim, self.num_experts = dim, H, Dh, E
        self.w_q = nn.Linear(dim, H * Dh, bias=False)
        self.w_k = nn.Linear(dim, H * Dh, bias=False)
        self.w_sel_v = nn.Linear(dim, H * E, bias=False)
        self.w_sel_o = nn.Linear(dim, H * E, bias=False)
        self.w_v_HEDDh = nn.Parameter(torch.randn(H, E, dim, Dh) * dim**-0.5)
        # GPT-2 scaling of the residual branch, as in the dense attention; k of E experts add up per head.
        out_std = (H * Dh * self.config.top_k) ** -0.5 / (2 * num_layers) ** 0.5
        self.w_o_HEDhD = nn.Parameter(torch.randn(H, E, Dh, dim) * out_std)
        for lin in (self.w_q, self.w_k):
            nn.init.normal_(lin.weight, std=dim**-0.5)
        with torch.no_grad():  # selection rows renormalised to one common norm (the code's renorm at init)
            for lin in (self.w_sel_v, self.w_sel_o):
                nn.init.normal_(lin.weight, std=dim**-0.5)
                lin.weight.mul_(lin.weight.norm(dim=1).mean() / lin.weight.norm(dim=1, keepdim=True))

    def active_params(self) -> int:
        """Dense Q, K and selections, plus ``top_k / E`` of the value and output experts."""
        experts = self.w_v_HEDDh.numel() + self.w_o_HEDhD.numel()
        dense = sum(p.numel() for p in self.parameters()) - experts
        return dense + experts * self.config.top_k // self.num_experts

    def select(self, x_BSD: torch.Tensor):
        """Selection logits and ``(gates_BSHE, ids_BSHK)`` of the value (source) and output (destination) sides."""
        B, S, _ = x_BSD.shape
        H, E, c = self.num_heads, self.num_experts, self.config
        logits_v_BSHE = self.w_sel_v(x_BSD).view(B, S, H, E)
        logits_o_BSHE = self.w_sel_o(x_BSD).view(B, S, H, E)
        gates_v, ids_v = sparse_sigmoid_gates(logits_v_BSHE, c.top_k, c.gate, c.expert_dropout, self.training)
        gates_o, ids_o = sparse_sigmoid_gates(logits_o_BSHE, c.top_k, c.gate, c.expert_dropout, self.training)
        return logits_v_BSHE, logits_o_BSHE, (gates_v.to(x_BSD.dtype), ids_v), (gates_o.to(x_BSD.dtype), ids_o)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, cache=None, layer: int = 0,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("SwitchHead attention has no KV cache; generate without one (moekit sample --no-cache)")
        B, S, _ = x_BSD.shape
        H, Dh = self.num_heads, self.head_dim
        q_BHSDh = apply_rope_any_width(self.w_q(x_BSD).view(B, S, H, Dh).transpose(1, 2), cos_SR, sin_SR)
        k_BHSDh = apply_rope_any_width(self.w_k(x_BSD).view(B, S, H, Dh).transpose(1, 2), cos_SR, sin_SR)
        logits_v_BSHE, logits_o_BSHE, (gates_v_BSHE, ids_v), (gates_o_BSHE, ids_o) = self.select(x_BSD)
        v_BHSDh = torch.einsum("bsd,hedk,bshe->bhsk", x_BSD, self.w_v_HEDDh, gates_v_BSHE)
        a_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        y_BSD = torch.einsum("bhsk,hekd,bshe->bsd", a_BHSDh, self.w_o_HEDhD, gates_o_BSHE)
        if ctx is not None:
            self._losses_and_stats(ctx, logits_v_BSHE, logits_o_BSHE, (gates_v_BSHE, ids_v), (gates_o_BSHE, ids_o))
        return y_BSD

    def _losses_and_stats(self, ctx: RoutingContext, logits_v_BSHE, logits_o_BSHE, v, o) -> None:
        H, E, c = self.num_heads, self.num_experts, self.config
        if c.entropy_coef > 0:
            per_head = [selection_entropy_loss(lg[:, :, h].reshape(-1, E))
                        for lg in (logits_v_BSHE, logits_o_BSHE) for h in range(H)]
            ctx.add_loss("switchhead_entropy_loss", c.entropy_coef * torch.stack(per_head).mean(), layer=self.name)
        if not ctx.collect_stats:
            return
        for side, logits_BSHE, (gates_BSHE, ids_BSHK) in (("v", logits_v_BSHE, v), ("o", logits_o_BSHE, o)):
            T = logits_BSHE.shape[0] * logits_BSHE.shape[1]
            # experts of head h are numbered h*E .. h*E+E-1, so the load table covers every head's experts
            offset_H1 = (torch.arange(H, device=ids_BSHK.device) * E)[:, None]
            ids_TN = (ids_BSHK + offset_H1).reshape(T, -1)
            weights_TN = gates_BSHE.gather(-1, ids_BSHK).reshape(T, -1)
            scores_TN = torch.sigmoid(logits_BSHE.detach().float()).reshape(T, H * E)
            routing = Routing(expert_ids_TK=ids_TN, weights_TK=weights_TN, scores_TE=scores_TN,
                              logits_TE=logits_BSHE.detach().reshape(T, H * E))
            record_stats(ctx, f"{self.name}.{side}", routing, attention_matrices=float(H),
                         gate_mean=weights_TN.detach().float().mean())


@register_attention("switchhead")
def build_switchhead(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int, layer_index: int,
                     name: str) -> nn.Module:
    return SwitchHead(dim, num_heads, num_layers, parse_attention_options(SwitchHeadConfig, options), name=name)
