"""MoM: Mixture-of-Memories (Du et al. 2025, arXiv 2502.13685, github OpenSparseLLMs/MoM, mom/layers/mom.py).

Dim legend: B batch, S sequence, D model dim, H heads, Dh head dim, M routed memories, N = M (+1 shared)
memory states, K memories per token.

A linear-attention layer with several recurrent memory states (architectures.md §10). A router sends each
token to its top-k memories; a memory is updated only by the tokens routed to it (it sees its own
subsequence); one shared memory, when on, is updated by every token::

    p_t = softmax(W_g x_t) over M;  S_t = TopK(p_t, k);  w_t = p_t[S_t] renormalised
    q_t = L2(silu(W_q x_t))                                        shared query
    for memory i (routed to t, or the shared one):
        k = L2(silu(W_k^i x_t)),  v = W_v^i x_t,  beta = sigmoid(W_b^i x_t),  g = exp(-softplus(W_a^i x_t + b_a))
        M_i <- g M_i + beta k (v - (g M_i)^T k)^T                   gated delta rule (per head, M_i: [Dh, Dh])
    o_t = sum_{i in S_t} w_ti M_i^T q_t  +  M_shared^T q_t
    y_t = W_o (RMSNorm_head(o_t) * silu(W_z x_t))                  gated RMSNorm output

Loss: the Switch balance loss over memories, ``aux_loss_coef`` (0.01 in the code), recorded per layer as
``mom_aux_loss``.

Choices (the spec leaves them open or they are left out): no short convolution on q/k/v; the decay is the
Gated-DeltaNet form with a scalar per head and token, its bias set so that ``g`` starts near 0.98; the
recurrence is a plain scan over positions (readable and exact, not a chunked kernel). No positions enter (the
recurrence orders tokens), and there is no KV cache: generation runs without one.
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

__all__ = ["MixtureOfMemories", "MoMConfig", "gated_delta_scan"]

P = "attention_options"


@dataclass(frozen=True, kw_only=True, slots=True)
class MoMConfig:
    """Attributes:
        num_memories: routed memories M (code: 4).
        top_k: memories per token (code: 2).
        shared_memory: one extra memory updated by every token (code: on).
        num_heads: heads; ``None``: the model's. ``head_dim`` = ``dim / num_heads``.
        aux_loss_coef: weight of the Switch balance loss over memories (code ``aux_loss_scale`` = 0.01).
    """

    num_memories: int = 4
    top_k: int = 2
    shared_memory: bool = True
    num_heads: int | None = None
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        check(isinstance(self.num_memories, int) and self.num_memories >= 1,
              f"{P}.num_memories={self.num_memories!r} must be a positive integer")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_memories,
              f"{P}.top_k={self.top_k!r} must be in 1..num_memories={self.num_memories}; lower top_k or raise "
              f"num_memories")
        check(self.num_heads is None or (isinstance(self.num_heads, int) and self.num_heads >= 1),
              f"{P}.num_heads={self.num_heads!r} must be a positive integer or left out (the model's)")
        check(self.aux_loss_coef >= 0, f"{P}.aux_loss_coef={self.aux_loss_coef} must be >= 0 (0: off)")


def gated_delta_scan(q_BSHd: torch.Tensor, k_BSNHd: torch.Tensor, v_BSNHd: torch.Tensor, beta_BSNH: torch.Tensor,
                     g_BSNH: torch.Tensor, active_BSN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``N`` gated-delta-rule memories over the positions; a memory changes only where it is active.

    Returns the read-outs ``o_BSNHd`` (memory ``n`` after absorbing token ``t``, read with ``q_t``) and the final
    states ``[B, N, H, Dh, Dh]``. Inactive tokens leave a memory unchanged exactly (``g = 1``, ``beta = 0``).
    """
    B, S, N, H, Dh = k_BSNHd.shape
    active = active_BSN[..., None].to(k_BSNHd.dtype)  # [B, S, N, 1]
    g_eff = 1 + active * (g_BSNH - 1)
    beta_eff = active * beta_BSNH
    state = k_BSNHd.new_zeros(B, N, H, Dh, Dh)
    outs = []
    for t in range(S):
        k_t, v_t, q_t = k_BSNHd[:, t], v_BSNHd[:, t], q_BSHd[:, t]
        decayed = g_eff[:, t, ..., None, None] * state
        old_v = torch.einsum("bnhkv,bnhk->bnhv", decayed, k_t)
        state = decayed + torch.einsum("bnhk,bnhv->bnhkv", k_t, beta_eff[:, t, ..., None] * (v_t - old_v))
        outs.append(torch.einsum("bnhkv,bhk->bnhv", state, q_t))
    return torch.stack(outs, dim=1), state


