"""Routed LoRA experts on one linear map: LoRA-Mixer (spec §16) and DynMoLE (spec §17).

Dim legend: T tokens, I input features, O output features, E experts, K slots per token, R rank.

Both compute ``y = W x + sum_e w_e(x) (alpha/r) B_e A_e x`` with a per-layer router (moekit's
:class:`~moekit.Router`, float32) on the token state; they differ in how ``w`` is chosen and trained.

**LoRA-Mixer** (Li et al. 2025, arXiv 2507.00029; spec [abs], parts reconstructed). Hard-soft routing: the forward
uses the top-k renormalised weights, the backward flows through the full softmax (straight-through,
``w = hard + soft - soft.detach()``), so non-selected experts' logits get gradient; ``hard_soft=False`` uses the
plain top-k weights. ``inference_top_k`` switches to another k in eval mode (one summary reports top-3 at
inference). Routing Specialisation Loss ``L_RSL = balance_coef * sum_i p̄_i f̄_i + s * entropy_coef * E_x[H(p)]``
with ``s = +1`` (``entropy_sign='intent'``: minimising makes routing peaked, as the text intends) or ``-1``
(``'paper'``: the printed sign). ``train_router_only`` is regime (ii): frozen experts, only the router trains.
``L_preserve = preserve_coef * sum_{i in C} (||A_i - A_i^(0)||^2 + ||B_i - B_i^(0)||^2)`` keeps the experts of
``C = preserve_experts`` (None: all) near anchors ``A^(0), B^(0)``: persistent buffers (so saved in the adapter file
and kept across a resume), taken at construction and again by :meth:`LoRAMixer.set_anchor` (call it after loading
pre-trained experts). Choice: θ_i is expert i's (A_i, B_i) pair; the paper's "adaptive" weighting is not known.

**DynMoLE** (code mikecovlee/DynMoLE @9354b27): ``p = softmax(W_r x)``; keep the sorted prefix whose cumulative
probability is <= ``top_p`` and at least ``keep_top_k`` experts; if the normalised Tsallis entropy
``S_q(p) = (1 - sum (p+eps)^q) / (1 - E^(1-q))`` exceeds ``threshold``, keep all experts. ``w = p * mask``, not
renormalised. Loss ``dyn_loss_coef * mean S_q + aux_loss_coef * E * sum_i f_i P_i`` with ``f_i`` the mean masked
weight. Router initialised Kaiming-uniform (a = sqrt(5)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..configs import check, check_choice
from ..routing import Router, RouterConfig
from ..routing.selectors import select_topk
from ..types import Routing, RoutingContext
from .core import LinearAdapter
from .experts import LoRAExperts, dense_weights, record_routing
from .lora import kaiming_rows

__all__ = ["DynMoLE", "DynMoLEConfig", "LoRAMixer", "LoRAMixerConfig", "rsl_balance", "tsallis_entropy"]


def _check_common(method: str, num_experts: int, top_k: int, rank: int, alpha: float, dropout: float) -> None:
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("rank", rank)):
        check(isinstance(value, int) and value >= 1, f"{method}.{name}={value!r} must be a positive integer")
    check(top_k <= num_experts, f"{method}.top_k={top_k} exceeds num_experts={num_experts}; lower top_k")
    check(alpha > 0, f"{method}.alpha={alpha} must be positive")
    check(0 <= dropout < 1, f"{method}.dropout={dropout} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoRAMixerConfig:
    """Attributes: num_experts, top_k, rank, alpha, dropout; hard_soft (straight-through top-k);
    inference_top_k (eval-mode k, None = top_k); balance_coef (alpha of L_RSL); entropy_coef (lambda);
    entropy_sign ('intent' | 'paper'); train_router_only (regime ii); preserve_coef (beta of L_preserve, 0 = off);
    preserve_experts (the set C, None = every expert)."""

    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    hard_soft: bool = True
    inference_top_k: int | None = None
    balance_coef: float = 0.01
    entropy_coef: float = 0.0
    entropy_sign: Literal["intent", "paper"] = "intent"
    train_router_only: bool = False
    preserve_coef: float = 0.0
    preserve_experts: list[int] | None = None

    def __post_init__(self) -> None:
        _check_common("lora_mixer", self.num_experts, self.top_k, self.rank, self.alpha, self.dropout)
        check(self.preserve_coef >= 0, f"lora_mixer.preserve_coef={self.preserve_coef} must be >= 0 (beta of "
              f"L_preserve; 0 disables it)")
        check(self.preserve_experts is None or (len(self.preserve_experts) > 0 and all(
              isinstance(i, int) and 0 <= i < self.num_experts for i in self.preserve_experts)),
              f"lora_mixer.preserve_experts={self.preserve_experts!r} must be None (all experts) or a non-empty "
              f"list of expert indices in [0, {self.num_experts})")
        check(self.inference_top_k is None or 1 <= self.inference_top_k <= self.num_experts,
              f"lora_mixer.inference_top_k={self.inference_top_k} must be in [1, num_experts={self.num_experts}]")
        check_choice("lora_mixer", "entropy_sign", self.entropy_sign, ("intent", "paper"))
        check(self.balance_coef >= 0 and self.entropy_coef >= 0, "lora_mixer coefficients must be >= 0")


def rsl_balance(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """``sum_i p̄_i f̄_i``: mean soft probability times the normalised top-k assignment share (1/E if uniform)."""
    E = probs_TE.shape[-1]
    counts_E = torch.bincount(ids_TK.reshape(-1) + 1, minlength=E + 1)[1:].to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return (probs_TE.mean(0) * f_E).sum()


class LoRAMixer(LinearAdapter):
    """Routed LoRA experts serially inside a projection (LoRA-Mixer)."""

    anchor_A: torch.Tensor  # [E, R, I], buffers present when preserve_coef > 0
    anchor_B: torch.Tensor  # [E, O, R]
    preserve_mask: torch.Tensor  # [E] bool, the set C

    def __init__(self, in_features: int, out_features: int, config: LoRAMixerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.router = Router(in_features, c.num_experts, c.top_k, RouterConfig(aux_loss_coef=0.0))
        self.experts = LoRAExperts(c.num_experts, in_features, out_features, c.rank, c.alpha / c.rank)
        if c.train_router_only:
            self.experts.requires_grad_(False)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        if c.preserve_coef > 0:
            self.register_buffer("anchor_A", self.experts.lora_A.detach().clone())
            self.register_buffer("anchor_B", self.experts.lora_B.detach().clone())
            keep_E = torch.zeros(c.num_experts, dtype=torch.bool)
            keep_E[list(range(c.num_experts)) if c.preserve_experts is None else c.preserve_experts] = True
            self.register_buffer("preserve_mask", keep_E, persistent=False)

    def set_anchor(self) -> None:
        """Take the experts' current (A, B) as the anchors of ``L_preserve`` (e.g. after loading pre-trained ones)."""
        if self.config.preserve_coef > 0:
            with torch.no_grad():
                self.anchor_A.copy_(self.experts.lora_A)
                self.anchor_B.copy_(self.experts.lora_B)

    def preserve_loss(self) -> torch.Tensor:
        """``sum_{i in C} ||A_i - A_i^(0)||^2 + ||B_i - B_i^(0)||^2`` (unscaled; 0 at the anchors)."""
        dA_E = (self.experts.lora_A - self.anchor_A).square().flatten(1).sum(1)
        dB_E = (self.experts.lora_B - self.anchor_B).square().flatten(1).sum(1)
        return ((dA_E + dB_E) * self.preserve_mask).sum()

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "lora_mixer") -> torch.Tensor:
        c = self.config
        if ctx is not None and c.preserve_coef > 0:
            ctx.add_loss("preserve_loss", c.preserve_coef * self.preserve_loss(), layer)
        logits_TE = self.router.logits(x_TI)
        probs_TE = logits_TE.softmax(-1)
        k = c.inference_top_k if (not self.training and c.inference_top_k is not None) else c.top_k
        ids_TK, hard_TK = select_topk(probs_TE, k)
        w_TE = dense_weights(ids_TK, hard_TK, c.num_experts)
        if c.hard_soft and self.training:
            w_TE = w_TE.detach() + probs_TE - probs_TE.detach()
        if ctx is not None:
            if c.balance_coef > 0:
                ctx.add_loss("rsl_balance_loss", c.balance_coef * rsl_balance(probs_TE, ids_TK), layer)
            if c.entropy_coef > 0:
                sign = 1.0 if c.entropy_sign == "intent" else -1.0
                entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()
                ctx.add_loss("rsl_entropy_loss", sign * c.entropy_coef * entropy, layer)
        record_routing(ctx, layer, Routing(expert_ids_TK=ids_TK, weights_TK=hard_TK, scores_TE=probs_TE,
                                           logits_TE=logits_TE))
        return self.experts(self.dropout(x_TI), w_TE)


