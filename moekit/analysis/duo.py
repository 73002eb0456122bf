"""Duo-LLM's oracle routing search (arXiv 2410.10846; compression-adaptation-serving.md §41).

Dim legend: B batch, S sequence, P route patterns, L Duo layers.

For a model whose sparse layers are :class:`~moekit.layers.variants.DuoFFN`, every *pattern* (one route per Duo
layer: skip / small / big, ``3^L`` of them, ``2^L`` without skip) is evaluated by forcing it through the routing
context, giving each token's next-token loss under each pattern. The oracle then keeps, per token, the pattern of
lowest loss among those that use the big module in at most ``budget`` layers. Token difficulty is the loss
reduction that extra compute buys: the token's best loss with no big module minus its best loss within the budget.

Choice (the paper searches per token, with details known only from summaries): a pattern is applied to every
token of the sequence at once, so a token's loss under a pattern includes the effect of that pattern on the
earlier tokens it attends to; the per-token oracle picks among those whole-sequence evaluations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError
from ..layers.variants.duo import BIG, ROUTES, ROUTES_KEY, DuoFFN
from ..types import RoutingContext

__all__ = ["OracleResult", "duo_layers", "oracle_routes", "pattern_losses", "route_patterns"]


@dataclass
class OracleResult:
    """The oracle over ``P`` patterns for one batch.

    Attributes:
        patterns: the evaluated patterns, each a tuple of route names per Duo layer (depth order).
        losses_PBS: next-token loss of every token under every pattern (the last position has no target and is
            left out, so ``S`` here is the input length minus one).
        best_BS: index into ``patterns`` of each token's oracle pattern within the budget.
        best_loss_BS: each token's oracle loss.
        difficulty_BS: best loss without the big module minus the oracle loss (>= 0).
        best_sequence_pattern: the single pattern of lowest mean loss within the budget.
    """

    patterns: list[tuple[str, ...]]
    losses_PBS: torch.Tensor
    best_BS: torch.Tensor
    best_loss_BS: torch.Tensor
    difficulty_BS: torch.Tensor
    best_sequence_pattern: tuple[str, ...]

    def mean_loss(self, pattern: tuple[str, ...]) -> float:
        """Mean loss of one evaluated pattern."""
        return float(self.losses_PBS[self.patterns.index(pattern)].mean())


def duo_layers(model: nn.Module) -> list[tuple[str, DuoFFN]]:
    """``(name, layer)`` of the model's Duo layers in depth order (their routing-context names)."""
    return [(m.name, m) for m in model.modules() if isinstance(m, DuoFFN)]


def route_patterns(num_layers: int, allow_skip: bool = True) -> list[tuple[str, ...]]:
    """Every assignment of a route to each of ``num_layers`` layers."""
    options = ROUTES if allow_skip else ROUTES[1:]
    return list(itertools.product(options, repeat=num_layers))


@torch.no_grad()
def pattern_losses(model: nn.Module, tokens_BS: torch.Tensor, patterns: list[tuple[str, ...]]) -> torch.Tensor:
    """``[P, B, S-1]`` next-token losses with each pattern forced on every Duo layer (eval mode)."""
    names = [n for n, _ in duo_layers(model)]
    was_training = model.training
    model.eval()
    try:
        out = []
        for pattern in patterns:
            ctx = RoutingContext()
            ctx.state[ROUTES_KEY] = {n: ROUTES.index(r) for n, r in zip(names, pattern)}
            logits_BSV, _ = model(tokens_BS[:, :-1], ctx)
            out.append(F.cross_entropy(logits_BSV.float().transpose(1, 2), tokens_BS[:, 1:], reduction="none"))
        return torch.stack(out)
    finally:
        model.train(was_training)


def oracle_routes(model: nn.Module, tokens_BS: torch.Tensor, budget: int | None = None,
                  max_patterns: int = 729) -> OracleResult:
    """Exhaustive oracle search over route patterns (see the module docstring).

    Args:
        tokens_BS: token ids; the losses are those of predicting ``tokens[:, 1:]``.
        budget: most layers that may use the big module (``None``: all of them).
        max_patterns: refuse searches larger than this (``3^L`` grows fast).
    """
    layers = duo_layers(model)
    if not layers:
        raise ConfigError("the model has no Duo layers; build it with model.ffn='duo' (preset duo-llm)")
    allow_skip = layers[0][1].config.allow_skip
    patterns = route_patterns(len(layers), allow_skip)
    if len(patterns) > max_patterns:
        raise ConfigError(f"{len(patterns)} route patterns over {len(layers)} Duo layers exceed "
                          f"max_patterns={max_patterns}; use fewer layers or raise max_patterns")
    budget = len(layers) if budget is None else budget
    if not 0 <= budget <= len(layers):
        raise ConfigError(f"budget={budget} must be between 0 and the {len(layers)} Duo layers")
    losses_PBS = pattern_losses(model, tokens_BS, patterns)
    bigs_P = torch.tensor([sum(r == ROUTES[BIG] for r in p) for p in patterns])
    inf = torch.tensor(float("inf"))
    within = torch.where((bigs_P <= budget)[:, None, None], losses_PBS, inf)
    best_loss_BS, best_BS = within.min(0)
    no_big = torch.where((bigs_P == 0)[:, None, None], losses_PBS, inf).min(0).values
    seq_best = int(within.mean((1, 2)).argmin())
    return OracleResult(patterns=patterns, losses_PBS=losses_PBS, best_BS=best_BS, best_loss_BS=best_loss_BS,
                        difficulty_BS=no_big - best_loss_BS, best_sequence_pattern=patterns[seq_best])