class MixtureOfMemories(nn.Module):
    """MoM linear attention: ``forward(x_BSD, cos_SR, sin_SR, cache=None, layer=0, ctx=None) -> [B, S, D]``."""

    supports_kv_cache = False

    def __init__(self, dim: int, model_heads: int, num_layers: int, config: MoMConfig | None = None,
                 name: str = "mom") -> None:
        super().__init__()
        self.config, self.name = config or MoMConfig(), name
        H = self.config.num_heads or model_heads
        check(dim % H == 0, f"{P}.num_heads={H} does not divide model.dim={dim}; choose num_heads among the "
                            f"divisors of {dim}")
        M = self.config.num_memories
        N = M + int(self.config.shared_memory)
        self.dim, self.num_heads, self.head_dim, self.num_states = dim, H, dim // H, N
        self.w_router = nn.Linear(dim, M, bias=False)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k_NDD = nn.Parameter(torch.randn(N, dim, dim) * dim**-0.5)  # per memory, [in, H * Dh]
        self.w_v_NDD = nn.Parameter(torch.randn(N, dim, dim) * dim**-0.5)
        self.w_beta_NDH = nn.Parameter(torch.randn(N, dim, H) * dim**-0.5)
        self.w_decay_NDH = nn.Parameter(torch.randn(N, dim, H) * dim**-0.5)
        self.decay_bias_NH = nn.Parameter(torch.full((N, H), -4.0))  # softplus(-4) ~ 0.018: g ~ 0.98
        self.w_z = nn.Linear(dim, dim, bias=False)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.w_out = nn.Linear(dim, dim, bias=False)
        for lin in (self.w_router, self.w_q, self.w_z):
            nn.init.normal_(lin.weight, std=dim**-0.5)
        nn.init.normal_(self.w_out.weight, std=dim**-0.5 / (2 * num_layers) ** 0.5)

    def route(self, x_BSD: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """Top-k memories per token and the ``[B, S, N]`` combine weights (the shared memory's is 1)."""
        B, S, _ = x_BSD.shape
        M, k = self.config.num_memories, self.config.top_k
        logits_TM = self.w_router(x_BSD).reshape(B * S, M).float()
        probs_TM = logits_TM.softmax(-1)
        top_TK, ids_TK = probs_TM.topk(k, dim=-1)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True)
        combine_TN = torch.zeros(B * S, self.num_states, device=x_BSD.device).scatter(1, ids_TK, weights_TK)
        if self.config.shared_memory:
            combine_TN[:, M] = 1.0
        routing = Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TM, logits_TE=logits_TM)
        return routing, combine_TN.view(B, S, self.num_states)

    def memories(self, x_BSD: torch.Tensor, active_BSN: torch.Tensor):
        """Read-outs ``[B, S, N, H, Dh]`` and final states of every memory for the given activity mask."""
        B, S, _ = x_BSD.shape
        H, Dh, N = self.num_heads, self.head_dim, self.num_states
        q_BSHd = F.normalize(F.silu(self.w_q(x_BSD)).view(B, S, H, Dh), dim=-1)
        k_BSNHd = F.normalize(F.silu(torch.einsum("bsd,nde->bsne", x_BSD, self.w_k_NDD)).view(B, S, N, H, Dh),
                              dim=-1)
        v_BSNHd = torch.einsum("bsd,nde->bsne", x_BSD, self.w_v_NDD).view(B, S, N, H, Dh)
        beta_BSNH = torch.sigmoid(torch.einsum("bsd,ndh->bsnh", x_BSD, self.w_beta_NDH))
        g_BSNH = torch.exp(-F.softplus(torch.einsum("bsd,ndh->bsnh", x_BSD, self.w_decay_NDH) + self.decay_bias_NH))
        return gated_delta_scan(q_BSHd, k_BSNHd, v_BSNHd, beta_BSNH, g_BSNH, active_BSN)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor | None = None, sin_SR: torch.Tensor | None = None,
                cache=None, layer: int = 0, ctx: RoutingContext | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("MoM attention has no KV cache; generate without one (moekit sample --no-cache)")
        B, S, D = x_BSD.shape
        routing, combine_BSN = self.route(x_BSD)
        out_BSNHd, _ = self.memories(x_BSD, combine_BSN > 0)
        o_BSHd = torch.einsum("bsnhd,bsn->bshd", out_BSNHd, combine_BSN.to(out_BSNHd.dtype))
        z_BSD = F.silu(self.w_z(x_BSD))
        y_BSD = self.w_out(self.norm(o_BSHd).reshape(B, S, D) * z_BSD)
        if ctx is not None:
            c = self.config
            if c.aux_loss_coef > 0 and c.num_memories > 1:
                ctx.add_loss("mom_aux_loss", c.aux_loss_coef * load_balancing_loss(
                    routing.scores_TE, routing.expert_ids_TK), layer=self.name)
            record_stats(ctx, self.name, routing)
        return y_BSD


@register_attention("mom")
def build_mom(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int, layer_index: int,
              name: str) -> nn.Module:
    return MixtureOfMemories(dim, num_heads, num_layers, parse_attention_options(MoMConfig, options), name=name)
