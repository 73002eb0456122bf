"""Multi-Head Adapter Routing (Caccia et al. 2023; code microsoft/mttl @3724abf5; spec §20): Poly, MHR, MHR-z, MHR-μ.

Dim legend: I input features, O output features, R rank, M skills, H heads, N tasks.

Each adapted linear holds ``M`` LoRA skills ``A_MIR`` and ``B_MRO``. ``A`` is split along its input dimension
into ``H`` heads and ``B`` along its output dimension. Per task ``t`` the logits ``Z[t] in R^{H x M}``
(initialised U(-1e-3, 1e-3)) give ``w = sigmoid(Z) / sum_j sigmoid(Z)`` over skills, and::

    A_t[q] = sum_j w_{t,q,j} A^(j)[q],   B_t[q] = sum_j w_{t,q,j} B^(j)[q],   y = W0 x + (alpha/r) x A_t B_t

Poly is MHR with ``H = 1``. The task of a forward is ``Adapters.set_task(t)`` (one task per batch).
**MHR-z** (``convert(model, "mhr_z")``) freezes the skills so that only the routing logits train; **MHR-μ**
(``convert(model, "mhr_mu")``) replaces each layer by one LoRA initialised to the uniform average of the
skills, which can then be fine-tuned and merged. ``B`` starts at zero, so the adapted model starts as the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configs import ConfigError, check
from ..types import RoutingContext
from .core import LinearAdapter
from .lora import LoRA, LoRAConfig, kaiming_rows

__all__ = ["MHR", "MHRConfig", "mhr_mu_from"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MHRConfig:
    """Attributes (mttl T0 config): num_skills M = 8, rank 16, alpha (scale alpha/rank), num_heads H
    (``n_splits``; 1 = Poly), num_tasks N, logits_init 1e-3 (Z ~ U(-init, init)), train_skills (False = MHR-z)."""

    num_skills: int = 8
    rank: int = 16
    alpha: float = 16.0
    num_heads: int = 1
    num_tasks: int = 1
    logits_init: float = 1e-3
    train_skills: bool = True

    def __post_init__(self) -> None:
        for name in ("num_skills", "rank", "num_heads", "num_tasks"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"mhr.{name}={value!r} must be a positive integer")
        check(self.alpha > 0, f"mhr.alpha={self.alpha} must be positive")
        check(self.logits_init >= 0, f"mhr.logits_init={self.logits_init} must be >= 0")


class MHR(LinearAdapter):
    """Task-routed mixture of LoRA skills with per-head routing."""

    def __init__(self, in_features: int, out_features: int, config: MHRConfig, task_of=lambda: 0) -> None:
        super().__init__()
        c = self.config = config
        H = c.num_heads
        if in_features % H or out_features % H:
            raise ConfigError(f"mhr.num_heads={H} must divide the adapted layer's input ({in_features}) and output "
                             f"({out_features}) features; choose a common divisor")
        self.in_features, self.out_features, self.scale = in_features, out_features, c.alpha / c.rank
        self.skills_A = nn.Parameter(kaiming_rows(c.rank, in_features, c.num_skills).transpose(1, 2).contiguous())
        self.skills_B = nn.Parameter(torch.zeros(c.num_skills, c.rank, out_features))
        self.skills_A.requires_grad_(c.train_skills)
        self.skills_B.requires_grad_(c.train_skills)
        self.logits = nn.Parameter(torch.empty(c.num_tasks, H, c.num_skills).uniform_(-c.logits_init, c.logits_init))
        self._task_of = task_of

    def skill_weights(self, task: int) -> torch.Tensor:
        """``w_HM = sigmoid(Z[t]) / sum_j sigmoid(Z[t])``."""
        if not 0 <= task < self.config.num_tasks:
            raise ConfigError(f"task {task} is out of range for mhr.num_tasks={self.config.num_tasks}; "
                             f"use 0..{self.config.num_tasks - 1} or raise num_tasks")
        s_HM = torch.sigmoid(self.logits[task])
        return s_HM / s_HM.sum(-1, keepdim=True)

    def task_adapter(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_t [I, R], B_t [R, O])``: head ``q``'s slice depends only on ``Z[t, q, :]``."""
        M, H, R = self.config.num_skills, self.config.num_heads, self.config.rank
        w_HM = self.skill_weights(task)
        A_MHiR = self.skills_A.view(M, H, self.in_features // H, R)
        B_MRHo = self.skills_B.view(M, R, H, self.out_features // H)
        A_IR = torch.einsum("hm,mhir->hir", w_HM, A_MHiR).reshape(self.in_features, R)
        B_RO = torch.einsum("hm,mrho->rho", w_HM, B_MRHo).reshape(R, self.out_features)
        return A_IR, B_RO

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "mhr") -> torch.Tensor:
        A_IR, B_RO = self.task_adapter(int(self._task_of()))
        return (x_TI.to(A_IR.dtype) @ A_IR) @ B_RO * self.scale


def mhr_mu_from(mhr: MHR) -> LoRA:
    """MHR-μ: one LoRA equal to the uniform average of the skills (what uniform ``Z`` routes to)."""
    c = mhr.config
    lora = LoRA(mhr.in_features, mhr.out_features, LoRAConfig(rank=c.rank, alpha=c.alpha))
    with torch.no_grad():
        lora.lora_A.copy_(mhr.skills_A.mean(0).T)
        lora.lora_B.copy_(mhr.skills_B.mean(0).T)
    return lora
