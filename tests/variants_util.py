"""Helpers shared by the variant tests (tiny shapes: the whole variant suite must stay fast on 2 CPU cores)."""

from __future__ import annotations

import torch

from moekit import MoEConfig, RouterConfig


def tiny_moe(**kw) -> MoEConfig:
    router = kw.pop("router", {})
    base = dict(dim=8, hidden_dim=12, num_experts=4, top_k=2, engine="sorted")
    base.update(kw)
    return MoEConfig(**base, router=RouterConfig(**router) if isinstance(router, dict) else router)


def params_with_grad(module: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    """Names of parameters that receive a non-zero gradient from ``loss`` (fresh gradients)."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def loss_only(ctx, name: str) -> torch.Tensor:
    assert name in ctx.losses, f"{name} not in {sorted(ctx.losses)}"
    return ctx.losses[name]
