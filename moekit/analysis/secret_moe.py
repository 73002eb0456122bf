"""The harness of "Secret mixtures of experts inside your LLM" (arXiv 2512.18452; architectures.md §18):
distil a trained dense MLP into an MoE and measure how well it is approximated.

Dim legend: T tokens, D model dim, F hidden dim, E experts, K experts per token, r router rank.

Protocol (the spec's, from an abstract and a third-party summary):

1. Collect ``(x, MLP(x))`` pairs of one feed-forward layer of a trained dense moekit model
   (:func:`collect_pairs`: the normalised inputs the layer sees and its outputs).
2. Distil into (a) an MoE student, ``E`` experts of width ``F_e``, top-``K``, with a full or low-rank router
   ``W_r = A B`` (rank ``r``), and (b) a dense SwiGLU student of the same *active* size ``K * F_e``.
3. Compare their relative errors ``||y_student - y||^2 / ||y||^2`` on held-out pairs, and repeat with a control:
   Gaussian inputs of the same mean and covariance, labelled by the same MLP (:func:`gaussian_control`).

The paper's claim: the MoE student beats the dense one on real activations but not on Gaussian inputs.
Choices: combine weights are the renormalised top-k softmax times ``K`` (so that with a uniform router every
selected expert weighs 1, and the slice initialisation with ``K = E`` is the teacher exactly); Adam, full-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..dispatch import resolve_engine
from ..experts import ExpertBank, FeedForward
from ..routing.selectors import select_topk
from ..types import Routing

__all__ = ["LowRankRouter", "SecretMoE", "SecretResult", "collect_pairs", "distill", "gaussian_control",
           "relative_error", "secret_moe_study"]


class LowRankRouter(nn.Module):
    """Router logits ``x B^T A^T`` with ``A: [E, r]``, ``B: [r, D]``; ``rank=None`` is the full ``[E, D]`` router."""

    def __init__(self, dim: int, num_experts: int, rank: int | None = None) -> None:
        super().__init__()
        check(rank is None or 1 <= rank <= dim, f"router rank={rank} must be in 1..dim={dim} (None: full rank)")
        self.full = nn.Linear(dim, num_experts, bias=False) if rank is None else None
        self.a = nn.Linear(rank, num_experts, bias=False) if rank is not None else None
        self.b = nn.Linear(dim, rank, bias=False) if rank is not None else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            return self.full(x_TD)
        assert self.a is not None and self.b is not None
        return self.a(self.b(x_TD))


class SecretMoE(nn.Module):
    """The MoE student: a (low-rank) router, top-k of ``E`` SwiGLU experts, weights ``K * renormalised softmax``."""

    def __init__(self, dim: int, num_experts: int, expert_width: int, top_k: int, rank: int | None = None) -> None:
        super().__init__()
        check(1 <= top_k <= num_experts, f"top_k={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.router = LowRankRouter(dim, num_experts, rank)
        self.experts = ExpertBank(num_experts, dim, expert_width, "swiglu")

    @classmethod
    def from_slices(cls, teacher: FeedForward, num_experts: int) -> SecretMoE:
        """Experts = equal slices of the teacher's hidden units, a zero router, ``K = E``: the teacher exactly."""
        F_, D = teacher.w_up.shape
        check(F_ % num_experts == 0, f"the teacher's hidden size {F_} does not split into {num_experts} experts")
        student = cls(D, num_experts, F_ // num_experts, num_experts)
        assert teacher.w_gate is not None and student.router.full is not None and student.experts.w_gate is not None
        with torch.no_grad():
            student.router.full.weight.zero_()
            student.experts.w_gate.copy_(teacher.w_gate.view(num_experts, -1, D))
            student.experts.w_up.copy_(teacher.w_up.view(num_experts, -1, D))
            student.experts.w_down.copy_(teacher.w_down.view(D, num_experts, -1).permute(1, 0, 2))
        return student

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = self.router(x_TD).float()
        probs = logits.softmax(-1)
        ids, weights = select_topk(probs, self.top_k)
        routing = Routing(expert_ids_TK=ids, weights_TK=(weights * self.top_k).to(x_TD.dtype), scores_TE=probs,
                          logits_TE=logits)
        return resolve_engine("auto", x_TD, self.experts)(x_TD, routing, self.experts)


def relative_error(pred_TD: torch.Tensor, target_TD: torch.Tensor) -> float:
    """``||pred - target||^2 / ||target||^2``."""
    pred_TD, target_TD = pred_TD.detach(), target_TD.detach()
    return float((pred_TD - target_TD).pow(2).sum() / target_TD.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def collect_pairs(model: nn.Module, tokens_BS: torch.Tensor, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_TD, y_TD)``: what block ``layer_index``'s feed-forward reads and returns on ``tokens``."""
    ffn = model.layers[layer_index].ffn  # type: ignore[index,union-attr]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = ffn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        model.eval()
        model(tokens_BS)
    finally:
        handle.remove()
    x, y = seen[0]
    return x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()


@torch.no_grad()
def gaussian_control(teacher: nn.Module, x_TD: torch.Tensor, generator: torch.Generator | None = None):
    """Gaussian inputs with ``x``'s mean and covariance, labelled by ``teacher``: ``(x_TD, y_TD)``."""
    mean = x_TD.mean(0)
    cov = torch.cov(x_TD.T) + 1e-5 * torch.eye(x_TD.shape[1])
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(x_TD.shape, generator=generator)
    xg = mean + z @ chol.T
    return xg, teacher(xg)


def distill(student: nn.Module, x_TD: torch.Tensor, y_TD: torch.Tensor, steps: int = 300, lr: float = 3e-3) -> None:
    """Full-batch Adam on the mean squared error."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(student(x_TD), y_TD).backward()
        opt.step()


@dataclass
class SecretResult:
    """Held-out relative errors of the two students on real activations and on the Gaussian control."""

    moe_real: float
    dense_real: float
    moe_gaussian: float
    dense_gaussian: float


def secret_moe_study(teacher: nn.Module, x_TD: torch.Tensor, y_TD: torch.Tensor, *, num_experts: int = 8,
                     top_k: int = 2, expert_width: int = 16, rank: int | None = None, steps: int = 300,
                     lr: float = 3e-3, seed: int = 0) -> SecretResult:
    """Distil into an MoE and an active-size-matched dense student, on real pairs and on the Gaussian control.

    The first 80% of the pairs train, the rest measure.
    """
    check(x_TD.shape[0] >= 10, f"need at least 10 pairs, got {x_TD.shape[0]}; collect more tokens")
    g = torch.Generator().manual_seed(seed)
    xg, yg = gaussian_control(teacher, x_TD, g)
    split = int(0.8 * x_TD.shape[0])
    errors = {}
    for data, (xs, ys) in (("real", (x_TD, y_TD)), ("gaussian", (xg, yg))):
        for kind in ("moe", "dense"):
            torch.manual_seed(seed)
            student: nn.Module = (SecretMoE(x_TD.shape[1], num_experts, expert_width, top_k, rank) if kind == "moe"
                                  else FeedForward(x_TD.shape[1], top_k * expert_width))
            distill(student, xs[:split], ys[:split], steps, lr)
            with torch.no_grad():
                errors[f"{kind}_{data}"] = relative_error(student(xs[split:]), ys[split:])
    return SecretResult(**errors)
