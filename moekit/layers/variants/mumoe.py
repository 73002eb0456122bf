"""Multilinear Mixture of Experts (μMoE; Oldfield et al. 2024, "Multilinear Mixture of Experts: Scalable Expert
Specialization through Factorization", arXiv 2402.12550, github james-oldfield/muMoE).

Dim legend: T tokens, D model dim, F hidden dim, N experts, I / O a map's input / output dim, R CP rank,
r1, r2, r3 tensor-ring ranks.

A *soft* mixture of many linear experts whose weight tensor ``W`` (``[N, I+1, O]``, the bias folded in as an
extra input row) is never materialised::

    a   = entmax15(Norm(x W_g))                  W_g ``[D, N]`` zero-initialised -> uniform a at step 0
    y   = sum_n a_n W_n^T [x; 1]                 (the dense mixture the factorisations below compute)
    CP  W = sum_r u^N_r o u^I_r o u^O_r         y = U_O ((U_N^T a) * (U_I^T [x; 1]))          (paper eq. 2)
    TR  W[n,i,o] = tr(G_N[:,n,:] G_I[:,i,:] G_O[:,o,:])
        y_o = tr((sum_n a_n G_N[:,n,:]) (sum_i x_i G_I[:,i,:]) G_O[:,o,:])                    (paper eq. 4)

As a feed-forward (the paper's GPT-2 setting) two maps share one gate: ``y = mu2(act(mu1(x, a)), a)``,
``D -> F -> D``; with ``moe.activation="swiglu"`` a third map gives the gate branch. ``moe.top_k`` and
``moe.engine`` do not apply (every expert is mixed; there is no dispatch).

Choices, as in the released code unless stated:
- Gate normalisation ``layernorm`` (no affine; the GPT-2 runs) or ``batchnorm`` (no affine; the code's default,
  used for MLP-Mixer). Batch statistics mix tokens of the same sequence in training, so ``batchnorm`` is not
  causal: keep ``layernorm`` for language models. ``gate="softmax"`` replaces entmax (dense ``a``).
- Init: CP expert factor N(1, 1), input factor U(+-1/sqrt(I)), output factor U(+-1/sqrt(R)); TR expert core
  slices ``diag(N(1, 1))``, input core U(+-1/sqrt(I)), output core U(+-1/sqrt(r3 r1)).
- ``rank=None`` matches the parameters of a dense FFN of width F: CP ``R = D F / (N + D + F + 1)`` (GPT-2, 64
  experts: 604 = 0.79 D, the code uses 0.78 D); TR ``r1 = r2 = tr_rank`` (code: 4) and
  ``r3 = (D F - r1 r2 N) / (r1 (D + F + 1))`` (GPT-2: 153 = 0.2 D, as the code).
- The gate and the experts both see the block's normalised input (the code's GPT-2 blocks had no pre-norm and
  set ``apply_ln`` to normalise the experts' input only).
- Hierarchical μMoE (CP only; ``hierarchy_experts = N2 > 0``): a second expert mode with its own zero-initialised
  gate ``a2`` (same normalisation and entmax/softmax), ``W`` of shape ``[N, N2, I+1, O]`` and
  ``y = U_O ((U_N^T a) * (U_N2^T a2) * (U_I^T [x; 1]))``; the extra expert-mode factor starts at ones (the
  code's init), so at step 0 the layer equals the one-level μMoE. The tensor-ring hierarchy is not implemented.
There is no auxiliary loss in the paper; ``moe.router`` losses must be 0. Statistics: ``active_experts``
(mean number of experts with ``a_n > 0`` per token), counts of tokens using each expert as the layer's load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...configs import check, check_choice
from ...experts import hidden, is_gated
from ...routing.entmax import entmax15
from ...types import LayerStats, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import add_extra, flatten, make_shared_experts, parse_options, require_router

__all__ = ["MuMoEConfig", "MultilinearMoE", "CPMultilinear", "TRMultilinear", "matched_rank"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MuMoEConfig:
    """Attributes:
        factorization: ``cp`` (rank R) or ``tr`` (tensor ring, ranks r1 = r2 = ``tr_rank``, r3 = ``rank``).
        rank: CP rank R, or the TR rank r3; None matches a dense FFN's parameter count.
        tr_rank: r1 = r2 of the tensor ring (code: 4).
        gate: ``entmax15`` (sparse, paper) or ``softmax``.
        gate_norm: ``layernorm`` (GPT-2 runs, causal) or ``batchnorm`` (code default, mixes tokens).
        hierarchy_experts: N2 experts of a second, separately gated expert mode (0: one level; CP only).
    """

    factorization: Literal["cp", "tr"] = "cp"
    rank: int | None = None
    tr_rank: int = 4
    gate: Literal["entmax15", "softmax"] = "entmax15"
    gate_norm: Literal["layernorm", "batchnorm"] = "layernorm"
    hierarchy_experts: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.hierarchy_experts, int) and self.hierarchy_experts >= 0,
              f"variant.hierarchy_experts={self.hierarchy_experts!r} must be an integer >= 0 (0: one level)")
        check(self.hierarchy_experts == 0 or self.factorization == "cp",
              f"variant.hierarchy_experts={self.hierarchy_experts} needs variant.factorization='cp' (the "
              f"tensor-ring hierarchy is not implemented); set factorization='cp' or hierarchy_experts=0")
        check_choice("variant", "factorization", self.factorization, ("cp", "tr"))
        check_choice("variant", "gate", self.gate, ("entmax15", "softmax"))
        check_choice("variant", "gate_norm", self.gate_norm, ("layernorm", "batchnorm"))
        check(self.rank is None or self.rank >= 1, f"variant.rank={self.rank} must be positive or None (matched)")
        check(self.tr_rank >= 1, f"variant.tr_rank={self.tr_rank} must be positive (code: 4)")


def matched_rank(config: MuMoEConfig, dim: int, hidden_dim: int, num_experts: int) -> int:
    """The CP rank R (or TR rank r3) giving about the parameters of a dense ``dim x hidden_dim`` FFN."""
    if config.rank is not None:
        return config.rank
    D, F_, N = dim, hidden_dim, num_experts
    if config.factorization == "cp":
        return max(1, D * F_ // (N + D + F_ + 1))
    r = config.tr_rank
    return max(1, (D * F_ - r * r * N) // (r * (D + F_ + 1)))


def _with_bias_row(x_TI: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_TI, x_TI.new_ones(x_TI.shape[0], 1)], dim=-1)


class CPMultilinear(nn.Module):
    """CP-factorised soft mixture of ``N`` affine maps ``I -> O``: factors ``[N, R]``, ``[I+1, R]``, ``[O, R]``."""

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, rank: int, num_experts2: int = 0) -> None:
        super().__init__()
        self.u_expert = nn.Parameter(torch.randn(num_experts, rank) + 1.0)
        # hierarchical: a second expert-mode factor [N2, R], initialised to ones (the code's init)
        self.u_expert2 = nn.Parameter(torch.ones(num_experts2, rank)) if num_experts2 else None
        self.u_in = nn.Parameter(torch.empty(in_dim + 1, rank).uniform_(-in_dim**-0.5, in_dim**-0.5))
        self.u_out = nn.Parameter(torch.empty(out_dim, rank).uniform_(-rank**-0.5, rank**-0.5))

    def forward(self, x_TI: torch.Tensor, a_TN: torch.Tensor, a2_TM: torch.Tensor | None = None) -> torch.Tensor:
        mix_TR = a_TN @ self.u_expert
        if self.u_expert2 is not None:
            assert a2_TM is not None, "a hierarchical map needs the second gate's coefficients"
            mix_TR = mix_TR * (a2_TM @ self.u_expert2)
        return (mix_TR * (_with_bias_row(x_TI) @ self.u_in)) @ self.u_out.t()

    def materialize(self) -> torch.Tensor:
        """The full weight tensor ``W_NIO`` (``W_NMIO`` when hierarchical; ``I+1`` rows, the last one the bias)."""
        if self.u_expert2 is not None:
            return torch.einsum("nr,mr,ir,or->nmio", self.u_expert, self.u_expert2, self.u_in, self.u_out)
        return torch.einsum("nr,ir,or->nio", self.u_expert, self.u_in, self.u_out)


class TRMultilinear(nn.Module):
    """Tensor-ring soft mixture: cores ``G_N [r1, N, r2]``, ``G_I [r2, I+1, r3]``, ``G_O [r3, O, r1]``."""

    def __init__(self, num_experts: int, in_dim: int, out_dim: int, r1: int, r2: int, r3: int) -> None:
        super().__init__()
        diag = torch.eye(r1, r2)
        self.g_expert = nn.Parameter(torch.stack([diag * (torch.randn(r1, r2) + 1.0)
                                                  for _ in range(num_experts)], dim=1))
        self.g_in = nn.Parameter(torch.empty(r2, in_dim + 1, r3).uniform_(-in_dim**-0.5, in_dim**-0.5))
        bound = (r3 * r1) ** -0.5
        self.g_out = nn.Parameter(torch.empty(r3, out_dim, r1).uniform_(-bound, bound))

    def forward(self, x_TI: torch.Tensor, a_TN: torch.Tensor) -> torch.Tensor:
        expert_Tab = torch.einsum("tn,anb->tab", a_TN, self.g_expert)
        input_Tbc = torch.einsum("ti,bic->tbc", _with_bias_row(x_TI), self.g_in)
        return torch.einsum("tac,coa->to", torch.bmm(expert_Tab, input_Tbc), self.g_out)

    def materialize(self) -> torch.Tensor:
        return torch.einsum("anb,bic,coa->nio", self.g_expert, self.g_in, self.g_out)


class MultilinearMoE(nn.Module):
    """μMoE feed-forward: one entmax gate over ``N`` experts shared by factorised maps ``D -> F -> D``."""

    def __init__(self, moe: MoEConfig, config: MuMoEConfig | None = None, name: str = "mumoe") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or MuMoEConfig(), name
        c = self.config
        require_router(moe.router, "μMoE", "is a soft mixture trained without router losses", aux_loss_coef=0.0,
                       z_loss_coef=0.0)
        D, F_, N = moe.dim, moe.hidden_dim, moe.num_experts
        self.rank = matched_rank(c, D, F_, N)
        self.gate_weight = nn.Parameter(torch.zeros(D, N))
        self.gate_norm = (nn.LayerNorm(N, elementwise_affine=False) if c.gate_norm == "layernorm"
                          else nn.BatchNorm1d(N, affine=False))
        N2 = c.hierarchy_experts
        self.gate_weight2 = nn.Parameter(torch.zeros(D, N2)) if N2 else None
        self.gate_norm2 = ((nn.LayerNorm(N2, elementwise_affine=False) if c.gate_norm == "layernorm"
                            else nn.BatchNorm1d(N2, affine=False)) if N2 else None)

        def make(i: int, o: int) -> nn.Module:
            if c.factorization == "cp":
                return CPMultilinear(N, i, o, self.rank, N2)
            return TRMultilinear(N, i, o, c.tr_rank, c.tr_rank, self.rank)

        self.up = make(D, F_)
        self.gate_proj = make(D, F_) if is_gated(moe.activation) else None
        self.down = make(F_, D)
        self.shared_experts = make_shared_experts(moe)

    def expert_coefficients(self, x_TD: torch.Tensor, level: int = 1) -> torch.Tensor:
        """``a_TN``: the gate's mixture weights (rows on the simplex; exactly sparse with entmax); ``level=2``: the
        hierarchical second gate's ``a2_TM``."""
        weight, norm = (self.gate_weight, self.gate_norm) if level == 1 else (self.gate_weight2, self.gate_norm2)
        assert weight is not None and norm is not None
        z_TN = norm(x_TD.float() @ weight.float())
        return entmax15(z_TN) if self.config.gate == "entmax15" else z_TN.softmax(-1)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        a_TN = self.expert_coefficients(x_TD).to(x_TD.dtype)
        a2 = self.expert_coefficients(x_TD, 2).to(x_TD.dtype) if self.gate_weight2 is not None else None
        extra = () if a2 is None else (a2,)
        h_gate = self.gate_proj(x_TD, a_TN, *extra) if self.gate_proj is not None else None
        y_TD = self.down(hidden(self.moe_config.activation, h_gate, self.up(x_TD, a_TN, *extra)), a_TN, *extra)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if ctx is not None and ctx.collect_stats:
            self._record(ctx, a_TN.detach())
        return y_TD.view(x.shape)

    def _record(self, ctx: RoutingContext, a_TN: torch.Tensor) -> None:
        T, N = a_TN.shape
        active_TN = a_TN > 0
        entropy = -(a_TN * a_TN.clamp_min(1e-30).log()).sum(-1).mean()
        ctx.add_stats(self.name, LayerStats(counts_E=active_TN.sum(0), num_slots=T * N,
                                            num_dropped=torch.zeros((), dtype=torch.long),
                                            token_entropy=entropy / math.log(N) if N > 1 else entropy))
        add_extra(ctx, self.name, active_experts=active_TN.sum(-1).float().mean())

    def extra_repr(self) -> str:
        c = self.config
        return (f"factorization={c.factorization}, rank={self.rank}, tr_rank={c.tr_rank}, gate={c.gate}, "
                f"gate_norm={c.gate_norm}")


@register_ffn("mumoe")
def build_mumoe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return MultilinearMoE(moe, parse_options(MuMoEConfig, options), name=name)
