"""M-SMoE (Li et al. 2024, "Merge, Then Compress", arXiv 2310.01334; spec §1) and the random-merging baseline.

Dim legend: E experts, G groups, F expert hidden dim (neurons), D model dim, L merged layers.

- Permutation alignment: neuron ``j`` of an expert is row ``j`` of ``w_gate``/``w_up`` and column ``j`` of
  ``w_down``. The cost ``C = W_in^ref W_in^iᵀ + W_out^refᵀ W_out^i`` (``F × F``) is maximised by a linear sum
  assignment (scipy's Hungarian solver). For SwiGLU, ``W_in`` is ``[w_gate | w_up]`` side by side *(our
  choice: the spec names ``W_in`` for ReLU experts; both gated projections belong to the neuron)*.
- Groups per layer from the pooled frequencies of all merged layers (each layer's most-used expert forced to
  1): ``τ = sorted_desc[avg_groups · L]``, ``groups_l = #{f > τ}``. Dominant experts are the ``groups_l`` most
  used; the others, in descending usage, join the dominant expert of largest router-logit similarity
  ``S_ij = (cos(z_i, z_j) + 1) / 2``.
- Merge: members are aligned to the group's first (dominant) expert, then
  ``W_G = Σ_i f_i W_i / (Σ_i f_i + ε)``. A group whose members were all unused (``Σ f = 0``) takes the plain
  average *(our choice: the formula would give zeros)*. The router is untouched; every slot of a group points
  at the merged expert (``slot_to_stored_E``).

MC-SMoE's second stage (low-rank + sparse compression of the merged experts with KD fine-tuning) is in
:mod:`.mcsmoe` (``--method mc-smoe``); :func:`lowrank_sparse_init` gives its SVD initialisation ``W = L R + S``.
"""

from __future__ import annotations

import math

import torch

from .calibrate import CompressionError, LayerRecord

__all__ = [
    "align_neurons",
    "global_group_counts",
    "lowrank_sparse_init",
    "merge_weights",
    "msmoe_groups",
    "permute_expert",
    "random_groups",
    "router_similarity",
]

EPS = 1e-8


def _in_matrix(w: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w["w_gate"], w["w_up"]], dim=1) if "w_gate" in w else w["w_up"]


def align_neurons(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
    """The permutation ``perm_F`` such that ``permute_expert(other, perm_F)`` best matches ``ref`` neuron by neuron."""
    from scipy.optimize import linear_sum_assignment
    cost_FF = _in_matrix(ref).double() @ _in_matrix(other).double().T + ref["w_down"].double().T @ other["w_down"].double()
    rows, cols = linear_sum_assignment(cost_FF.numpy(), maximize=True)
    perm = torch.empty(cost_FF.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_expert(w: dict[str, torch.Tensor], perm_F: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reorder an expert's neurons (function-preserving): rows of ``w_gate``/``w_up``/biases, columns of ``w_down``."""
    out = dict(w)
    for m in ("w_gate", "w_up", "b_gate", "b_up"):
        if m in w:
            out[m] = w[m][perm_F]
    out["w_down"] = w["w_down"][:, perm_F]
    return out


def merge_weights(experts: list[dict[str, torch.Tensor]], freqs: list[float]) -> dict[str, torch.Tensor]:
    """``Σ f_i W_i / (Σ f_i + ε)`` over already aligned experts (plain average when every ``f_i`` is 0)."""
    f = torch.tensor(freqs, dtype=torch.float64)
    if float(f.sum()) <= 0:
        f = torch.ones_like(f)
    out = {}
    for m in experts[0]:
        stacked = torch.stack([e[m].double() for e in experts])
        out[m] = (torch.tensordot(f, stacked, dims=1) / (f.sum() + EPS)).float()
    return out


def router_similarity(record: LayerRecord) -> torch.Tensor:
    """``S_EE = (cos(z_i, z_j) + 1) / 2`` over the columns of the calibration router logits."""
    z = torch.nn.functional.normalize(record.logits_TE.double().T, dim=1)
    return ((z @ z.T + 1) / 2).float()


def global_group_counts(freqs: list[torch.Tensor], avg_groups: int) -> list[int]:
    """Groups per layer from pooled frequencies (spec §1 step 4, every layer merged)."""
    pooled = []
    for f in freqs:
        f = f.clone()
        f[int(torch.argmax(f))] = 1.0  # each layer keeps at least one group
        pooled.append(f)
    flat = torch.cat(pooled).sort(descending=True).values
    total = avg_groups * len(freqs)
    if total >= len(flat):
        return [len(f) for f in freqs]
    tau = flat[total]
    return [max(1, int((f > tau).sum())) for f in pooled]


def msmoe_groups(record: LayerRecord, num_groups: int) -> list[list[int]]:
    """Groups of expert indices, each led by its dominant expert (spec §1 step 5)."""
    E = record.num_experts
    if not 1 <= num_groups <= E:
        raise CompressionError(f"{record.name}: {num_groups} groups asked for {E} experts; choose 1 to {E}")
    freq = record.frequency_E()
    order = sorted(range(E), key=lambda i: (-float(freq[i]), i))
    dominant, rest = order[:num_groups], order[num_groups:]
    sim = router_similarity(record)
    groups = {d: [d] for d in dominant}
    for i in rest:
        best = max(dominant, key=lambda d: (float(sim[i, d]), -d))
        groups[best].append(i)
    return [groups[d] for d in dominant]


def random_groups(num_experts: int, num_groups: int, generator: torch.Generator) -> list[list[int]]:
    """A random partition of the experts into ``num_groups`` non-empty groups (the random-merging baseline)."""
    perm = torch.randperm(num_experts, generator=generator).tolist()
    return [sorted(perm[g::num_groups]) for g in range(num_groups)]


def lowrank_sparse_init(w_RC: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MC-SMoE's SVD initialisation: ``L = U_r √Σ_r``, ``R = √Σ_r V_rᵀ``, ``S = W − L R`` (so ``L R + S = W``)."""
    rank = max(1, min(rank, *w_RC.shape))
    U, s, Vh = torch.linalg.svd(w_RC.double(), full_matrices=False)
    root = s[:rank].sqrt()
    L = U[:, :rank] * root
    R = root[:, None] * Vh[:rank]
    return L.float(), R.float(), (w_RC.double() - L @ R).float()


def groups_for_target(num_experts: int, fraction: float) -> int:
    return max(1, min(num_experts, math.floor(fraction * num_experts + 0.5)))
