"""Changing an MoE layer in place: drop experts from its router, put a compressed bank where its experts were.

Dim legend: E experts before, E' after.
"""

from __future__ import annotations

import dataclasses

import torch

from ..configs import ConfigError
from ..layers import MoE
from ..routing import Router
from .bank import CompressedBank
from .calibrate import CompressionError

__all__ = ["install_bank", "prune_router"]


def prune_router(moe: MoE, keep: list[int]) -> None:
    """Keep only the router rows of experts ``keep`` (in that order); ``top_k`` becomes ``min(top_k, E')``.

    Every router tensor whose first dimension is E (weights, bias, expert bias) is indexed by ``keep``; the
    softmax then runs over the kept experts only (DERN's router handling, spec §2; frequency pruning).
    """
    cfg = moe.config
    E = moe.router.weight.shape[0]
    if not keep:
        raise CompressionError(f"{moe.name}: keeping 0 experts leaves nothing to route to; keep at least 1")
    if len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= E:
        raise CompressionError(f"{moe.name}: experts to keep {keep} must be distinct and in [0, {E})")
    top_k = min(cfg.top_k, len(keep))
    try:
        new_cfg = dataclasses.replace(cfg, num_experts=len(keep), top_k=top_k, engine="reference")
        router = Router(cfg.dim, len(keep), top_k, cfg.router)
    except ConfigError as e:
        raise CompressionError(f"{moe.name}: this router cannot run with {len(keep)} experts ({e}); keep a "
                               f"number of experts the router's settings allow") from None
    index = torch.tensor(keep, dtype=torch.long)
    old = moe.router.state_dict()
    new = {k: (v[index] if v.dim() >= 1 and v.shape[0] == E else v) for k, v in old.items()}
    router.load_state_dict(new)
    moe.router = router.to(moe.router.weight.device)
    moe.config = new_cfg


def install_bank(moe: MoE, bank: CompressedBank) -> None:
    """Put ``bank`` in place of the layer's experts; the layer then runs the ``reference`` engine over it."""
    if bank.num_experts != moe.router.weight.shape[0]:
        raise CompressionError(f"{moe.name}: the compressed bank has {bank.num_experts} slots but the router has "
                               f"{moe.router.weight.shape[0]} experts")
    moe.experts = bank  # type: ignore[assignment]  # offers what the reference engine reads
    if moe.config.engine != "reference":
        moe.config = dataclasses.replace(moe.config, engine="reference")
