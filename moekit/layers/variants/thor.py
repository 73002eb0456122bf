"""THOR: Transformer with Stochastic Experts (Zuo et al. 2022, arXiv 2110.04260,
github microsoft/Stochastic-Mixture-of-Experts).

Dim legend: T tokens, D model dim, E experts, B batch, S sequence, V vocabulary.

No router. In training each THOR layer samples ONE expert uniformly per forward pass (the same for the whole
batch; layers sample independently), so each pass makes one expert call per layer. The model is run twice with
independent samples and trained with a consistency regulariser (:func:`consistency_loss`)::

    L = CE(P1) + CE(P2) + alpha * 1/2 sum_tokens sum_v (P1 - P2)(log P1 - log P2)     (summed over non-pad tokens)

alpha = 5.0 in the IWSLT script (the code's config default is 1.0). Inference: ``eval_level=0`` keeps a random
expert per token (code default), ``1`` per sequence (IWSLT script). The two passes are THOR's training-step
hook (:meth:`THOR.training_step`, see :mod:`moekit.layers.step_hook`), which records ``thor_consistency_loss``
in the RoutingContext through :func:`add_consistency_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...dispatch import resolve_engine
from ...experts import ExpertBank
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ..step_hook import Forward, StepLoss, language_model_loss
from ._common import flatten, parse_options, record_stats

__all__ = ["THORConfig", "THOR", "consistency_loss", "add_consistency_loss"]


@dataclass(frozen=True, kw_only=True, slots=True)
class THORConfig:
    """Attributes:
        eval_level: 0 = a random expert per token at inference (code default), 1 = per sequence.
        consistency_coef: alpha of :func:`add_consistency_loss` (IWSLT script 5.0; code default 1.0).
    """

    eval_level: int = 0
    consistency_coef: float = 5.0

    def __post_init__(self) -> None:
        check(self.eval_level in (0, 1), f"variant.eval_level={self.eval_level} must be 0 (token) or 1 (sequence)")
        check(self.consistency_coef >= 0, f"variant.consistency_coef={self.consistency_coef} must be >= 0")


class THOR(nn.Module):
    """Stochastic experts: one uniformly sampled expert per forward (training)."""

    def __init__(self, moe: MoEConfig, config: THORConfig | None = None, name: str = "thor") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or THORConfig(), name
        self.experts = ExpertBank(moe.num_experts, moe.dim, moe.hidden_dim, moe.activation)

    @property
    def consistency_coef(self) -> float:
        """The training step runs two stochastic passes and adds this times the consistency loss."""
        return self.config.consistency_coef

    @staticmethod
    def training_step(modules: list["THOR"], forward: Forward, targets_BS: torch.Tensor,
                      collect_stats: bool) -> StepLoss:
        """THOR's step: two stochastic passes, ``CE1 + CE2 + alpha * consistency`` (+ each pass's losses).

        The paper sums CE and the symmetric KL over tokens; with mean CE, the KL is a mean over tokens too, so
        alpha (the largest ``consistency_coef`` of the model's THOR layers) is divided by the token count.
        The reported CE is the mean of the two passes'; the consistency loss counts as auxiliary.
        """
        coef = max(m.consistency_coef for m in modules)
        first = language_model_loss(forward, targets_BS, collect_stats)
        second = language_model_loss(forward, targets_BS, False)
        assert first.logits_BSV is not None and second.logits_BSV is not None
        consistency = add_consistency_loss(first.ctx, first.logits_BSV, second.logits_BSV,
                                           coef / targets_BS.numel())
        loss = first.ce + second.ce + first.aux + second.aux + consistency
        return StepLoss(loss=loss, ce=(first.ce + second.ce) / 2, aux=first.aux + consistency, ctx=first.ctx,
                        logits_BSV=first.logits_BSV)

    def route(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Routing:
        """Training: one expert for all rows. Eval: one per token (level 0) or per sequence (level 1)."""
        E, dev = self.moe_config.num_experts, x.device
        T = x.numel() // x.shape[-1]
        if self.training:
            ids_T = torch.randint(E, (1,), generator=generator, device=dev).expand(T)
        elif self.config.eval_level == 1 and x.dim() == 3:
            ids_T = torch.randint(E, (x.shape[0], 1), generator=generator, device=dev).expand(x.shape[:2]).reshape(T)
        else:
            ids_T = torch.randint(E, (T,), generator=generator, device=dev)
        ids_TK = ids_T[:, None].contiguous()
        scores_TE = F.one_hot(ids_T, E).float()
        return Routing(expert_ids_TK=ids_TK, weights_TK=torch.ones(T, 1, device=dev), scores_TE=scores_TE,
                       logits_TE=scores_TE)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        routing = self.route(x)
        y_TD = resolve_engine(self.moe_config.engine, x_TD, self.experts)(x_TD, routing, self.experts)
        record_stats(ctx, self.name, routing)
        return y_TD.view(x.shape)


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric KL ``1/2 sum_tokens sum_v (P1 - P2)(log P1 - log P2)``, summed over (non-masked) tokens.

    Args:
        logits_a, logits_b: ``[..., V]`` logits of the two stochastic passes.
        mask: ``[...]`` True for tokens that count (non-pad); None counts all.
    """
    logp_a, logp_b = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)
    per_token = 0.5 * ((logp_a.exp() - logp_b.exp()) * (logp_a - logp_b)).sum(-1)
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum()


def add_consistency_loss(ctx: RoutingContext, logits_a: torch.Tensor, logits_b: torch.Tensor, coef: float,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Record ``coef * consistency_loss`` as ``thor_consistency_loss`` in ``ctx`` and return it."""
    value = coef * consistency_loss(logits_a, logits_b, mask)
    ctx.add_loss("thor_consistency_loss", value)
    return value


@register_ffn("thor")
def build_thor(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return THOR(moe, parse_options(THORConfig, options), name=name)
