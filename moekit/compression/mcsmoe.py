"""MC-SMoE's second stage (spec §1): each merged expert's linear maps become low-rank plus row-sparse,
``y = L (R x) + (S ⊙ m) x``, fine-tuned by distillation while PLATON-style importance prunes whole rows of S.

Dim legend: O output rows, I input columns, r rank, T tokens, D model dim, F expert hidden dim.

- Initialisation (:func:`~.merge.lowrank_sparse_init`): ``L = U_r √Σ_r``, ``R = √Σ_r V_rᵀ``, ``S = W − L R``.
- Importance of S (PLATON): ``I = |S ⊙ ∇S|``, smoothed by an EMA with β1 = 0.85; a row's score is the mean of
  its entries' smoothed importance, and the rows with the highest scores are kept.
- Kept fraction of rows: a cubic schedule from 1 to ``final_threshold`` (README: 0.10),
  ``r(t) = r_f + (1 − r_f)(1 − (t − t_i)/(T − t_i − t_f))³`` for ``t_i <= t < T − t_f`` (1 before, ``r_f`` after),
  where ``t_i`` and ``t_f`` are the initial and final warm-up steps.
- L, R and the kept entries of S are trained (AdamW).

Choices *(ours)*: the spec's KD is a model-level loss (``CE + 0.2 KD(T=2)`` on task data); this compression works
one merged expert at a time, so the distillation target is the merged expert's own float output on the tokens
routed to its group (hidden-state MSE, normalised by the target's mean square). A removed row is masked, not
deleted, so a module's shapes stay fixed; :meth:`LowRankSparseLinear.stored_params` counts what a row-sparse
store would hold (L, R and the kept rows of S).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.activations import hidden
from .merge import lowrank_sparse_init

__all__ = ["LowRankSparseLinear", "compress_expert", "kept_fraction"]


class LowRankSparseLinear(nn.Module):
    """``y = L (R x) + (S ⊙ mask_O) x`` for a weight ``W [O, I]`` (no bias; biases stay with the expert)."""

    mask_O: torch.Tensor
    importance_OI: torch.Tensor

    def __init__(self, w_OI: torch.Tensor, rank: int) -> None:
        super().__init__()
        L, R, S = lowrank_sparse_init(w_OI.detach().float(), rank)
        self.L, self.R, self.S = nn.Parameter(L), nn.Parameter(R), nn.Parameter(S)
        self.register_buffer("mask_O", torch.ones(w_OI.shape[0], dtype=torch.bool))
        self.register_buffer("importance_OI", torch.zeros_like(S))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.R), self.L) + F.linear(x, self.S * self.mask_O[:, None])

    def dense(self) -> torch.Tensor:
        """``L R + S ⊙ mask`` ``[O, I]``."""
        return (self.L @ self.R + self.S * self.mask_O[:, None]).detach()

    def update_importance(self, beta1: float = 0.85) -> None:
        """PLATON's smoothed sensitivity ``I ← β1 I + (1 − β1) |S ⊙ ∇S|`` (call after backward)."""
        if self.S.grad is None:
            return
        with torch.no_grad():
            self.importance_OI.mul_(beta1).add_((self.S * self.S.grad).abs(), alpha=1 - beta1)

    def prune_rows(self, keep_fraction: float) -> None:
        """Keep the ``round(keep_fraction · O)`` rows of S with the highest mean importance (at least one)."""
        O = self.S.shape[0]
        keep = max(1, min(O, round(keep_fraction * O)))
        score = self.importance_OI.mean(dim=1)
        score = torch.where(self.mask_O, score, torch.full_like(score, -math.inf))  # pruned rows stay pruned
        kept = torch.topk(score, keep).indices
        with torch.no_grad():
            self.mask_O.zero_()
            self.mask_O[kept] = True

    def stored_params(self) -> int:
        return self.L.numel() + self.R.numel() + int(self.mask_O.sum()) * self.S.shape[1]


def kept_fraction(step: int, total: int, final: float, initial_warmup: int, final_warmup: int) -> float:
    """The cubic schedule of the kept fraction of rows (1 before ``initial_warmup``, ``final`` for the last
    ``final_warmup`` steps)."""
    span = total - initial_warmup - final_warmup
    if step < initial_warmup:
        return 1.0
    if span <= 0 or step >= total - final_warmup:
        return final
    return final + (1.0 - final) * (1 - (step - initial_warmup) / span) ** 3


def compress_expert(w: dict[str, torch.Tensor], x_TD: torch.Tensor, activation: str, *, rank: int = 32,
                    final_threshold: float = 0.10, steps: int = 40, lr: float = 1e-3,
                    initial_warmup: int = 4, final_warmup: int = 8, beta1: float = 0.85
                    ) -> tuple[dict[str, LowRankSparseLinear], list[float]]:
    """Low-rank + row-sparse factors of one (merged) expert ``{w_gate?, w_up [F, D], w_down [D, F], b_*?}``,
    distilled on ``x_TD`` (its routed tokens) toward its own float output while S's rows are pruned.

    Returns ``({matrix: LowRankSparseLinear}, losses per step)``; biases are not changed.
    """
    if not 0 < final_threshold <= 1:
        raise ValueError(f"final_threshold={final_threshold} must be in (0, 1]; the README uses 0.10")
    mats: dict[str, LowRankSparseLinear] = {m: LowRankSparseLinear(w[m], rank)
                                            for m in ("w_gate", "w_up", "w_down") if m in w}

    def run(x: torch.Tensor) -> torch.Tensor:
        h_up = mats["w_up"](x) + w.get("b_up", 0)
        h_gate = mats["w_gate"](x) + w.get("b_gate", 0) if "w_gate" in mats else None
        return mats["w_down"](hidden(activation, h_gate, h_up)) + w.get("b_down", 0)

    with torch.no_grad():
        h_up = F.linear(x_TD, w["w_up"], w.get("b_up"))
        h_gate = F.linear(x_TD, w["w_gate"], w.get("b_gate")) if "w_gate" in w else None
        target = F.linear(hidden(activation, h_gate, h_up), w["w_down"], w.get("b_down"))
    scale = target.square().mean().clamp_min(1e-12)
    params = [p for lin in mats.values() for p in lin.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for t in range(steps):
        if x_TD.shape[0]:
            loss = F.mse_loss(run(x_TD), target) / scale
            opt.zero_grad()
            loss.backward()
            for lin in mats.values():
                lin.update_importance(beta1)
            opt.step()
            losses.append(float(loss.detach()))
        frac = kept_fraction(t + 1, steps, final_threshold, initial_warmup, final_warmup)
        for lin in mats.values():
            lin.prune_rows(frac)
    for lin in mats.values():
        lin.prune_rows(final_threshold)
    return mats, losses
