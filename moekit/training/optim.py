"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["build_optimizer", "fused_supported", "learning_rate"]


def fused_supported(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain (not ``DTensor``) floating tensors on
    CPU or CUDA, all on one device type."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        DTensor = ()  # type: ignore[assignment,misc]
    devices = {p.device.type for p in params}
    return (len(devices) <= 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101); matrices and stacks decay, gains and biases do not.

    With ``cfg.fused_optimizer`` (the default) and parameters it supports (:func:`fused_supported`), torch's
    fused kernel: one pass over each parameter's memory instead of about ten. Its cost grows with the *total*
    parameters, so it weighs on a MoE (all experts) far more than on a dense model of the same active size:
    on the ``default`` preset (13.7 M parameters) the single-tensor AdamW took about 5x the fused one's time,
    a sixth of the whole training step on this project's CPU (docs/benchmarks.md, "Training step"). Fused and
    single-tensor updates agree to float32 rounding (tested); each is deterministic, so a resumed run repeats
    an uninterrupted one exactly either way. Otherwise (``fused_optimizer=False``, FSDP's ``DTensor``
    parameters) the single-tensor loop (``foreach=False``), whose rounding is the same on every platform.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.fused_optimizer and fused_supported(decay + no_decay):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """``lr * min(1, (step + 1) / warmup) * cosine(progress)``, ``progress`` in [0, 1] of the budget.

    The cosine factor goes from 1 to ``min_lr_ratio`` (SGDR, arXiv 1608.03983, without restarts). Taking
    ``progress`` rather than a step count lets the same schedule serve a step budget and a time budget.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr * warm * cosine
