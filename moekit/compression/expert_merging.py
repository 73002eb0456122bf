"""Expert Merging and Expert Merging++ (ICLR 2026; spec §3), applied to merging groups of MoE experts.

Dim legend: K experts in a group, C chunks of a tensor, T tokens, D model dim.

For a merged tensor with base ``θ_base`` and task vectors ``τ_k = θ_k − θ_base``:
``θ = θ_base + Σ_k σ(λ_k) ⊙_chunk τ_k``, where a tensor with C coefficients is flattened and split into C
contiguous chunks (``torch.chunk`` semantics) and chunk ``c`` is scaled by ``σ(λ_{k,c})``. λ is stored in logit
space and starts at ``logit(0.1)`` (task arithmetic with 0.1). Only λ is trained, on unlabeled calibration
tokens, with ``L = Σ_k α_k · MSE(merged(x), E_k(x))`` over each member's own routed tokens (the hidden-state term;
the logit KD term is a model-level loss that a layer-wise compression has no use for) plus
``γ · Σ|σ(λ) − 0.1| / (#coefficients per expert)``.

Expert Merging++ allocates chunks by importance ``I_ℓ = Norm(Σ_k |a_{ℓ,k}| s_{ℓ,k} n_ℓ)`` (``a`` the learned
coefficient, ``s`` the mean |τ|, ``n`` the parameter count, Norm an ℓ1 normalisation over units):
``m_ℓ = floor(B · I_ℓ^κ / Σ_j I_j^κ)``; a unit with ``m_ℓ = 0`` keeps one fixed, untrained coefficient (its
first-run value).

Choices for MoE compression *(ours; the paper merges fine-tuned models of one base)*: groups come from M-SMoE's
frequency-guided grouping; each group's base is its most-used (dominant) expert, the other members aligned to it
by neuron permutation; ``α_k`` are the members' routing frequencies; a "unit" (the paper's layer) is one weight
matrix of one merged group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.activations import hidden

__all__ = ["INIT", "MergeCoefficients", "allocate_chunks", "fit_merge", "merge_tensor", "unit_importance"]

INIT = 0.1


def merge_tensor(base: torch.Tensor, taus: list[torch.Tensor], coef_KC: torch.Tensor) -> torch.Tensor:
    """``base + Σ_k coef_k ⊙_chunk τ_k`` (``coef_KC`` already through the sigmoid)."""
    flat = base.reshape(-1)
    out = flat
    for k, tau in enumerate(taus):
        chunks = torch.chunk(tau.reshape(-1), coef_KC.shape[1])
        scaled = torch.cat([c * coef_KC[k, i] for i, c in enumerate(chunks)])
        out = out + scaled
    return out.view_as(base)


class MergeCoefficients(nn.Module):
    """λ for every merged tensor: ``{name: [K, C]}`` trainable, or a fixed buffer where ``C = 0`` was allocated."""

    def __init__(self, names: list[str], num_experts: int, chunks: dict[str, int],
                 fixed: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.lam = nn.ParameterDict()
        self.frozen: dict[str, torch.Tensor] = {}
        for n in names:
            c = chunks.get(n, 1)
            if c <= 0:
                value = (fixed or {}).get(n, torch.full((num_experts, 1), INIT))
                self.frozen[n] = value.detach().clone()
            else:
                self.lam[n] = nn.Parameter(torch.full((num_experts, c), math.log(INIT / (1 - INIT))))

    def coef(self, name: str) -> torch.Tensor:
        return torch.sigmoid(self.lam[name]) if name in self.lam else self.frozen[name]

    def count_per_expert(self) -> int:
        return sum(p.shape[1] for p in self.lam.values())


def _run(w: dict[str, torch.Tensor], x_TD: torch.Tensor, activation: str) -> torch.Tensor:
    h_up = F.linear(x_TD, w["w_up"], w.get("b_up"))
    h_gate = F.linear(x_TD, w["w_gate"], w.get("b_gate")) if "w_gate" in w else None
    return F.linear(hidden(activation, h_gate, h_up), w["w_down"], w.get("b_down"))


def fit_merge(base: dict[str, torch.Tensor], members: list[dict[str, torch.Tensor]], inputs: list[torch.Tensor],
              alphas: list[float], activation: str, *, chunks: dict[str, int] | None = None,
              fixed: dict[str, torch.Tensor] | None = None, steps: int = 40, lr: float = 0.05,
              gamma: float = 0.1) -> tuple[dict[str, torch.Tensor], MergeCoefficients]:
    """Learn the merge coefficients of ``members`` (task vectors against ``base``); return merged weights."""
    names = list(base)
    taus = {n: [m[n] - base[n] for m in members] for n in names}
    coefs = MergeCoefficients(names, len(members), chunks or {}, fixed)
    targets = [_run(m, x, activation).detach() for m, x in zip(members, inputs)]
    scales = [t.square().mean().clamp_min(1e-12) for t in targets]
    params = list(coefs.parameters())
    if params and any(x.shape[0] for x in inputs):
        opt = torch.optim.Adam(params, lr=lr)
        per_expert = max(coefs.count_per_expert(), 1)
        for _ in range(steps):
            merged = {n: merge_tensor(base[n], taus[n], coefs.coef(n)) for n in names}
            loss: torch.Tensor = sum(a * F.mse_loss(_run(merged, x, activation), t) / s
                       for a, x, t, s in zip(alphas, inputs, targets, scales) if x.shape[0])  # type: ignore[assignment]
            reg = sum((torch.sigmoid(p) - INIT).abs().sum() for p in params) / per_expert
            total = loss + gamma * reg
            opt.zero_grad()
            total.backward()
            opt.step()
    with torch.no_grad():
        merged = {n: merge_tensor(base[n], taus[n], coefs.coef(n)).detach() for n in names}
    return merged, coefs


def unit_importance(coefs: Mapping[Any, torch.Tensor], taus: Mapping[Any, list[torch.Tensor]]) -> dict[Any, float]:
    """``I_ℓ = Norm(Σ_k |a_{ℓ,k}| · mean|τ_{ℓ,k}| · n_ℓ)`` over units ℓ (chunk coefficients averaged per expert)."""
    raw = {}
    for n, a_KC in coefs.items():
        raw[n] = sum(float(a_KC[k].abs().mean()) * float(t.abs().mean()) * t.numel() for k, t in enumerate(taus[n]))
    total = sum(raw.values())
    return {n: (v / total if total > 0 else 1 / len(raw)) for n, v in raw.items()}


def allocate_chunks(importance: Mapping[Any, float], budget: float, kappa: float = 1.0) -> dict[Any, int]:
    """``m_ℓ = floor(B · I_ℓ^κ / Σ_j I_j^κ)``."""
    powered = {n: (v ** kappa if v > 0 else (1.0 if kappa == 0 else 0.0)) for n, v in importance.items()}
    total = sum(powered.values())
    return {n: math.floor(budget * p / total) if total > 0 else 0 for n, p in powered.items()}
