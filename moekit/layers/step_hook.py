"""The generic training-step hook: how a variant changes what one training micro-batch computes.

Dim legend: B batch, S sequence, V vocabulary.

Most variants train with the plain step (:func:`language_model_loss`: one forward, cross-entropy plus the
weighted losses of the :class:`~moekit.RoutingContext`). A variant that needs more — THOR's two stochastic passes
and their consistency loss, a supernet that samples an architecture per step, a router trained against a
frozen model's search results — gives its module class a static method::

    training_step(modules: list[nn.Module], forward: Forward, targets_BS: Tensor, collect_stats: bool) -> StepLoss

``modules`` are every module of the model that has that hook (e.g. all THOR layers), ``forward(ctx)`` runs the
model on the micro-batch (under the trainer's autocast) and returns ``(logits_BSV, ctx)``. The trainer looks the
hook up with :func:`training_step_hook`, calls it once per micro-batch and back-propagates ``StepLoss.loss``
(keeping only the gradients of ``StepLoss.trainable`` when the hook names them); it knows no particular variant.
A model may hold at most one kind of hook (two would each want to own the step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError
from ..types import RoutingContext

__all__ = ["Forward", "StepFn", "StepLoss", "language_model_loss", "next_token_ce", "training_step_hook"]

Forward = Callable[[RoutingContext], tuple[torch.Tensor, RoutingContext]]


@dataclass
class StepLoss:
    """What one training micro-batch computed.

    Attributes:
        loss: the scalar the trainer back-propagates (already including every auxiliary loss).
        ce: the cross-entropy to report (a mean over tokens).
        aux: the auxiliary losses to report (``loss - ce`` for the plain step), a tensor or 0.0.
        ctx: the routing context whose statistics the trainer logs.
        logits_BSV: the logits of the (first) forward pass, for hooks that compare passes.
        trainable: when set, only these parameters keep their gradient from this micro-batch (the rest of the
            model is frozen for the step: e.g. routers trained on a frozen LLM).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor | float
    ctx: RoutingContext
    logits_BSV: torch.Tensor | None = None
    trainable: list[nn.Parameter] | None = None


StepFn = Callable[[Forward, torch.Tensor, bool], StepLoss]


def next_token_ce(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position, in float32."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def language_model_loss(forward: Forward, targets_BS: torch.Tensor, collect_stats: bool) -> StepLoss:
    """The plain step: ``CE(model(x)) + ctx.total_loss()``."""
    logits_BSV, ctx = forward(RoutingContext(collect_stats=collect_stats))
    ce = next_token_ce(logits_BSV, targets_BS)
    aux = ctx.total_loss()
    return StepLoss(loss=ce + aux, ce=ce, aux=aux, ctx=ctx, logits_BSV=logits_BSV)


def training_step_hook(model: nn.Module) -> StepFn:
    """The step function of ``model``: its variant's ``training_step`` bound to its modules, or the plain step.

    Raises:
        ConfigError: when the model holds modules with two different hooks.
    """
    groups: dict[Callable, list[nn.Module]] = {}
    for module in model.modules():
        hook = getattr(type(module), "training_step", None)
        if callable(hook):
            groups.setdefault(hook, []).append(module)
    if not groups:
        return language_model_loss
    if len(groups) > 1:
        kinds = sorted({type(m).__name__ for ms in groups.values() for m in ms})
        raise ConfigError(f"the model combines variants that each own the training step ({', '.join(kinds)}); "
                          f"use one of them per model (model.ffn / model.attention)")
    (hook, modules), = groups.items()
    return functools.partial(hook, modules)

