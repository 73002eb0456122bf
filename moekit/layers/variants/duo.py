"""Duo-LLM: a big and a small FFN module per layer, and skip, routed per token (Alizadeh et al. 2024,
arXiv 2410.10846; architectures.md §22, compression-adaptation-serving.md §41; no code released).

Dim legend: T tokens, D model dim, F hidden dim, B batch, S sequence, O route options (skip, small, big).

Per token and layer the route is one of ``skip`` (the FFN adds nothing: the residual stream is unchanged by this
sublayer), ``small`` (inner dimension ``small_hidden_dim``, 16x smaller in the paper) or ``big`` (the usual FFN,
``moe.hidden_dim``)::

    y_t = 0 | small(x_t) | big(x_t)

Three ways to route, as in the paper's three stages:

- ``routing = "random"``: training samples a route per token uniformly among the allowed options (the paper's
  p = 0.5 per module choice when skip is off), so every path stays usable; evaluation follows ``eval_route``
  (``big``: the base model; ``random``).
- a forced pattern: ``ctx.state["duo.routes"][layer_name]`` (an int or a ``[T]`` tensor of option ids), set by the
  oracle search of :mod:`moekit.analysis.duo`, overrides everything.
- ``routing = "router"``: a per-layer linear router with soft routing, ``softmax(logits / tau)``, tau annealed
  geometrically from ``temperature`` to ``min_temperature`` over ``anneal_steps`` optimizer steps (``on_step``);
  hard argmax at evaluation. Trained with the global budget loss
  ``budget_coef * (mean over layers and tokens of P_big - budget_target)^2`` instead of per-layer balancing, added
  by the training-step hook (:meth:`DuoFFN.training_step`) because it spans layers.

Choices (the paper's details are known only from summaries): SwiGLU modules like moekit's dense FFN; the router
reads the normalised hidden state; hard routes run each module on its own tokens only, soft routes run both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...experts import FeedForward
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ..step_hook import Forward, StepLoss, language_model_loss
from ._common import flatten, parse_options, record_stats

__all__ = ["P_BIG_KEY", "ROUTES", "ROUTES_KEY", "DuoConfig", "DuoFFN"]

ROUTES = ("skip", "small", "big")
SKIP, SMALL, BIG = 0, 1, 2
ROUTES_KEY = "duo.routes"  # ctx.state: {layer name: int or [T] route ids} forced by the oracle search
P_BIG_KEY = "duo.p_big"  # ctx.state: per-layer mean probability of the big module (soft routing)


@dataclass(frozen=True, kw_only=True, slots=True)
class DuoConfig:
    """Attributes:
        small_hidden_dim: inner size of the small module; ``None``: ``moe.hidden_dim // 16`` (the paper's ratio).
        allow_skip: whether ``skip`` is a route (the paper's 3^L study) or only small / big (2^L).
        routing: ``random`` (stage 1 training) or ``router`` (stage 3, learned soft routing).
        eval_route: route at evaluation for ``routing = "random"``: ``big`` (the base model) or ``random``.
        budget_target: target mean probability of the big module for the router's budget loss.
        budget_coef: weight of the budget loss.
        temperature, min_temperature, anneal_steps: the router's softmax temperature schedule.
    """

    small_hidden_dim: int | None = None
    allow_skip: bool = True
    routing: Literal["random", "router"] = "random"
    eval_route: Literal["big", "random"] = "big"
    budget_target: float = 0.5
    budget_coef: float = 1.0
    temperature: float = 1.0
    min_temperature: float = 0.1
    anneal_steps: int = 1000

    def __post_init__(self) -> None:
        check(self.small_hidden_dim is None or (isinstance(self.small_hidden_dim, int) and self.small_hidden_dim >= 1),
              f"variant.small_hidden_dim={self.small_hidden_dim!r} must be a positive integer or left out")
        check_choice("variant", "routing", self.routing, ("random", "router"))
        check_choice("variant", "eval_route", self.eval_route, ("big", "random"))
        check(0.0 <= self.budget_target <= 1.0, f"variant.budget_target={self.budget_target} must be in [0, 1]")
        check(self.budget_coef >= 0, f"variant.budget_coef={self.budget_coef} must be >= 0")
        check(0 < self.min_temperature <= self.temperature,
              f"variant.min_temperature={self.min_temperature} must be in (0, temperature={self.temperature}]")
        check(isinstance(self.anneal_steps, int) and self.anneal_steps >= 1,
              f"variant.anneal_steps={self.anneal_steps!r} must be a positive integer")


class DuoFFN(nn.Module):
    """Skip / small / big feed-forward: ``forward(x, ctx=None) -> y`` of the same shape."""

    def __init__(self, moe: MoEConfig, config: DuoConfig | None = None, name: str = "duo") -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or DuoConfig(), name
        small = self.config.small_hidden_dim or max(1, moe.hidden_dim // 16)
        check(small < moe.hidden_dim, f"variant.small_hidden_dim={small} must be below moe.hidden_dim="
                                      f"{moe.hidden_dim} (the big module); lower small_hidden_dim")
        self.big = FeedForward(moe.dim, moe.hidden_dim, moe.activation)
        self.small = FeedForward(moe.dim, small, moe.activation)
        self.allowed = [SKIP, SMALL, BIG] if self.config.allow_skip else [SMALL, BIG]
        self.router = nn.Linear(moe.dim, 3, bias=False) if self.config.routing == "router" else None
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=moe.dim**-0.5)
        self.temperature = self.config.temperature

    def on_step(self, step: int) -> None:
        """Anneal the router's temperature: geometric from ``temperature`` to ``min_temperature``."""
        c = self.config
        frac = min(step / c.anneal_steps, 1.0)
        self.temperature = c.temperature * (c.min_temperature / c.temperature) ** frac

    def active_params(self) -> int:
        """Parameters one token uses under uniform random routing (the expected value; router counted)."""
        sizes = {SKIP: 0, SMALL: sum(p.numel() for p in self.small.parameters()),
                 BIG: sum(p.numel() for p in self.big.parameters())}
        router = 0 if self.router is None else self.router.weight.numel()
        return router + sum(sizes[o] for o in self.allowed) // len(self.allowed)

    def route_weights(self, x_TD: torch.Tensor, ctx: RoutingContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights_TO, probs_TO)``: one-hot weights for hard routes, the soft probabilities when training."""
        T, dev = x_TD.shape[0], x_TD.device
        forced = ctx.state.get(ROUTES_KEY, {}).get(self.name) if ctx is not None else None
        if forced is not None:
            ids_T = torch.as_tensor(forced, device=dev).expand(T) if not torch.is_tensor(forced) or forced.dim() == 0 \
                else forced.to(dev)
            onehot = F.one_hot(ids_T.long(), 3).to(x_TD.dtype)
            return onehot, onehot
        if self.router is not None:
            logits_TO = self.router(x_TD).float()
            if not self.config.allow_skip:
                logits_TO[:, SKIP] = float("-inf")
            if self.training:
                probs = (logits_TO / self.temperature).softmax(-1)
                return probs.to(x_TD.dtype), probs
            onehot = F.one_hot(logits_TO.argmax(-1), 3).to(x_TD.dtype)
            return onehot, logits_TO.softmax(-1)
        if self.training or self.config.eval_route == "random":
            allowed = torch.tensor(self.allowed, device=dev)
            ids_T = allowed[torch.randint(len(self.allowed), (T,), device=dev)]
        else:
            ids_T = torch.full((T,), BIG, device=dev)
        onehot = F.one_hot(ids_T, 3).to(x_TD.dtype)
        return onehot, onehot

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        w_TO, probs_TO = self.route_weights(x_TD, ctx)
        hard = bool(((w_TO == 0) | (w_TO == 1)).all())
        y_TD = torch.zeros_like(x_TD)
        for option, module in ((SMALL, self.small), (BIG, self.big)):
            if hard:
                rows = torch.nonzero(w_TO[:, option] > 0).squeeze(1)
                if rows.numel():
                    y_TD = y_TD.index_add(0, rows, module(x_TD[rows]))
            else:
                y_TD = y_TD + w_TO[:, option, None] * module(x_TD)
        if ctx is not None:
            if self.router is not None and self.training:
                ctx.state.setdefault(P_BIG_KEY, []).append(probs_TO[:, BIG].mean())
            ids_T1 = w_TO.argmax(-1, keepdim=True)
            routing = Routing(expert_ids_TK=ids_T1, weights_TK=w_TO.gather(1, ids_T1), scores_TE=probs_TO.detach(),
                              logits_TE=probs_TO.detach().clamp_min(1e-30).log())
            share = w_TO.detach().float().mean(0)
            record_stats(ctx, self.name, routing, big_fraction=share[BIG], small_fraction=share[SMALL],
                         skip_fraction=share[SKIP])
        return y_TD.view(x.shape)

    @staticmethod
    def training_step(modules: list[DuoFFN], forward: Forward, targets_BS: torch.Tensor,
                      collect_stats: bool) -> StepLoss:
        """The plain step plus, for learned routers, the global budget loss over every Duo layer."""
        out = language_model_loss(forward, targets_BS, collect_stats)
        p_big = out.ctx.state.get(P_BIG_KEY)
        routed = [m for m in modules if m.router is not None]
        if not p_big or not routed:
            return out
        c = routed[0].config
        budget = c.budget_coef * (torch.stack(p_big).mean() - c.budget_target) ** 2
        out.ctx.add_loss("duo_budget_loss", budget)
        return StepLoss(loss=out.loss + budget, ce=out.ce, aux=out.aux + budget, ctx=out.ctx,
                        logits_BSV=out.logits_BSV)


@register_ffn("duo")
def build_duo(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return DuoFFN(moe, parse_options(DuoConfig, options), name=name)

