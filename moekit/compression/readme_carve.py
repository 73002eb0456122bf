"""Read-ME expert carving: a dense FFN becomes a shared expert plus per-domain experts, by activation masks
(Cai et al. 2024, github VITA-Group/READ-ME, moe_fication/generate_mask.py; architectures.md §8).

Dim legend: T tokens, D model dim, F hidden (neurons), E experts (domains), C rank cut-offs.

- Per domain ``e``: the mean absolute intermediate activation of each neuron over that domain's inputs; the top
  ``remain_rate`` fraction of neurons (0.5 in the paper) forms the domain mask.
- Shared mask = the intersection of all domain masks; expert mask ``m_e`` = domain mask minus the shared one. The
  expert parts never contain a shared neuron; they are disjoint for two domains, but with three or more two
  domains may keep a neuron the others drop (the spec's "disjoint apart from the shared set" holds for E = 2).
- A token routed to expert ``e`` runs the dense FFN with its intermediate neurons masked by ``shared | m_e``
  (:class:`CarvedFFN`; the routing comes from the Read-ME planner, :mod:`moekit.layers.variants.readme`).
- Router targets (:func:`carving_targets`): for each token, the share of its most activated neurons (top
  fractions ``cutoffs``, five in the paper's code) that each expert's mask covers, averaged over the cut-offs and
  normalised into a distribution; :func:`~moekit.layers.variants.planner_distillation_loss` trains the planner on
  them. Choices: the cut-off fractions (0.05 .. 0.5) and the normalisation are our reading of the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..experts import FeedForward
from ..experts.activations import hidden

__all__ = ["CarvedFFN", "ReadMEMasks", "carve_masks", "carving_targets", "intermediate"]


def intermediate(ffn: FeedForward, x_TD: torch.Tensor) -> torch.Tensor:
    """``[T, F]`` intermediate activations ``act(W_gate x) * W_up x`` (or ``act(W_up x)``) of a dense FFN."""
    h_gate = F.linear(x_TD, ffn.w_gate) if ffn.w_gate is not None else None
    return hidden(ffn.activation, h_gate, F.linear(x_TD, ffn.w_up))


@dataclass
class ReadMEMasks:
    """Boolean masks over the ``F`` neurons: ``shared_F`` and the disjoint expert parts ``experts_EF``."""

    shared_F: torch.Tensor
    experts_EF: torch.Tensor

    def active(self, expert: int) -> torch.Tensor:
        """``shared | m_e``: the neurons a token routed to ``expert`` uses."""
        return self.shared_F | self.experts_EF[expert]


@torch.no_grad()
def carve_masks(ffn: FeedForward, domain_inputs: list[torch.Tensor], remain_rate: float = 0.5) -> ReadMEMasks:
    """Masks from each domain's ``[T_e, D]`` inputs to ``ffn`` (one domain per expert)."""
    check(0 < remain_rate <= 1, f"remain_rate={remain_rate} must be in (0, 1] (the paper keeps 0.5)")
    check(len(domain_inputs) >= 1, "give at least one domain's inputs (one expert per domain)")
    Fn = ffn.w_up.shape[0]
    keep = max(1, round(remain_rate * Fn))
    masks = []
    for x_TD in domain_inputs:
        score_F = intermediate(ffn, x_TD.float()).abs().mean(0)
        mask = torch.zeros(Fn, dtype=torch.bool)
        mask[score_F.topk(keep).indices] = True
        masks.append(mask)
    domain_EF = torch.stack(masks)
    shared_F = domain_EF.all(0)
    return ReadMEMasks(shared_F=shared_F, experts_EF=domain_EF & ~shared_F)


@torch.no_grad()
def carving_targets(ffn: FeedForward, masks: ReadMEMasks, x_TD: torch.Tensor,
                    cutoffs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> torch.Tensor:
    """``[T, E]`` target distributions: how much of each token's top neurons each expert's mask covers."""
    act_TF = intermediate(ffn, x_TD.float()).abs()
    Fn, E = act_TF.shape[1], masks.experts_EF.shape[0]
    active_EF = torch.stack([masks.active(e) for e in range(E)]).float()
    coverage_TE = torch.zeros(x_TD.shape[0], E)
    for c in cutoffs:
        top = act_TF.topk(max(1, round(c * Fn)), dim=-1).indices
        hit_TF = torch.zeros_like(act_TF).scatter(1, top, 1.0)
        coverage_TE += hit_TF @ active_EF.T / hit_TF.sum(1, keepdim=True)
    coverage_TE /= len(cutoffs)
    return coverage_TE / coverage_TE.sum(1, keepdim=True).clamp_min(1e-12)


class CarvedFFN(nn.Module):
    """The dense FFN whose neurons are masked per token by ``shared | m_{e_t}``: ``forward(x_TD, expert_T)``."""

    active_EF: torch.Tensor

    def __init__(self, ffn: FeedForward, masks: ReadMEMasks) -> None:
        super().__init__()
        self.ffn = ffn
        active_EF = torch.stack([masks.active(e) for e in range(masks.experts_EF.shape[0])])
        self.register_buffer("active_EF", active_EF)

    def forward(self, x_TD: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
        h_TF = intermediate(self.ffn, x_TD) * self.active_EF[expert_T].to(x_TD.dtype)
        return F.linear(h_TF, self.ffn.w_down)
