"""One optimizer step of the training loop (:func:`train_step`) and the train-step hook (:func:`call_on_step`).

Dim legend: B batch, S sequence.

One optimizer step::

    for each micro-batch m:   loss_m = CE(model(x_m)) + routing losses in ctx;  (loss_m / grad_accum).backward()
                              (a variant may replace loss_m through its training-step hook: moekit.layers.step_hook)
    clip the gradient norm; optimizer.step(); update_expert_biases(model); module.on_step(step) for hooks

The loop around it (schedule, validation, checkpoints, budgets) is :mod:`moekit.training.trainer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import ConfigError
from ..data import TokenData, train_batch
from ..layers.step_hook import training_step_hook
from ..parallel import ParallelGroups
from ..routing import update_expert_biases
from ..types import RoutingContext
from .config import RunConfig
from .distributed import micro_index, reduce_and_clip, world_mean
from .evaluate import autocast

__all__ = ["MAX_SKIPPED_IN_A_ROW", "NonFiniteError", "call_on_step", "train_step"]

# In train.on_nonfinite="skip" mode, this many non-finite steps in a row still stop the run.
MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteError(ConfigError):
    """A step's loss or gradient norm is NaN or inf: the run stops without saving (the last checkpoint stays)."""


def call_on_step(model: nn.Module, step: int) -> None:
    """The train-step hook: ``module.on_step(step)`` for every module that has one (``step`` steps are done)."""
    for module in model.modules():
        on_step = getattr(module, "on_step", None)
        if callable(on_step):
            on_step(step)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: TokenData, cfg: RunConfig, step: int,
               device: torch.device, collect_stats: bool = False, groups: ParallelGroups | None = None) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics.

    With distributed ``groups`` (every rank calls it): this rank's micro-batches, gradients averaged over the
    ranks, the whole model's norm clipped, and loss, CE and aux averaged over the ranks; routing statistics
    stay this rank's.
    """
    tc = cfg.train
    step_loss = training_step_hook(model)  # the plain step, or the one variant hook (moekit.layers.step_hook)
    ce_sum, aux_sum, stats = 0.0, 0.0, {}
    for micro in range(tc.grad_accum):
        x_BS, y_BS = train_batch(data, tc.batch_size, cfg.model.context, tc.seed, step,
                                 micro_index(groups, tc.grad_accum, micro))
        x_BS, y_BS = x_BS.to(device), y_BS.to(device)

        def forward(ctx: RoutingContext, x_BS: torch.Tensor = x_BS) -> tuple[torch.Tensor, RoutingContext]:
            with autocast(device, tc.dtype):
                return model(x_BS, ctx)

        result = step_loss(forward, y_BS, collect_stats)
        (result.loss / tc.grad_accum).backward()
        if result.trainable is not None:  # the hook trains only these (e.g. routers on a frozen model)
            keep = {id(p) for p in result.trainable}
            for p in model.parameters():
                if id(p) not in keep:
                    p.grad = None
        ce_sum += result.ce.item()
        aux_sum += float(result.aux.detach()) if isinstance(result.aux, torch.Tensor) else float(result.aux)
        stats.update(result.ctx.stats_summary())
    grad_norm = float(reduce_and_clip(model, tc.grad_clip if tc.grad_clip > 0 else float("inf"), groups))
    # World means before the update, so that every rank takes the same decision on non-finite values.
    ce, aux = world_mean([ce_sum / tc.grad_accum, aux_sum / tc.grad_accum], groups)
    finite = math.isfinite(grad_norm) and math.isfinite(ce) and math.isfinite(aux)
    if finite:
        optimizer.step()
    elif tc.on_nonfinite == "stop":
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"step {step + 1}: loss {ce + aux} / gradient norm {grad_norm} is not finite; training stopped and "
            f"nothing was saved (the last checkpoint is kept). Lower --train.lr (now {tc.lr}) or raise "
            f"--train.warmup_steps, or pass --train.on_nonfinite=skip to skip such steps")
    optimizer.zero_grad(set_to_none=True)
    update_expert_biases(model)
    call_on_step(model, step + 1)
    out = {"loss": ce + aux, "ce": ce, "aux": aux, "grad_norm": grad_norm}
    if not finite:
        out["skipped"] = 1
    if stats:
        out["load_cv"] = sum(s["load_cv"] for s in stats.values()) / len(stats)
        out["dead_experts"] = sum(s["dead_experts"] for s in stats.values())
    return out
