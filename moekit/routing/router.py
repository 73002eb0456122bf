"""The Router: scorer -> selector -> balancer, returning a :class:`~moekit.types.Routing`.

Dim legend: T tokens, D model dim, E experts, K slots per token.

The router is kept in float32 whatever the model's dtype (Switch's "selective precision"). Its losses are
weighted here and handed to the :class:`~moekit.types.RoutingContext`; the DeepSeek-V3 expert bias is a buffer
that only :meth:`Router.step` changes, after the optimizer step, from counts gathered during forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..types import Routing, RoutingContext
from .config import RouterConfig
from .losses import load_balancing_loss, z_loss
from .selectors import capacity, limit_capacity, select_expert_choice, select_topk

__all__ = ["Router"]


class Router(nn.Module):
    """Linear router with softmax or sigmoid scores.

    Args:
        dim: model dimension D.
        num_experts: routed experts E.
        top_k: experts per token K (for expert choice: the average experts per token).
        config: scorer, selector and balancer settings.
    """

    bias: nn.Parameter | None
    expert_bias: torch.Tensor
    pending_counts: torch.Tensor

    def __init__(self, dim: int, num_experts: int, top_k: int, config: RouterConfig | None = None) -> None:
        super().__init__()
        self.config = config or RouterConfig()
        self.config.validate_for(num_experts, top_k)
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        self.register_parameter(
            "bias", nn.Parameter(torch.zeros(num_experts)) if self.config.use_logit_bias else None)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("pending_counts", torch.zeros(num_experts), persistent=False)

    @property
    def uses_bias(self) -> bool:
        """Whether selection adds ``expert_bias`` (updated by :meth:`step`, or loaded and fixed)."""
        return self.config.bias_update_rate > 0 or self.config.use_selection_bias

    @property
    def updates_bias(self) -> bool:
        """Whether :meth:`step` updates ``expert_bias`` (auxiliary-loss-free balancing)."""
        return self.config.bias_update_rate > 0

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        if self.training and self.config.jitter_eps > 0:
            eps = self.config.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD, self.weight.float(), None if self.bias is None else self.bias.float())

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.config.score_func == "softmax":
            return logits_TE.softmax(dim=-1)
        return logits_TE.sigmoid()

    def forward(
        self,
        x_TD: torch.Tensor,
        ctx: RoutingContext | None = None,
        *,
        layer: str = "moe",
        num_sequences: int = 1,
        logits_TE: torch.Tensor | None = None,
    ) -> Routing:
        """Route ``T`` tokens.

        Args:
            x_TD: token representations.
            ctx: receives the weighted losses (``aux_loss``, ``z_loss``) under the layer's name.
            layer: the layer's name in ``ctx``.
            num_sequences: ``B`` for sequence-level balancing when the rows are ``B`` equal sequences.
            logits_TE: pre-computed logits (variants that build them differently, e.g. gating residuals).
        """
        cfg = self.config
        if logits_TE is None:
            logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        T = scores_TE.shape[0]
        if cfg.selector == "expert_choice":
            cf = self._capacity_factor() or 1.0
            ids_TK, weights_TK = select_expert_choice(
                scores_TE, capacity(T, self.num_experts, self.top_k, cf))
            selected_TK = ids_TK
            num_dropped = ids_TK.new_zeros(())  # an expert's unchosen tokens are not drops
        else:
            ids_TK, weights_TK = select_topk(
                scores_TE, self.top_k,
                bias_E=self.expert_bias if self.uses_bias else None,
                num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, group_score=cfg.group_score,
                normalize=cfg.renormalize(self.top_k), scale=cfg.routed_scaling_factor)
            selected_TK = ids_TK
            num_dropped = None  # every empty slot below is a capacity drop
            limit = self._capacity_factor()
            if limit is not None:
                ids_TK, weights_TK = limit_capacity(
                    ids_TK, weights_TK, self.num_experts, capacity(T, self.num_experts, self.top_k, limit))
        if self.training and self.updates_bias:
            with torch.no_grad():  # tokens with non-finite scores (NaN/inf input) are not counted: a bad batch
                finite_T1 = torch.isfinite(scores_TE).all(-1, keepdim=True)  # must not steer later selections
                counted_TK = ids_TK.masked_fill(~finite_T1, -1)
                self.pending_counts += torch.bincount(
                    counted_TK.reshape(-1) + 1, minlength=self.num_experts + 1)[1:].float()
        if ctx is not None:
            self._add_losses(ctx, layer, logits_TE, scores_TE, selected_TK, num_sequences)
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE, logits_TE=logits_TE,
                       num_dropped=num_dropped)

    def _capacity_factor(self) -> float | None:
        if not self.training and self.config.eval_capacity_factor is not None:
            return self.config.eval_capacity_factor
        return self.config.capacity_factor

    def _add_losses(self, ctx: RoutingContext, layer: str, logits_TE: torch.Tensor, scores_TE: torch.Tensor,
                    selected_TK: torch.Tensor, num_sequences: int) -> None:
        cfg = self.config
        if cfg.aux_loss_coef > 0 and cfg.selector == "topk":
            probs_TE = scores_TE
            if cfg.score_func == "sigmoid":  # DeepSeek-V3: P uses scores normalised over experts
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            b = num_sequences if cfg.aux_loss_level == "sequence" else 1
            # Global counts only in training: evaluation may run on one process alone.
            global_counts = cfg.aux_loss_level == "global_batch" and self.training
            loss = load_balancing_loss(probs_TE, selected_TK, b, first_choice=cfg.aux_loss_first_choice,
                                       global_counts=global_counts)
            ctx.add_loss("aux_loss", cfg.aux_loss_coef * loss, layer)
        if cfg.z_loss_coef > 0:
            ctx.add_loss("z_loss", cfg.z_loss_coef * z_loss(logits_TE), layer)

    @torch.no_grad()
    def step(self, process_group=None) -> None:
        """Auxiliary-loss-free bias update (DeepSeek-V3): ``b_i += gamma * sign(mean(load) - load_i)``.

        Call after ``optimizer.step()``. Uses the assignment counts gathered by training forwards since the
        last call (summed over ``process_group`` when distributed), then resets them. Tokens whose scores were
        not finite (NaN or inf inputs) are left out of the counts, so a bad batch cannot move the bias.
        """
        if not self.updates_bias:
            return
        counts_E = self.pending_counts
        if process_group is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            counts_E = counts_E.clone()
            torch.distributed.all_reduce(counts_E, group=process_group)
        if counts_E.sum() > 0:
            self.expert_bias += self.config.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.pending_counts.zero_()


def update_expert_biases(model: nn.Module, process_group=None) -> int:
    """Call :meth:`Router.step` on every router of ``model`` (after ``optimizer.step()``).

    Returns the number of routers that use the auxiliary-loss-free bias.
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and m.updates_bias]
    for router in routers:
        router.step(process_group)
    return len(routers)