@dataclass(frozen=True, kw_only=True, slots=True)
class DynMoLEConfig:
    """Attributes (DynMoLE code defaults): num_experts 8, rank, alpha, dropout; threshold 0.9 (Tsallis entropy above
    which every expert is used); q 1.1; keep_top_k 2; top_p 0.75; aux_loss_coef 0.001; dyn_loss_coef 0.01;
    eps 1e-5 (added to p inside the entropy)."""

    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    threshold: float = 0.9
    q: float = 1.1
    keep_top_k: int = 2
    top_p: float = 0.75
    aux_loss_coef: float = 0.001
    dyn_loss_coef: float = 0.01
    eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_common("dynmole", self.num_experts, self.keep_top_k, self.rank, self.alpha, self.dropout)
        check(self.q > 0 and self.q != 1, f"dynmole.q={self.q} must be positive and not 1 (1.1 in DynMoLE)")
        check(0 < self.top_p <= 1, f"dynmole.top_p={self.top_p} must be in (0, 1]")
        check(0 <= self.threshold <= 1, f"dynmole.threshold={self.threshold} must be in [0, 1]")
        check(self.aux_loss_coef >= 0 and self.dyn_loss_coef >= 0 and self.eps >= 0,
              "dynmole coefficients and eps must be >= 0")


