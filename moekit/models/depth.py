"""Model-level routing hooks: depth routing (Mixture-of-Depths, Mixture-of-Recursions) and the Read-ME planner.

Dim legend: B batch, S sequence, K selected tokens per sequence, D model dim, R rotary frequencies.

These variants route whole blocks rather than feed-forwards, so the model, not a layer, applies them:

- ``depth_routing = {kind = "mod", every = 2, ...}``: every ``every``-th block (indices ``every-1, 2*every-1,
  ...``) is wrapped by :class:`~moekit.layers.variants.MixtureOfDepths`, which runs the block's *delta*
  (attention + feed-forward, without the residual) on its selected tokens only, at their own rotary positions.
- ``depth_routing = {kind = "mor", ...}``: "middle-cycle" parameter sharing (MoR, arXiv 2507.10524): the first
  and last blocks are unique and the middle stack is one shared block that
  :class:`~moekit.layers.variants.MixtureOfRecursions` applies up to ``num_recursions`` times per token.
- ``depth_routing = {kind = "drllm", ...}``: Dr.LLM's per-layer routers
  (:class:`~moekit.layers.variants.LayerPathRouters`) skip, execute or repeat each block per sequence.
- ``depth_routing = {kind = "ftp", sparsity = 0.25}``: FTP's per-block token routers
  (:class:`~moekit.layers.variants.TokenPruner`) let each token skip a block (its hidden state unchanged).
- ``ffn = "readme"``: one :class:`~moekit.layers.variants.ReadMEPlanner` reads the token embeddings and plans
  every MoE layer's routing before the blocks run.

Selected tokens are kept in causal order, so attention among them is plain causal attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..configs import ConfigError, check, from_dict
from ..layers.variants import (
    DrLLMConfig,
    FTPConfig,
    LayerPathRouters,
    MixtureOfDepths,
    MixtureOfRecursions,
    MoDConfig,
    MoRConfig,
    ReadMEConfig,
    ReadMEPlanner,
    TokenPruner,
)
from ..layers.variants.mod import POSITIONS_KEY
from ..types import RoutingContext

__all__ = ["build_depth_router", "build_planner", "mod_layers", "positions_rope"]

DEPTH_KINDS = ("mod", "mor", "drllm", "ftp")


def validate_depth_routing(options: dict[str, Any], num_layers: int) -> None:
    """Check ``model.depth_routing`` early, with the fix in the message."""
    if not options:
        return
    kind = options.get("kind")
    check(kind in DEPTH_KINDS, f"model.depth_routing.kind={kind!r} must be one of {list(DEPTH_KINDS)}")
    rest = {k: v for k, v in options.items() if k not in ("kind", "every")}
    if kind == "mod":
        every = options.get("every", 2)
        check(isinstance(every, int) and 1 <= every <= num_layers,
              f"model.depth_routing.every={every!r} must be an integer in [1, num_layers={num_layers}]")
        from_dict(MoDConfig, rest, prefix="model.depth_routing")
    elif kind in ("drllm", "ftp"):
        check("every" not in options, f"model.depth_routing.every is for kind='mod'; remove it for {kind!r}")
        cfg = from_dict(DrLLMConfig if kind == "drllm" else FTPConfig, rest, prefix="model.depth_routing")
        if isinstance(cfg, FTPConfig):
            cfg.schedule(num_layers)
    else:
        check("every" not in options, "model.depth_routing.every is for kind='mod'; remove it for 'mor'")
        check(num_layers >= 3, f"Mixture-of-Recursions shares the middle blocks between a unique first and last "
                               f"block, so it needs num_layers >= 3 (got {num_layers})")
        from_dict(MoRConfig, rest, prefix="model.depth_routing")


def mod_layers(options: dict[str, Any], num_layers: int) -> list[int]:
    """Indices of the blocks that Mixture-of-Depths routes (every other block by default, from the second)."""
    every = options.get("every", 2)
    return [i for i in range(num_layers) if i % every == every - 1]


def build_depth_router(options: dict[str, Any], dim: int, num_layers: int) -> nn.Module | None:
    """An ``nn.ModuleDict`` of MoD routers by block index, a MoR router, or None."""
    if not options:
        return None
    rest = {k: v for k, v in options.items() if k not in ("kind", "every")}
    if options["kind"] == "mod":
        cfg = from_dict(MoDConfig, rest, prefix="model.depth_routing")
        return nn.ModuleDict({str(i): MixtureOfDepths(dim, cfg, name=f"layers.{i}.mod")
                              for i in mod_layers(options, num_layers)})
    if options["kind"] == "ftp":
        return TokenPruner(num_layers, from_dict(FTPConfig, rest, prefix="model.depth_routing"))
    if options["kind"] == "drllm":
        return LayerPathRouters(dim, num_layers, from_dict(DrLLMConfig, rest, prefix="model.depth_routing"))
    return MixtureOfRecursions(dim, from_dict(MoRConfig, rest, prefix="model.depth_routing"), name="mor")


def build_planner(ffn: str, moe, variant: dict[str, Any], num_layers: int) -> ReadMEPlanner | None:
    if ffn != "readme":
        return None
    try:
        cfg = from_dict(ReadMEConfig, variant, prefix="model.variant")
    except TypeError as e:  # pragma: no cover - from_dict raises ConfigError for bad keys
        raise ConfigError(str(e)) from None
    return ReadMEPlanner(moe, cfg, num_layers=num_layers)


def positions_rope(ctx: RoutingContext, cos_SR: torch.Tensor, sin_SR: torch.Tensor):
    """Rotary tables ``[B, K, R]`` at the positions a depth router selected, or the full ``[S, R]`` ones when it
    runs the block on every position."""
    pos_BK = ctx.state.get(POSITIONS_KEY)
    if pos_BK is None:
        return cos_SR, sin_SR
    return cos_SR[pos_BK], sin_SR[pos_BK]
