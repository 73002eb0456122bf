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
one merged expert at a time, so the distillation is expert-level hidden-state MSE (normalised by the target's mean
square) on the tokens routed to its group. :func:`compress_expert` alone distils toward the merged expert's own
float output; the ``mc-smoe`` method (:func:`_apply_mcsmoe`) passes the *unmerged* experts' outputs, each on its
own routed tokens, so the fine-tune also recovers part of the merging error (the teacher of the spec's recovery
KD is the unmerged model too). A removed row is masked, not deleted, while training, so a module's shapes stay
fixed; the ``lowrank-sparse`` bank (:func:`lowrank_bank`) then stores only L, R and the kept rows of S. A group
that received no calibration tokens is not trained and keeps the rows of S of largest mean ``|S|``.

``mc-smoe`` operating points *(ours; the paper sets groups and rank separately)*: ``--target-memory t`` merges to
``round(√t · E)`` groups (M-SMoE's global group counts) and solves the rank so that L, R, the kept rows of S and
their indices take the remaining fraction ``t · E / Σ groups`` of each merged expert's float bytes;
``--keep-experts`` and ``rank`` set the two stages directly (rank 32, the README's ``low_rank_factor``, when
neither a rank nor a target is given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.activations import hidden
from ..layers import MoE
from .bank import BankSpec, CompressedBank
from .calibrate import CompressionError, LayerRecord
from .merge import (
    align_neurons,
    global_group_counts,
    groups_for_target,
    lowrank_sparse_init,
    merge_weights,
    msmoe_groups,
    permute_expert,
)
from .options import CompressOptions, _keep, _stacked
from .surgery import install_bank

__all__ = [
    "LowRankSparseLinear",
    "compress_expert",
    "dense_expert",
    "kept_fraction",
    "kept_rows",
    "lowrank_bank",
    "lowrank_sparse_dense",
    "lowrank_sparse_linear",
    "rank_for_fraction",
]

DEFAULT_RANK = 32  # the README's low_rank_factor


def kept_rows(rows: int, keep_fraction: float) -> int:
    """Rows of S kept at ``keep_fraction``: ``round(keep_fraction · rows)``, at least one."""
    return max(1, min(rows, round(keep_fraction * rows)))


def lowrank_sparse_linear(x_TC: torch.Tensor, L_RK: torch.Tensor, R_KC: torch.Tensor, S_NC: torch.Tensor,
                          rows_N: torch.Tensor, bias_R: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for ``W = L R + S`` with S stored as its kept rows ``S_NC`` at output rows ``rows_N``, without
    forming W: ``(x Rᵀ) Lᵀ``, then ``x S_NCᵀ`` added into columns ``rows_N`` (differentiable in x).

    Dim legend here: T tokens, C input columns, R output rows, K rank, N kept rows of S.
    """
    dtype = x_TC.dtype
    y_TR = F.linear(F.linear(x_TC, R_KC.to(dtype)), L_RK.to(dtype), None if bias_R is None else bias_R.to(dtype))
    return y_TR.index_add(1, rows_N.long(), F.linear(x_TC, S_NC.to(dtype)))


def lowrank_sparse_dense(L_RK: torch.Tensor, R_KC: torch.Tensor, S_NC: torch.Tensor, rows_N: torch.Tensor
                         ) -> torch.Tensor:
    """The dense ``W = L R + S`` ``[R, C]`` (the readable reference; the bank never needs it to run)."""
    return (L_RK @ R_KC).index_add(0, rows_N.long(), S_NC)


def dense_expert(w: Mapping[str, torch.Tensor], x_TD: torch.Tensor, activation: str) -> torch.Tensor:
    """An expert ``{w_gate?, w_up, w_down, b_*?}`` applied to ``x_TD`` in float."""
    h_up = F.linear(x_TD, w["w_up"], w.get("b_up"))
    h_gate = F.linear(x_TD, w["w_gate"], w.get("b_gate")) if "w_gate" in w else None
    return F.linear(hidden(activation, h_gate, h_up), w["w_down"], w.get("b_down"))


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
        keep = kept_rows(self.S.shape[0], keep_fraction)
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
                    initial_warmup: int = 4, final_warmup: int = 8, beta1: float = 0.85,
                    target_TD: torch.Tensor | None = None) -> tuple[dict[str, LowRankSparseLinear], list[float]]:
    """Low-rank + row-sparse factors of one (merged) expert ``{w_gate?, w_up [F, D], w_down [D, F], b_*?}``,
    distilled on ``x_TD`` (its routed tokens) toward ``target_TD`` (default: its own float output) while S's rows
    are pruned. Without tokens nothing is trained and the rows of S of largest mean ``|S|`` are kept.

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

    if target_TD is not None and target_TD.shape != x_TD.shape:
        raise ValueError(f"target_TD {tuple(target_TD.shape)} must have the shape of x_TD {tuple(x_TD.shape)}")
    if not x_TD.shape[0]:
        for lin in mats.values():
            lin.importance_OI.copy_(lin.S.detach().abs())
    with torch.no_grad():
        target = dense_expert(w, x_TD, activation) if target_TD is None else target_TD
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


def lowrank_bank(mats_G: list[dict[str, LowRankSparseLinear]], slot_to_stored_E: torch.Tensor, *, activation: str,
                 biases: Mapping[str, torch.Tensor] | None = None) -> CompressedBank:
    """A ``lowrank-sparse`` :class:`~.bank.CompressedBank` from one ``{matrix: LowRankSparseLinear}`` per stored
    expert (every expert with the same rank and kept-row counts); biases ``{b_*: [G, ...]}`` stay float32."""
    first = mats_G[0]
    F_, D = first["w_up"].S.shape
    rank = first["w_up"].L.shape[1]
    kept = {m: int(lin.mask_O.sum()) for m, lin in first.items()}
    spec = BankSpec(num_experts=len(slot_to_stored_E), num_stored=len(mats_G), dim=D, hidden_dim=F_,
                    activation=activation, use_bias=bool(biases), format="lowrank-sparse", bits=32, rank=rank,
                    kept_rows=kept)
    bank = CompressedBank(spec)
    with torch.no_grad():
        for g, mats in enumerate(mats_G):
            if set(mats) != set(spec.matrices()):
                raise ValueError(f"stored expert {g} has matrices {sorted(mats)}; the bank needs "
                                 f"{sorted(spec.matrices())}")
            for m, lin in mats.items():
                rows = lin.mask_O.nonzero().flatten()
                if rows.numel() != kept[m] or lin.L.shape[1] != rank:
                    raise ValueError(f"stored expert {g}: {m} has rank {lin.L.shape[1]} and {rows.numel()} kept rows; "
                                     f"every expert of a bank needs rank {rank} and {kept[m]} kept rows")
                getattr(bank, f"{m}_L")[g] = lin.L.detach()
                getattr(bank, f"{m}_R")[g] = lin.R.detach()
                getattr(bank, f"{m}_S")[g] = lin.S.detach()[rows]
                getattr(bank, f"{m}_rows")[g] = rows.to(torch.int32)
        for name, t in (biases or {}).items():
            getattr(bank, name).copy_(t)
        bank.slot_to_stored_E.copy_(slot_to_stored_E)
    return bank


def rank_for_fraction(shape_RC: tuple[int, int], fraction: float, final_threshold: float) -> int:
    """The largest rank whose ``L``, ``R``, kept rows of S and their int32 indices fit in ``fraction`` of the
    float matrix ``[R, C]`` (at most ``min(R, C)``; below 1 when even rank 1 does not fit)."""
    R, C = shape_RC
    K = kept_rows(R, final_threshold)
    return min(min(R, C), math.floor((fraction * R * C - K * C - K) / (R + C)))


def _plan_mcsmoe(records: dict[str, LayerRecord], opts: CompressOptions, layers: dict[str, MoE], model
                 ) -> dict[str, tuple[int, int]]:
    """``{layer: (groups, rank)}``: M-SMoE's global group counts, then the rank (see the module docstring)."""
    names = list(records)
    first = layers[names[0]]
    E = first.config.num_experts
    if opts.keep_experts is None and opts.target_memory is not None:
        keep = groups_for_target(E, math.sqrt(opts.target_memory))
    else:
        keep = _keep(first, opts)
    counts = global_group_counts([records[n].frequency_E() for n in names], keep)
    if opts.rank is not None:
        rank = opts.rank
    elif opts.target_memory is not None:
        fraction = opts.target_memory * E * len(counts) / sum(counts)
        Fh, D = first.config.hidden_dim, first.config.dim
        rank = min(rank_for_fraction(shape, fraction, opts.final_threshold) for shape in ((Fh, D), (D, Fh)))
        if rank < 1:
            raise CompressionError(f"target_memory={opts.target_memory} cannot be met by mc-smoe: after merging to "
                                   f"{sum(counts)} groups, even rank 1 plus {opts.final_threshold:g} of S's rows "
                                   f"exceeds {fraction:.3f} of each merged expert; raise the target or lower "
                                   f"final_threshold")
    else:
        rank = DEFAULT_RANK
    return {n: (c, rank) for n, c in zip(names, counts)}


def _apply_mcsmoe(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    """MC-SMoE on one layer: M-SMoE merging (frequency-guided groups, neuron alignment, frequency-weighted
    average; router untouched), then each merged expert compressed to low-rank + row-sparse and distilled toward
    its unmerged members' outputs on their routed tokens."""
    num_groups, rank = plan[record.name]
    groups = msmoe_groups(record, num_groups)
    experts = _stacked(moe)
    freq, act = record.frequency_E(), moe.config.activation
    slots = torch.empty(len(experts), dtype=torch.long)
    compressed, merged_all = [], []
    for g, members in enumerate(groups):
        slots[members] = g
        ref = experts[members[0]]
        aligned = [ref] + [permute_expert(experts[i], align_neurons(ref, experts[i])) for i in members[1:]]
        merged = merge_weights(aligned, [float(freq[i]) for i in members])
        xs = [record.tokens_of(i, opts.max_tokens_per_expert) for i in members]
        with torch.no_grad():
            target = torch.cat([dense_expert(experts[i], x, act) for i, x in zip(members, xs)])
        mats, _ = compress_expert(merged, torch.cat(xs), act, rank=rank, final_threshold=opts.final_threshold,
                                  steps=opts.lowrank_steps, lr=opts.lowrank_lr, target_TD=target)
        compressed.append(mats)
        merged_all.append(merged)
    biases: dict[str, torch.Tensor] = {b: torch.stack([w[b] for w in merged_all]) for b in ("b_gate", "b_up", "b_down") if b in merged_all[0]}
    install_bank(moe, lowrank_bank(compressed, slots, activation=act, biases=biases))