def tsallis_entropy(probs_TE: torch.Tensor, q: float, eps: float = 0.0) -> torch.Tensor:
    """Normalised Tsallis entropy per token, in [0, 1]: ``(1 - sum (p+eps)^q) / (1 - E^(1-q))``."""
    E = probs_TE.shape[-1]
    s_T = (1 - (probs_TE + eps).pow(q).sum(-1)) / (q - 1)
    return s_T / ((1 - E ** (1 - q)) / (q - 1))


class DynMoLE(LinearAdapter):
    """Routed LoRA experts with Tsallis-entropy hybrid routing (DynMoLE)."""

    def __init__(self, in_features: int, out_features: int, config: DynMoLEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.router = Router(in_features, c.num_experts, 1, RouterConfig(aux_loss_coef=0.0))
        with torch.no_grad():
            self.router.weight.copy_(kaiming_rows(c.num_experts, in_features))
        self.experts = LoRAExperts(c.num_experts, in_features, out_features, c.rank, c.alpha / c.rank)
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()

    def weights(self, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_TE = p * mask, normalised Tsallis entropy S_T)``."""
        c = self.config
        sorted_TE, order_TE = probs_TE.detach().sort(-1, descending=True)
        keep_sorted = sorted_TE.cumsum(-1) <= c.top_p
        keep_sorted[:, :c.keep_top_k] = True
        mask_TE = torch.zeros_like(keep_sorted).scatter(1, order_TE, keep_sorted)
        entropy_T = tsallis_entropy(probs_TE, c.q, c.eps)
        mask_TE = mask_TE | (entropy_T.detach() > c.threshold)[:, None]
        return probs_TE * mask_TE, entropy_T

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "dynmole") -> torch.Tensor:
        c = self.config
        logits_TE = self.router.logits(x_TI)
        probs_TE = logits_TE.softmax(-1)
        w_TE, entropy_T = self.weights(probs_TE)
        if ctx is not None:
            if c.dyn_loss_coef > 0:
                ctx.add_loss("dynmole_entropy_loss", c.dyn_loss_coef * entropy_T.mean(), layer)
            if c.aux_loss_coef > 0:
                f_E, P_E = w_TE.mean(0), probs_TE.mean(0)
                ctx.add_loss("aux_loss", c.aux_loss_coef * c.num_experts * (f_E * P_E).sum(), layer)
        if ctx is not None and ctx.collect_stats:
            on_TE = w_TE.detach() > 0
            ids_TE = torch.where(on_TE, torch.arange(c.num_experts, device=x_TI.device), -1)
            record_routing(ctx, layer, Routing(expert_ids_TK=ids_TE, weights_TK=w_TE.detach(), scores_TE=probs_TE,
                                               logits_TE=logits_TE),
                           experts_per_token=on_TE.sum(-1).float().mean())
        return self.experts(self.dropout(x_TI), w_TE)
