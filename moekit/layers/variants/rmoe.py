"""Layerwise Recurrent Router for MoE (RMoE; Qiu et al. 2024, arXiv 2408.06793, github qiuzh20/RMoE).

Dim legend: T tokens, D model dim, R recurrent dim, E experts, K slots per token.

Routers of consecutive MoE layers share state through ONE recurrent cell (GRU) shared by all layers::

    x'_l = W1_l x_l                 (per-layer projector D -> R, no bias)
    h_l  = GRUCell(x'_l, h_{l-1})   (one cell for all layers; h_0 = 0 at the first MoE layer)
    z_l  = W2_l h_l                 (per-layer R -> E, no bias; no norm or nonlinearity in between)
    p = softmax(z_l), top-k, renormalised (Mixtral-style expert sum)

The recurrence runs over depth, per token (no mixing across the sequence); ``h_l`` is carried to the next layer in
``ctx.state["rmoe.hidden"]`` and gradients flow through it. Sharing the cell: :func:`build_rmoe` hands the same
cell to every layer built for one model (layers are built in increasing ``layer_index``; a repeated or
decreasing index starts a new model), and :func:`tie_recurrent_routers` ties them explicitly after the fact.
Loss: Mixtral's balance loss computed once over the concatenated logits of all MoE layers
(``aux_scope="concat"``, coefficient ``moe.router.aux_loss_coef``, 1e-3 in the code): ``E * sum_i f'_i P_i`` with
``f'`` summing to K. Each layer adds the increment over the previous layers, so ``ctx.losses["aux_loss"]`` equals
the concatenated loss after the last layer. ``aux_scope="layer"`` uses the router's per-layer Switch loss.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...experts import ExpertBank
from ...routing.losses import load_balancing_loss, z_loss
from ...routing.selectors import select_topk
from ...types import Routing, RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ._common import flatten, make_shared_experts, parse_options, run_experts

__all__ = ["RMoEConfig", "RecurrentRouterMoE", "tie_recurrent_routers", "STATE_KEY"]

STATE_KEY = "rmoe.hidden"
_AUX_KEY = "rmoe.aux"


@dataclass(frozen=True, kw_only=True, slots=True)
class RMoEConfig:
    """Attributes:
        rnn_dim: R, the recurrent state size (code default 256).
        cell: ``gru`` (default) or ``rnn`` (plain tanh RNN cell).
        aux_scope: ``concat`` (Mixtral loss over all layers' logits, as in the code) or ``layer``.
    """

    rnn_dim: int = 256
    cell: Literal["gru", "rnn"] = "gru"
    aux_scope: Literal["concat", "layer"] = "concat"

    def __post_init__(self) -> None:
        check(self.rnn_dim >= 1, f"variant.rnn_dim={self.rnn_dim} must be positive (code default 256)")
        check_choice("variant", "cell", self.cell, ("gru", "rnn"))
        check_choice("variant", "aux_scope", self.aux_scope, ("concat", "layer"))


def _make_cell(config: RMoEConfig) -> nn.Module:
    cls = nn.GRUCell if config.cell == "gru" else nn.RNNCell
    return cls(config.rnn_dim, config.rnn_dim)


class RecurrentRouterMoE(nn.Module):
    """MoE layer whose router logits come from a recurrent cell shared across layers."""

    def __init__(self, moe: MoEConfig, config: RMoEConfig | None = None, name: str = "rmoe",
                 cell: nn.Module | None = None) -> None:
        super().__init__()
        self.moe_config, self.config, self.name = moe, config or RMoEConfig(), name
        R = self.config.rnn_dim
        self.proj_in = nn.Linear(moe.dim, R, bias=False)
        self.cell = cell if cell is not None else _make_cell(self.config)
        self.proj_out = nn.Linear(R, moe.num_experts, bias=False)
        self.experts = ExpertBank(moe.num_experts, moe.dim, moe.hidden_dim, moe.activation)
        self.shared_experts = make_shared_experts(moe)

    def logits(self, x_TD: torch.Tensor, h_prev_TR: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_TE, h_TR)`` in float32."""
        x_TR = F.linear(x_TD.float(), self.proj_in.weight.float())
        if h_prev_TR is None:
            h_prev_TR = x_TR.new_zeros(x_TR.shape)
        h_TR = self.cell(x_TR, h_prev_TR)
        return F.linear(h_TR, self.proj_out.weight.float()), h_TR

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, num_sequences: int = 1) -> Routing:
        rcfg = self.moe_config.router
        prev = ctx.state.get(STATE_KEY) if ctx is not None else None
        if prev is not None and prev.shape[0] != x_TD.shape[0]:
            raise ValueError(f"RMoE: the recurrent state holds {prev.shape[0]} tokens, this layer got "
                             f"{x_TD.shape[0]}; use one RoutingContext per forward pass")
        logits_TE, h_TR = self.logits(x_TD, prev)
        if ctx is not None:
            ctx.state[STATE_KEY] = h_TR
        probs_TE = logits_TE.softmax(-1)
        K = self.moe_config.top_k
        ids_TK, weights_TK = select_topk(probs_TE, K, normalize=rcfg.renormalize(K))
        if ctx is not None:
            self._add_losses(ctx, logits_TE, probs_TE, ids_TK, num_sequences)
        return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE, logits_TE=logits_TE)

    def _add_losses(self, ctx, logits_TE, probs_TE, ids_TK, num_sequences) -> None:
        rcfg = self.moe_config.router
        if rcfg.z_loss_coef > 0:
            ctx.add_loss("z_loss", rcfg.z_loss_coef * z_loss(logits_TE), self.name)
        if rcfg.aux_loss_coef == 0:
            return
        if self.config.aux_scope == "layer":
            b = num_sequences if rcfg.aux_loss_level == "sequence" else 1
            aux = load_balancing_loss(probs_TE, ids_TK, b, first_choice=rcfg.aux_loss_first_choice)
            ctx.add_loss("aux_loss", rcfg.aux_loss_coef * aux, self.name)
            return
        probs, ids, previous = ctx.state.get(_AUX_KEY, ([], [], None))
        probs, ids = probs + [probs_TE], ids + [ids_TK]
        K = ids_TK.shape[1]
        total = rcfg.aux_loss_coef * K * load_balancing_loss(torch.cat(probs), torch.cat(ids))
        ctx.add_loss("aux_loss", total if previous is None else total - previous, self.name)
        ctx.state[_AUX_KEY] = (probs, ids, total)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, num_sequences = flatten(x, self.moe_config.dim)
        routing = self.route(x_TD, ctx, num_sequences)
        return run_experts(self.moe_config, self.experts, self.shared_experts, x_TD, routing, ctx,
                           self.name).view(x.shape)


def tie_recurrent_routers(model: nn.Module) -> int:
    """Make every RMoE layer of ``model`` use the first one's cell; returns the number of layers tied."""
    layers = [m for m in model.modules() if isinstance(m, RecurrentRouterMoE)]
    for layer in layers[1:]:
        layer.cell = layers[0].cell
    return len(layers)


_SHARED_CELLS: dict[tuple, tuple[int, weakref.ref]] = {}


def _shared_cell(key: tuple, layer_index: int, config: RMoEConfig) -> nn.Module:
    entry = _SHARED_CELLS.get(key)
    cell = entry[1]() if entry is not None and layer_index > entry[0] else None
    if cell is None:
        cell = _make_cell(config)
    _SHARED_CELLS[key] = (layer_index, weakref.ref(cell))
    return cell


@register_ffn("rmoe")
def build_rmoe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    config = parse_options(RMoEConfig, options)
    key = (re.sub(r"\d+", "#", name), num_layers, config.rnn_dim, config.cell)
    return RecurrentRouterMoE(moe, config, name=name, cell=_shared_cell(key, layer_index, config))
